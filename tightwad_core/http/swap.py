"""Hot swap: ``POST /v1/tightwad/swap`` with ``{"model": "@name" | "path.gguf"}``
serves another GGUF on the running target without restarting the proxy.

The model must be a built-in (``@name``) or a ``.gguf`` file inside a folder
the profile already uses (the set-up cache's models, the current target's
folder, the config file's folder): a request never names an arbitrary path.
A speculative profile keeps its draft, so the new target must have the same
vocabulary. The backend does the swap (see its ``swap``); the answer lists
the steps it took.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import trio

from tightwad_core.errors import BackendError, BadRequest, Forbidden, NotFound, TightwadError
from tightwad_core.http.common import ServerState

log = logging.getLogger("tightwad.swap")


class SwapRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str


class Conflict(TightwadError):
    status = 409
    type = "conflict_error"


def allowed_dirs(st: ServerState) -> list[Path]:
    from tightwad_core.runtime.catalog import models_dir

    dirs = [models_dir()]
    target = st.backends.get("target")
    current = getattr(target, "model_file", None)
    if current is not None:
        dirs.append(Path(current).resolve().parent)
    if st.config_dir is not None:
        dirs.append(st.config_dir.resolve())
    return dirs


def resolve(st: ServerState, ref: str) -> Path:
    from tightwad_core.runtime.catalog import resolve_model

    try:
        path = resolve_model(ref, st.config_dir or Path.cwd()).resolve()
    except ValueError as exc:
        raise BadRequest(str(exc), param="model") from None
    if path.suffix.lower() != ".gguf":
        raise BadRequest(f"{ref!r} is not a .gguf file", param="model")
    if not any(path.is_relative_to(d) for d in allowed_dirs(st)):
        raise Forbidden(f"{ref!r} is outside the model folders this profile uses (the set-up "
                        "cache, the target's folder, the config's folder)")
    if not path.is_file():
        raise NotFound(f"model file {ref!r} does not exist", param="model")
    return path


async def swap(st: ServerState, body: bytes | str) -> dict[str, Any]:
    try:
        req = msgspec.json.decode(body, type=SwapRequest)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"expected {{\"model\": \"@name or path.gguf\"}}: {exc}") from None
    target: Any = st.backends.get("target")
    if target is None or not callable(getattr(target, "swap", None)):
        raise BadRequest("this profile's target cannot be swapped (it is not launched here)")
    path = resolve(st, req.model)
    current = getattr(target, "model_file", None)
    if current is not None and Path(current).resolve() == path:
        return {"model": path.stem, "steps": [f"already serving {path.name}"]}
    if "draft" in st.backends and current is not None:
        from tightwad_core.vocab import file_fingerprint

        old, new = await trio.to_thread.run_sync(lambda: (file_fingerprint(current),
                                                          file_fingerprint(path)))
        if old != new:
            raise Conflict(f"{path.name} has another vocabulary than {Path(current).name}: the "
                           "draft's token ids would not map; swap to a model of the same family")
    steps: list[str] = []

    def say(line: str) -> None:
        log.info("swap: %s", line)
        steps.append(line)

    from tightwad_core.runtime.procs import StartupError

    with trio.CancelScope(shield=True):  # a client that hangs up does not leave a half swap
        try:
            await target.swap(path, say)
        except StartupError as exc:
            raise BackendError(f"swap to {path.name} failed: {exc}") from None
    st.model_changed()
    return {"model": path.stem, "steps": steps}
