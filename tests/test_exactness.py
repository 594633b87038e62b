"""The proxy's answer is the target's own at the edges: which tokens end
generation, how completion tokens are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import qwen

from tightwad_core import vocab as vocab_mod
from tightwad_core.runtime import catalog
from tightwad_core.testing.tinymodels import write_tiny_model


def _files(tmp_path: Path) -> list[Path]:
    return [qwen(catalog.DEFAULT_TARGET), qwen(catalog.DEFAULT_DRAFT),
            write_tiny_model(tmp_path / "tiny.gguf", seed=3)]


def test_end_of_generation_is_the_engines_set(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path)
    engine = {p: vocab_mod.engine_eog(str(p)) for p in files}
    for p in files:
        assert engine[p], p
        vocab_mod._load.cache_clear()
        assert vocab_mod.load_vocab(p).eos == engine[p], p
    # Qwen2.5-Coder's fill-in-the-middle separators end generation for llama.cpp
    target = vocab_mod.load_vocab(files[0])
    texts = {t: target.special(t) for t in target.eos}
    assert {b"<|fim_pad|>", b"<|repo_name|>", b"<|file_sep|>", b"<|im_end|>"} <= set(texts.values())
    # without the binding to ask, the GGUF's ids and the known texts give the same set
    monkeypatch.setattr(vocab_mod, "engine_eog", lambda path: None)
    for p in files:
        vocab_mod._load.cache_clear()
        assert vocab_mod.load_vocab(p).eos == engine[p], p
    vocab_mod._load.cache_clear()
