"""The proxy's answer is the target's own at the edges: which tokens end
generation, how completion tokens are counted."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from conftest import ServerProc, qwen, start_proxy

from tightwad_core import vocab as vocab_mod
from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.runtime import catalog
from tightwad_core.testing.tinymodels import DEFAULT_TEMPLATE, write_tiny_model
from tightwad_plugins.worker.cli import serve_worker


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


BOS_TEMPLATE = "{{ bos_token }}" + DEFAULT_TEMPLATE


async def test_a_template_that_writes_bos_gives_one_bos(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    """A llama-architecture model adds BOS and its template writes it too: the
    worker's, llama-server's and the proxy's prompts all hold it once, token
    for token what llama-server's own chat route evaluates."""
    model = write_tiny_model(tmp_path / "bos.gguf", seed=4, chat_template=BOS_TEMPLATE)
    bos = vocab_mod.load_vocab(model).bos
    messages = [{"role": "user", "content": "the cat sat on"}]
    server = await trio.to_thread.run_sync(lambda: ServerProc(model, tmp_path / "srv.log", parallel=1))
    try:
        worker = await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, ctx=512, threads=1))
        async with httpx.AsyncClient(timeout=60) as c:
            ids = {}
            for name, url in (("llama-server", server.url), ("worker", worker.url)):
                text = (await c.post(url + "/apply-template", json={"messages": messages})).json()["prompt"]
                ids[name] = (await c.post(url + "/tokenize", json={"content": text, "add_special": True})
                             ).json()["tokens"]
                assert ids[name][0] == bos and ids[name][1] != bos, (name, ids[name][:3])
            assert ids["worker"] == ids["llama-server"]
            own = (await c.post(server.url + "/v1/chat/completions", json={
                "messages": messages, "max_tokens": 8, "temperature": 0})).json()
            assert own["usage"]["prompt_tokens"] == len(ids["llama-server"])
            alone = (await c.post(worker.url + "/v1/chat/completions", json={
                "messages": messages, "max_tokens": 8, "temperature": 0})).json()
            assert alone["usage"]["prompt_tokens"] == len(ids["worker"])
            profile = Profile(
                mode="speculative", listen="127.0.0.1:0",
                target=BackendConfig(backend="worker", url=worker.url),
                draft=BackendConfig(backend="llama-server", url=server.url),
                speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker"))
            running = await start_proxy(nursery, profile, tmp_path)
            via = (await c.post(running.url + "/v1/chat/completions", json={
                "messages": messages, "max_tokens": 8, "temperature": 0})).json()
            assert via["usage"] == alone["usage"]
            assert via["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
            running.shutdown.set()
    finally:
        server.stop()


async def test_a_worker_by_url_marks_its_control_tokens(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The vocabulary a worker serves keeps control tokens out of answer text
    (their piece is empty) while drafts can still spell them out."""
    from tightwad_core.roles import BackendContext
    from tightwad_plugins.backends.worker import WorkerBackend

    model = write_tiny_model(tmp_path / "ctl.gguf", seed=5)
    worker = await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, ctx=256, threads=1))
    backend = WorkerBackend(BackendConfig(backend="worker", url=worker.url),
                            BackendContext(role="target", config_dir=tmp_path, run_dir=tmp_path))
    await nursery.start(backend.serve)
    served = await backend.vocab()
    local = vocab_mod.load_vocab(model)
    assert served.fingerprint == local.fingerprint and served.eos == local.eos
    for t in served.eos:
        assert served.piece(t) == b"" and served.special(t) == local.special(t) != b""
    assert served.decode(sorted(served.eos)) == b""
    await backend.aclose()
