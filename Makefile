# Two entry points for a new machine:
#   make demo   set everything up, then serve the built-in demo profile on :8088
#   make test   set everything up, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup install bench-overhead e2e-open-webui clean

$(BIN)/tightwad: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/tightwad

setup: install
	$(BIN)/tightwad setup

demo: setup
	$(BIN)/tightwad run --profile demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench-overhead: setup
	$(BIN)/python contrib/benchmarks/proxy_overhead.py

# Open WebUI (its own cached venv) in headless Debian chromium, against demo and speculative
e2e-open-webui: setup
	$(BIN)/python contrib/e2e/open_webui.py --out e2e-out

clean:
	rm -rf $(VENV) *.egg-info
