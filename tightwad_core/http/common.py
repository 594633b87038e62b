"""What the OpenAI and Ollama routes share: body decoding, limits, the
served-model check, auth, and turning mode output into text."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from tightwad_core.chat.tools import ToolFormat, format_for
from tightwad_core.config.profiles import Profile
from tightwad_core.errors import BackendError, BadRequest, NotFound, TightwadError, UnsupportedParam
from tightwad_core.roles import Backend, Mode

if TYPE_CHECKING:
    from tightwad_core.cluster.pool import RpcPool

#: Parameters that would let a request escape the proxy's limits or reach
#: into other clients' state on a llama.cpp server; never passed on.
DENIED_EXTRA = frozenset({"n_predict", "id_slot", "slot_id", "n_keep", "n_ctx", "n", "best_of"})
#: Parameters the proxy does not act on itself but passes on to the backend:
#: OpenAI's own, and the sampler settings llama.cpp, vLLM and Ollama share.
#: Anything else gets a 400 naming it, unless the profile's `passthrough` lists it.
PASSED_ON = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "parallel_tool_calls", "echo", "suffix", "metadata", "store",
    "reasoning_effort", "verbosity", "modalities", "prediction", "service_tier",
    "prompt_cache_key", "safety_identifier", "functions", "function_call",
    "min_p", "repeat_penalty", "repeat_last_n", "typical_p", "mirostat", "mirostat_tau",
    "mirostat_eta",
})


@dataclass
class ServerState:
    """Everything a request handler needs; one per running proxy."""

    profile_name: str
    profile: Profile
    mode: Mode
    backends: dict[str, Backend]
    api_key: str | None
    pool: RpcPool | None = None  # the target's rpc-server pool (cluster and combined mode)
    config_dir: Path | None = None  # folder of the config file (relative model paths start here)
    started: float = field(default_factory=time.time)
    _served: str | None = None
    _tool_format: ToolFormat | None = None
    _tool_format_known: bool = False

    def model_changed(self) -> None:
        """The target serves another model now (a swap): forget what was read from it."""
        self._served = None
        self._tool_format = None
        self._tool_format_known = False

    async def tool_format(self) -> ToolFormat | None:
        """The tool-call markup the target's chat template teaches (None: none, or unknown)."""
        if not self._tool_format_known:
            target = self.backends.get("target")
            try:
                with trio.fail_after(10):
                    info = await target.model_info() if target is not None else {}
            except (TightwadError, trio.TooSlowError):
                return None  # try again next time
            self._tool_format = format_for(info.get("chat_template"))
            self._tool_format_known = True
        return self._tool_format

    async def served_model(self) -> str:
        if self.profile.served_model:
            return self.profile.served_model
        if self._served is None:
            target = self.backends.get("target")
            if target is None:
                return self.profile_name
            try:
                with trio.fail_after(5):
                    self._served = await target.model_name()
            except Exception:  # noqa: BLE001 - the name is cosmetic until the target answers
                return self.profile.target.model if self.profile.target and self.profile.target.model else self.profile_name
        return self._served

    def public(self, exc: TightwadError) -> TightwadError:
        """``exc`` as a client may see it (see `scrub`; the log keeps the
        original). A backend failure says which pool worker dropped, if one did."""
        exc.message = self.scrub(exc.message)
        drop = self.pool.recent_drop() if self.pool is not None else None
        if drop and isinstance(exc, BackendError) and drop not in exc.message:
            exc.message = f"{exc.message}; {drop}"
        return exc

    def scrub(self, text: str) -> str:
        """``text`` with the backends' URLs and addresses replaced by their
        roles and no configured token in it."""
        from urllib.parse import urlsplit

        from tightwad_core.config.profiles import secret

        for role, backend in self.backends.items():
            url = str(getattr(backend, "base_url", "") or "").rstrip("/")
            if url:
                text = text.replace(url, f"<{role}>").replace(urlsplit(url).netloc, f"<{role}>")
            cfg = getattr(backend, "config", None)
            if cfg is not None:
                key = secret(cfg.api_key, cfg.api_key_env)
                if key:
                    text = text.replace(key, "<token>")
        if self.api_key:
            text = text.replace(self.api_key, "<token>")
        return text

    async def check_model(self, requested: str | None) -> str:
        served = await self.served_model()
        if requested in (None, "", served):
            return served
        # Ollama clients may add the implicit ":latest" tag.
        if requested.removesuffix(":latest") == served.removesuffix(":latest"):
            return served
        raise NotFound(f"model {requested!r} is not served here (this proxy serves {served!r})",
                       param="model", code="model_not_found")

def decode_body(raw: bytes | str, type_: type[Any]) -> Any:
    """Decode a JSON body into a Struct; errors become 400s naming the field."""
    if not raw.strip():
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = None
        if " - at `$." in text:
            text, _, where = text.partition(" - at `$.")
            param = where.rstrip("`")
        elif " - at `$`" in text:
            text = text.partition(" - at `$`")[0]
        raise BadRequest(f"invalid request: {text}" + (f" (field {param!r})" if param else ""),
                         param=param) from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc


def extras(raw: bytes | str, known: frozenset[str],
           allowed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Fields of the body that the typed decoder does not know: passed on
    when in `PASSED_ON` or ``allowed`` (the profile's `passthrough`), else a
    400 naming every one that is not."""
    data = msgspec.json.decode(raw)
    out = {k: v for k, v in data.items() if k not in known}
    for name in out:
        if name in DENIED_EXTRA:
            raise UnsupportedParam(f"parameter {name!r} is not accepted by this proxy", param=name)
    unknown = sorted(n for n in out if n not in PASSED_ON and n not in allowed)
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise UnsupportedParam(f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}: "
                               "not an OpenAI parameter this proxy passes on (a profile can "
                               f"pass it on to its backend with passthrough = [{names}])",
                               param=unknown[0])
    return out


def check_sampling(profile: Profile, max_tokens: int | None, temperature: float | None,
                   top_p: float | None, top_k: int | None = None) -> int:
    """Validate common sampling parameters; returns the effective max_tokens."""
    limit = profile.max_tokens_limit
    if max_tokens is None:
        max_tokens = limit
    elif max_tokens <= 0:
        raise BadRequest("max_tokens must be at least 1", param="max_tokens")
    elif max_tokens > limit:
        raise BadRequest(f"max_tokens {max_tokens} is above this proxy's limit of {limit}",
                         param="max_tokens")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", param="temperature")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadRequest("top_p must be in (0, 1]", param="top_p")
    if top_k is not None and top_k < 0:
        raise BadRequest("top_k must not be negative", param="top_k")
    return max_tokens


def check_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise BadRequest("at most 16 stop sequences", param="stop")
    if any(not s for s in items):
        raise BadRequest("stop sequences must not be empty", param="stop")
    return tuple(items)


#: Most tools one request may offer.
MAX_TOOLS = 128


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI/Ollama function tools, checked for shape; None when there are none."""
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tools per request", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": ...}}}}", param=f"tools[{i}]")
    return tools


def check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise BadRequest("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] needs a string 'role'", param=f"messages[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts",
                             param=f"messages[{i}].content")


_line_enc = msgspec.json.Encoder()
#: Characters JSON leaves raw but some line splitters (Python's splitlines)
#: treat as line ends; escaped so an event is always one line.
_SPLITTERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def json_line(obj: object) -> bytes:
    """Compact JSON that is guaranteed to stay on one line for any client."""
    data = _line_enc.encode(obj)
    for raw, esc in _SPLITTERS:
        if raw in data:
            data = data.replace(raw, esc)
    return data


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def first_and_rest(stream: AsyncGenerator[Any, None]) -> tuple[Any, AsyncGenerator[Any, None]]:
    """Pull the first item so errors before any output become HTTP errors."""
    first = await stream.__anext__()
    return first, stream

