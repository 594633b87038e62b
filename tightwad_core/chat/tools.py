"""Tool calls in the model's own markup, parsed into OpenAI's structure.

A model asked to call a tool writes the call in its family's format, which
its chat template teaches it; the format is picked from that template:

- ``hermes``: Hermes 2 Pro / Qwen 2.5+ (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call)
- ``llama3``: Llama 3.1+ JSON calls (``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, several separated by ``;``)
- ``mistral``: Mistral (``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``, or the newer
  ``[TOOL_CALLS]name[ARGS]{...}``)

Small models sometimes answer a tool request with the call as a bare JSON
object, often in a ```json fence, instead of their family's markup. When
the request offered tools, an answer that is exactly one such call (or a
list of them) to an offered function is taken as the call, in every family.

Parsing is pure text: the same answer gives the same calls whichever mode
produced it. Text before the markup stays the message's content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for."""

    name: str  # the function's name
    arguments: str  # its arguments as JSON text (OpenAI's form)
    id: str  # a call id the client echoes back in the tool message

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out

    def ollama(self) -> dict[str, Any]:
        try:
            args: Any = json.loads(self.arguments)
        except ValueError:
            args = self.arguments
        return {"function": {"name": self.name, "arguments": args}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(name=obj["name"], arguments=text, id=new_call_id())


def _json_values(text: str) -> Iterator[tuple[Any, int, int]]:
    """Every top-level JSON object in ``text`` with its span."""
    dec = json.JSONDecoder()
    i = 0
    while (start := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, start)
        except ValueError:
            i = start + 1
            continue
        yield obj, start, end
        i = end


def bare_json(text: str) -> bool | None:
    """Whether ``text`` may be a whole-answer JSON call (a ``{`` or a ```json
    fence opening one): True, False, or None while it cannot be told yet."""
    s = text.lstrip()
    if not s:
        return None
    if s.startswith("{"):
        return True
    if not s.startswith("```"):
        return None if "```".startswith(s) else False
    lang, nl, body = s[3:].partition("\n")
    if not nl:
        return None if "json".startswith(lang.strip()) else False
    if lang.strip() not in ("", "json"):
        return False
    body = body.lstrip()
    return None if not body else body.startswith("{")


def _bare_calls(text: str, allowed: frozenset[str]) -> list[ToolCall]:
    """The calls in a whole answer that is one JSON call or a list of them."""
    body = text.strip()
    if body.startswith("```"):
        body = body[3:].partition("\n")[2]
        body = body.rstrip().removesuffix("```")
    try:
        obj = json.loads(body)
    except ValueError:
        return []
    calls = [_call(o, "arguments") for o in (obj if isinstance(obj, list) else [obj])]
    if not calls or any(c is None or c.name not in allowed for c in calls):
        return []
    return [c for c in calls if c is not None]


class ToolFormat:
    """One family's markup: where calls start in a text and how to read them."""

    family = ""
    markers: tuple[str, ...] = ()  # text that opens the markup

    def start(self, text: str) -> int | None:
        """Index where tool markup begins in ``text`` (None: no markup yet)."""
        hits = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(hits) if hits else None

    def may_start(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of a marker."""
        best = 0
        for m in self.markers:
            for n in range(min(len(m) - 1, len(text)), best, -1):
                if text.endswith(m[:n]):
                    best = n
                    break
        return best

    def parse(self, markup: str) -> list[ToolCall]:
        raise NotImplementedError

    def split(self, text: str, allowed: frozenset[str] | None = None) -> tuple[str, list[ToolCall]]:
        """``(content, calls)``: the text before the markup and the calls in it.
        Markup that holds no readable call, or a call to a function not in
        ``allowed`` (the request's tools), is left in the content."""
        at = self.start(text)
        if at is None:
            calls = _bare_calls(text, allowed) if allowed and bare_json(text) else []
            return ("", calls) if calls else (text, [])
        calls = self.parse(text[at:])
        if not calls or (allowed is not None and any(c.name not in allowed for c in calls)):
            return text, []
        return text[:at].rstrip(), calls


class HermesFormat(ToolFormat):
    family = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, markup: str) -> list[ToolCall]:
        out = []
        for body in self._block.findall(markup):
            for obj, _, _ in _json_values(body):
                call = _call(obj, "arguments")
                if call is not None:
                    out.append(call)
                    break
        return out


class Llama3Format(ToolFormat):
    family = "llama3"
    # no markers: a call is the whole answer, so start() and may_start() look at its head

    def start(self, text: str) -> int | None:
        # a JSON call is the whole answer (after optional white space or the tag)
        stripped = text.lstrip()
        lead = len(text) - len(stripped)
        if stripped.startswith("<|python_tag|>") or stripped.startswith("{"):
            return lead
        return None

    def may_start(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or "<|python_tag|>".startswith(stripped):
            return len(text)
        return 0

    def parse(self, markup: str) -> list[ToolCall]:
        body = markup.strip().removeprefix("<|python_tag|>")
        out = []
        for obj, _, _ in _json_values(body):
            call = _call(obj, "parameters")
            if call is not None:
                out.append(call)
        return out


class MistralFormat(ToolFormat):
    family = "mistral"
    markers = ("[TOOL_CALLS]",)

    def parse(self, markup: str) -> list[ToolCall]:
        out: list[ToolCall] = []
        for part in markup.split("[TOOL_CALLS]")[1:]:
            part = part.strip()
            if "[ARGS]" in part and not part.startswith("["):  # name[ARGS]{...}
                name, _, rest = part.partition("[ARGS]")
                for obj, _, _ in _json_values(rest):
                    out.append(ToolCall(name=name.strip(), arguments=json.dumps(obj, ensure_ascii=False),
                                        id=new_call_id()))
                    break
                continue
            try:
                items, _ = json.JSONDecoder().raw_decode(part)
            except ValueError:
                items = [obj for obj, _, _ in _json_values(part)]
            for obj in items if isinstance(items, list) else [items]:
                call = _call(obj, "arguments")
                if call is not None:
                    out.append(call)
        return out


FORMATS: dict[str, type[ToolFormat]] = {
    f.family: f for f in (HermesFormat, Llama3Format, MistralFormat)}


def format_for(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None if it has no tools section."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HermesFormat()
    if "[TOOL_CALLS]" in template:
        return MistralFormat()
    if "<|python_tag|>" in template or ("tools" in template and "<|start_header_id|>" in template):
        return Llama3Format()
    return None


def openai_from_ollama(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls`` (arguments as objects) in OpenAI's form."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        args = fn.get("arguments", {})
        out.append(ToolCall(name=str(fn.get("name", "")),
                            arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                            id=str(call.get("id") or new_call_id())).openai(i))
    return out


def merge_deltas(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed OpenAI tool-call deltas (by ``index``, arguments in fragments)
    joined into whole calls."""
    calls: dict[int, dict[str, Any]] = {}
    for part in parts:
        i = int(part.get("index", len(calls)))
        call = calls.setdefault(i, {"index": i, "id": None, "type": "function",
                                    "function": {"name": "", "arguments": ""}})
        if part.get("id"):
            call["id"] = part["id"]
        fn = part.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]
    for call in calls.values():
        call["id"] = call["id"] or new_call_id()
    return [calls[i] for i in sorted(calls)]


def ollama_from_openai(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls in Ollama's form (arguments as an object)."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        out.append(ToolCall(name=str(fn.get("name", "")), arguments=str(fn.get("arguments") or "{}"),
                            id=str(call.get("id") or "")).ollama())
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-form messages as chat templates expect them: tool-call arguments
    as objects (templates write ``arguments | tojson``) and no null content."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        calls = []
        for call in m.get("tool_calls") or ():
            call = dict(call)
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # not JSON: the template gets the text
            call["function"] = fn
            calls.append(call)
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    """The function names an OpenAI/Ollama ``tools`` list declares."""
    out = set()
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.add(fn["name"])
    return frozenset(out)


def template_has_tools(template: str | None) -> bool:
    """Whether a chat template renders a tools section (Ollama's `tools` capability)."""
    return bool(template) and format_for(template) is not None


class ToolStream:
    """Splits a streamed answer into content to release now and tool calls at the end.

    ``feed(text)`` returns the content that can go out (text that might be the
    start of tool markup is held back); ``finish()`` returns the remaining
    content and the calls, once the answer is complete.
    """

    def __init__(self, fmt: ToolFormat, allowed: frozenset[str] | None = None) -> None:
        self.fmt = fmt
        self.allowed = allowed  # the request's tool names
        self.text = ""  # the whole answer so far
        self.sent = 0  # characters of it released as content
        self.markup = False  # tool markup has begun: nothing more goes out as content

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.markup:
            return ""
        at = self.fmt.start(self.text)
        bare = bare_json(self.text) if self.allowed and self.sent == 0 else False
        if at is not None or bare:
            self.markup = True  # held to the end: it may be calls
            safe = 0 if at is None else at
        elif bare is None:
            safe = 0  # too early to tell
        else:
            safe = len(self.text) - self.fmt.may_start(self.text)
        out = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.fmt.split(self.text, self.allowed)
        if not calls:
            return self.text[self.sent:], []
        return content[self.sent:] if len(content) > self.sent else "", calls
