"""The Ollama routes that describe the model: `/api/tags`, `/api/ps`,
`/api/show` and `/api/version` (on the same blueprint as `/api/chat`)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
from quart import Response, request

from tightwad_core.chat.tools import template_has_tools
from tightwad_core.errors import TightwadError
from tightwad_core.http.common import ServerState, decode_body
from tightwad_core.http.ollama import OLLAMA_API_VERSION, bp, state
from tightwad_core.http.serving import json_response


async def _details(st: ServerState) -> tuple[dict[str, Any], dict[str, Any]]:
    target = st.backends.get("target")
    info: dict[str, Any] = {}
    if target is not None:
        try:
            info = await target.model_info()
        except TightwadError:
            info = {}
    name = (info.get("name") or "").lower()
    family = "qwen2" if "qwen" in name else (name.split("-")[0] if name else "unknown")
    quant = next((q.upper() for q in ("q4_k_m", "q4_0", "q4_1", "q5_k_m", "q6_k", "q8_0", "f16", "f32")
                  if q in name), "unknown")
    params = info.get("parameters")
    psize = f"{params / 1e9:.1f}B" if isinstance(params, (int, float)) and params else "unknown"
    details = {"parent_model": "", "format": "gguf", "family": family, "families": [family],
               "parameter_size": psize, "quantization_level": quant}
    return details, info


@bp.get("/api/tags")
async def tags() -> Response:
    st = state()
    name = await st.served_model()
    details, info = await _details(st)
    return json_response({"models": [_model_entry(st, name, details, info)]})


def _model_entry(st: ServerState, name: str, details: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "model": name,
            "modified_at": datetime.fromtimestamp(st.started, timezone.utc).isoformat(),
            "size": int(info.get("size") or 0),
            "digest": hashlib.sha256(name.encode()).hexdigest(), "details": details}


@bp.get("/api/ps")
async def ps() -> Response:
    st = state()
    name = await st.served_model()
    details, info = await _details(st)
    entry = _model_entry(st, name, details, info)
    # the proxy keeps its backends loaded for as long as it runs (keep_alive is accepted
    # and has nothing to change): a far-off expiry, as Ollama reports for keep_alive -1
    forever = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=365 * 100)
    entry.update({"expires_at": forever.isoformat().replace("+00:00", "Z"), "size_vram": 0,
                  "context_length": info.get("context_length") or 0})
    return json_response({"models": [entry]})


class ShowBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False


@bp.post("/api/show")
async def show() -> Response:
    st = state()
    body = decode_body(await request.get_data(cache=False), ShowBody)
    await st.check_model(body.model or body.name)
    details, info = await _details(st)
    arch = details["family"]
    model_info: dict[str, Any] = {"general.architecture": arch}
    if info.get("context_length"):
        model_info[f"{arch}.context_length"] = info["context_length"]
    if info.get("parameters"):
        model_info["general.parameter_count"] = info["parameters"]
    return json_response({"modelfile": "", "parameters": "", "template": info.get("chat_template", ""),
                  "details": details, "model_info": model_info,
                  "capabilities": ["completion", *(["tools"] if template_has_tools(
                      info.get("chat_template")) else [])],
                  "modified_at": datetime.fromtimestamp(st.started, timezone.utc).isoformat()})


@bp.get("/api/version")
async def version() -> Response:
    return json_response({"version": OLLAMA_API_VERSION})
