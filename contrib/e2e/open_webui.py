"""Open WebUI, unchanged, chatting through Tightwad: the real client test.

For each profile (default: ``demo`` and ``speculative``) this script

1. starts ``tightwad run --profile P`` and, between it and Open WebUI, a small
   recording relay that keeps every request Open WebUI sends;
2. starts Open WebUI (installed once into its own cached venv) with
   ``OLLAMA_BASE_URL`` pointing at the relay, no login, offline;
3. drives the real page in headless Chromium through Playwright: sets the
   user's temperature to 0, sends a first and a second chat message with
   Open WebUI's built-in tools left on as users have them, waits for each
   answer and saves a screenshot;
4. replays each recorded ``/api/chat`` request, unchanged, to a second
   Tightwad in ``direct`` mode on the same target server (the target alone)
   and checks that the answer shown in the browser is the target's own;
5. runs a tool-call round trip the way Open WebUI's native function calling
   does it: Open WebUI's recorded request (its 36 built-in tools) plus a tool
   the script defines, the model's call, the tool's result sent back as a
   ``tool`` message, and the model's answer.

Run it with the project's Python after ``tightwad setup``::

    python contrib/e2e/open_webui.py --out e2e-out

It needs Debian's ``chromium`` (``apt-get install chromium``); Playwright's
own browser download is not used. Figures and verdicts go to
``<out>/report.json``; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

OPEN_WEBUI = "open-webui==0.12.4"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def cache_dir() -> Path:
    base = os.environ.get("TIGHTWAD_CACHE") or str(Path.home() / ".cache" / "tightwad")
    return Path(base) / "e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_open_webui() -> Path:
    """Open WebUI and Playwright in a venv of their own, installed once."""
    venv = cache_dir() / "open-webui-venv"
    exe = venv / "bin" / "open-webui"
    if not exe.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", OPEN_WEBUI, "playwright"], check=True)
    return venv


def wait_http(url: str, seconds: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {seconds:.0f} s")


@contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def tightwad(args: list[str], log: Path) -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).parent / "tightwad"
    with process([str(exe), *args, "--listen", f"127.0.0.1:{port}"], log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 900, "tightwad", proc)
        yield url


@contextmanager
def recorder(upstream: str, log: Path) -> Iterator[tuple[str, Path]]:
    """A relay that writes every request body it forwards (one JSON line each)."""
    port = free_port()
    code = RECORDER.format(upstream=upstream, port=port, out=str(log.with_suffix(".jsonl")))
    with process([sys.executable, "-c", code], log):
        wait_http(f"http://127.0.0.1:{port}/api/version", 60, "the recorder")
        yield f"http://127.0.0.1:{port}", log.with_suffix(".jsonl")


#: The recording relay, run in its own interpreter (trio + httpx, as the project).
RECORDER = '''
import json, trio, httpx
from quart import request, Response
from quart_trio import QuartTrio
from hypercorn.config import Config
from hypercorn.trio import serve
app = QuartTrio("recorder")
app.config["RESPONSE_TIMEOUT"] = None
client = httpx.AsyncClient(base_url="{upstream}", timeout=None)

@app.route("/<path:path>", methods=["GET", "POST", "DELETE"])
async def relay(path):
    body = await request.get_data()
    if request.method == "POST":
        with open("{out}", "a") as f:
            f.write(json.dumps({{"path": "/" + path, "body": body.decode("utf-8", "replace")}}) + "\\n")
    req = client.build_request(request.method, "/" + path, content=body,
                               headers={{"content-type": request.headers.get("content-type", "application/json")}})
    resp = await client.send(req, stream=True)
    async def chunks():
        try:
            async for c in resp.aiter_raw():
                yield c
        finally:
            await resp.aclose()
    out = Response(chunks(), status=resp.status_code, content_type=resp.headers.get("content-type"))
    out.timeout = None
    return out

cfg = Config()
cfg.bind = ["127.0.0.1:{port}"]
trio.run(serve, app, cfg)
'''


@contextmanager
def open_webui(venv: Path, ollama_url: str, model: str, log: Path) -> Iterator[str]:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="owui-"))
    env = {"DATA_DIR": str(data), "OLLAMA_BASE_URL": ollama_url, "ENABLE_OLLAMA_API": "True",
           "ENABLE_OPENAI_API": "False", "WEBUI_AUTH": "False", "OFFLINE_MODE": "True",
           "HF_HUB_OFFLINE": "1", "ENABLE_PERSISTENT_CONFIG": "False", "DEFAULT_MODELS": model,
           "WEBUI_SECRET_KEY": "e2e-only", "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "True",
           "SCARF_NO_ANALYTICS": "True", "ENABLE_VERSION_UPDATE_CHECK": "False"}
    try:
        with process([str(venv / "bin" / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                     log, env) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", 600, "Open WebUI", proc)
            yield url
    finally:
        shutil.rmtree(data, ignore_errors=True)


def browser_chat(webui: str, messages: list[str], shots: Path, limit_s: float) -> list[dict[str, Any]]:
    """Send each message in the real page; return the answers as Open WebUI keeps them."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium)")
    out: list[dict[str, Any]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(webui, wait_until="load")
        page.locator("#chat-input").wait_for(timeout=120_000)
        token = page.evaluate("() => localStorage.token")
        api = httpx.Client(base_url=webui, headers={"authorization": f"Bearer {token}"}, timeout=30)
        settings = api.get("/api/v1/users/user/settings").json() or {}
        ui = dict(settings.get("ui") or {})
        ui["params"] = {**(ui.get("params") or {}), "temperature": 0, "seed": 1}
        ui["version"] = api.get("/api/config").json().get("version")  # no "what's new" notice
        api.post("/api/v1/users/user/settings/update", json={**settings, "ui": ui}).raise_for_status()
        page.reload(wait_until="load")
        _dismiss(page)
        for i, text in enumerate(messages):
            box = page.locator("#chat-input")
            box.wait_for(timeout=60_000)
            box.click()
            box.fill(text)
            t0 = time.monotonic()
            page.keyboard.press("Enter")
            answer = _wait_answer(page, api, i, limit_s)
            answer["seconds"] = round(time.monotonic() - t0, 1)
            shot = shots / f"message-{i + 1}.png"
            page.screenshot(path=str(shot), full_page=True)
            answer["screenshot"] = str(shot)
            out.append(answer)
        browser.close()
    return out


def _dismiss(page: Any) -> None:
    """Close a notice dialog that would catch the clicks, if one is up."""
    for _ in range(5):
        dialog = page.locator('div[role="dialog"]')
        if dialog.count() == 0 or not dialog.first.is_visible():
            return
        button = dialog.first.locator("button").filter(has_text="Okay")
        if button.count():
            button.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def _wait_answer(page: Any, api: httpx.Client, index: int, limit_s: float) -> dict[str, Any]:
    """Poll Open WebUI's own record of the chat until answer ``index`` is done."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        page.wait_for_timeout(2000)
        chats = api.get("/api/v1/chats/").json()
        if not chats:
            continue
        chat = api.get(f"/api/v1/chats/{chats[0]['id']}").json()
        history = ((chat.get("chat") or {}).get("history") or {}).get("messages") or {}
        answers = sorted((m for m in history.values() if m.get("role") == "assistant"),
                         key=lambda m: m.get("timestamp", 0))
        if len(answers) > index and answers[index].get("done"):
            m = answers[index]
            return {"content": m.get("content", ""), "error": m.get("error")}
    raise RuntimeError(f"no answer {index + 1} within {limit_s:.0f} s")


def first_divergence(shown: str, body: dict[str, Any], alone: str) -> dict[str, Any]:
    """Where the target alone parts from the answer shown, with its top-2
    log-probability gap there (a small gap is a numeric near-tie)."""
    req = {"messages": body.get("messages"), "tools": body.get("tools") or None, "temperature": 0,
           "seed": (body.get("options") or {}).get("seed"), "max_tokens": 1024, "logprobs": True,
           "top_logprobs": 2}
    r = httpx.post(alone + "/v1/chat/completions", json={k: v for k, v in req.items() if v is not None},
                   timeout=1800)
    if r.status_code != 200:
        return {"error": r.text[:300]}
    steps = ((r.json()["choices"][0].get("logprobs") or {}).get("content")) or []
    text = ""
    for i, step in enumerate(steps):
        text += step.get("token", "")
        if not shown.startswith(text):
            top = [t["logprob"] for t in step.get("top_logprobs") or []]
            gap = top[0] - top[1] if len(top) >= 2 else None
            return {"token": i, "gap": gap, "near_tie": gap is not None and gap < 1.0}
    return {"token": len(steps), "gap": None, "near_tie": False}


def replay(recorded: Path, alone: str) -> list[dict[str, Any]]:
    """Every recorded chat request, sent unchanged (not streamed) to the target alone."""
    out = []
    for line in recorded.read_text().splitlines():
        rec = json.loads(line)
        if rec["path"] != "/api/chat":
            continue
        body = json.loads(rec["body"])
        body["stream"] = False
        r = httpx.post(alone + "/api/chat", json=body, timeout=1800)
        out.append({"body": body, "tools": len(body.get("tools") or []), "options": body.get("options"),
                    "messages": len(body.get("messages") or []), "status": r.status_code,
                    "content": (r.json().get("message") or {}).get("content") if r.status_code == 200 else r.text})
    return out


MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers and return the product.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def tool_round_trip(recorded: Path, proxy: str) -> dict[str, Any]:
    """Open WebUI's own request with the script's tool added: call, result, answer."""
    chats = [json.loads(json.loads(line)["body"]) for line in recorded.read_text().splitlines()
             if json.loads(line)["path"] == "/api/chat"]
    base = next(b for b in chats if b.get("tools"))
    ask = [{"role": "user", "content": "What is 17 times 24? Use the multiply tool, then tell me the "
                                       "result in a sentence."}]
    body = {**base, "stream": False, "tools": base["tools"] + [MULTIPLY], "messages": ask}
    t0 = time.monotonic()
    first = httpx.post(proxy + "/api/chat", json=body, timeout=1800).json()
    calls = (first.get("message") or {}).get("tool_calls") or []
    out: dict[str, Any] = {"calls": calls, "call_seconds": round(time.monotonic() - t0, 1),
                           "tools_offered": len(body["tools"])}
    if calls and calls[0]["function"]["name"] == "multiply":
        args = calls[0]["function"]["arguments"]
        result = str(int(args["a"]) * int(args["b"]))
        back = ask + [{"role": "assistant", "content": "", "tool_calls": calls},
                      {"role": "tool", "tool_name": "multiply", "content": result}]
        t0 = time.monotonic()
        second = httpx.post(proxy + "/api/chat", json={**body, "messages": back}, timeout=1800).json()
        out.update(result=result, answer=(second.get("message") or {}).get("content"),
                   answer_seconds=round(time.monotonic() - t0, 1))
    out["ok"] = bool(out.get("answer")) and out.get("result", "?") in out["answer"]
    return out


def run_profile(profile: str, venv: Path, out: Path, messages: list[str], limit_s: float) -> dict[str, Any]:
    logs = out / profile
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"profile": profile}
    with tightwad(["run", "--profile", profile], logs / "tightwad.log") as proxy:
        status = httpx.get(proxy + "/v1/tightwad/status", timeout=30).json()
        target_url = status["backends"]["target"]["url"]
        model = status["served_model"] + ":latest"
        report["mode"] = status["mode"]
        with recorder(proxy, logs / "recorder.log") as (relay, recorded), \
                open_webui(venv, relay, model, logs / "open-webui.log") as webui:
            # Playwright lives in Open WebUI's venv: the browser step runs there
            browse = subprocess.run(
                [str(venv / "bin" / "python"), __file__, "--browse", webui, "--out", str(logs),
                 "--limit", str(limit_s), *[a for m in messages for a in ("--message", m)]],
                capture_output=True, text=True, check=False)
            (logs / "browser.log").write_text(browse.stderr)
            if browse.returncode != 0:
                raise RuntimeError(f"the browser step failed: {browse.stderr.strip()[-600:]}")
            report["answers"] = json.loads(browse.stdout)
        report["tool_round_trip"] = tool_round_trip(recorded, proxy)
        alone_cfg = logs / "alone.toml"
        alone_cfg.write_text(f'[profiles.alone]\nmode = "direct"\nmax_tokens_limit = 4096\n'
                             f'[profiles.alone.target]\nbackend = "llama-server"\nurl = "{target_url}"\n')
        with tightwad(["run", "--config", str(alone_cfg), "--profile", "alone"], logs / "alone.log") as alone:
            report["replayed"] = replay(recorded, alone)
            chats = [r for r in report["replayed"] if r["tools"]]  # the user's chat requests
            shown = [a["content"] for a in report["answers"]]
            report["identical"] = [any(r["content"] == s for r in report["replayed"]) for s in shown]
            report["divergence"] = [None if same or i >= len(chats) else
                                    first_divergence(s, chats[i]["body"], alone)
                                    for i, (s, same) in enumerate(zip(shown, report["identical"]))]
    for r in report["replayed"]:
        r.pop("body")
    report["tools_sent"] = max((r["tools"] for r in chats), default=0)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="append", help="profile(s) to test (default: demo, speculative)")
    ap.add_argument("--out", type=Path, default=Path("e2e-out"), help="folder for screenshots, logs, report")
    ap.add_argument("--limit", type=float, default=1800, help="seconds one answer may take")
    ap.add_argument("--browse", metavar="URL", help=argparse.SUPPRESS)  # the browser step, in Open WebUI's venv
    ap.add_argument("--message", action="append", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.browse:
        print(json.dumps(browser_chat(args.browse, args.message, out, args.limit)))
        return 0
    venv = ensure_open_webui()
    messages = ["Write a haiku about caching.", "Write a Python function that reverses a string."]
    reports = [run_profile(p, venv, out, messages, args.limit) for p in args.profile or ["demo", "speculative"]]
    (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    ok = all(all(same or (d or {}).get("near_tie") for same, d in zip(r["identical"], r["divergence"]))
             and all(not a["error"] for a in r["answers"]) and r["tool_round_trip"]["ok"] for r in reports)
    for r in reports:
        print(f"{r['profile']} ({r['mode']}): " + "; ".join(
            f"message {i + 1}: {a['seconds']} s, " + ("identical" if same else f"differs at {d}")
            for i, (a, same, d) in enumerate(zip(r["answers"], r["identical"], r["divergence"]))) + f"; tools sent {r['tools_sent']}"
              f"; tool round trip {'ok' if r['tool_round_trip']['ok'] else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
