"""`tightwad run --profile demo`, the README's main job, as a user runs it:
a subprocess with no config of its own, then the official clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import qwen

from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import free_port


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    qwen(catalog.DEFAULT_TARGET)
    home = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TIGHTWAD_CONFIG"}
    env["XDG_CONFIG_HOME"] = str(home / "xdg")  # no user config: the built-in profiles serve
    exe = Path(sys.executable).parent / "tightwad"
    log = open(home / "demo.log", "wb")
    proc = subprocess.Popen([str(exe), "run", "--profile", "demo", "--listen", f"127.0.0.1:{port}"],
                            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (home / "demo.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(30) == 0, (home / "demo.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_demo_openai_client(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    assert model == catalog.MODELS[catalog.DEFAULT_TARGET].filename.removesuffix(".gguf")
    msgs = [{"role": "user", "content": "Write a Python one-liner that sums 1 to 10."}]
    # llama-server caches prompts: the first request evaluates the whole prompt, later ones
    # reuse it, which can flip a near-tie; compare requests that all see a warm cache
    client.chat.completions.create(model=model, messages=msgs, max_tokens=1, temperature=0)
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens <= 32 and r.usage.prompt_tokens > 10
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=msgs, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert streamed == text
    client.completions.create(model=model, prompt="# fibonacci in python\ndef fib(n):", max_tokens=1, temperature=0)
    c = client.completions.create(model=model, prompt="# fibonacci in python\ndef fib(n):", max_tokens=24,
                                  temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 24 and c.choices[0].finish_reason == "length"
    cs = "".join(x.choices[0].text for x in client.completions.create(
        model=model, prompt="# fibonacci in python\ndef fib(n):", max_tokens=24, temperature=0, stream=True)
        if x.choices)
    assert cs == c.choices[0].text


def test_demo_ollama_client(demo: str) -> None:
    client = ollama.Client(host=demo)
    model = client.list().models[0].model
    msgs = [{"role": "user", "content": "Name a prime number."}]
    client.chat(model=model, messages=msgs, options={"temperature": 0, "num_predict": 1})  # warm the cache
    r = client.chat(model=model, messages=msgs, options={"temperature": 0, "num_predict": 24})
    assert r.message.content and r.done and 0 < r.eval_count <= 24 and r.prompt_eval_count > 5
    streamed = list(client.chat(model=model, messages=msgs, stream=True,
                                options={"temperature": 0, "num_predict": 24}))
    assert streamed[-1].done and "".join(p.message.content for p in streamed) == r.message.content
    g = client.generate(model=model, prompt="Name a prime number.", options={"temperature": 0, "num_predict": 24})
    assert g.response == r.message.content
    gs = "".join(p.response for p in client.generate(model=model, prompt="Name a prime number.", stream=True,
                                                     options={"temperature": 0, "num_predict": 24}))
    assert gs == g.response
    assert client.show(model).details.family == "qwen2"
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=msgs)
    assert info.value.status_code == 404
