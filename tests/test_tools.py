"""Tool-call markup of each model family, parsed into one structure."""

from __future__ import annotations

import json

import pytest

from tightwad_core.chat.tools import (
    HermesFormat,
    Llama3Format,
    MistralFormat,
    ToolStream,
    format_for,
    tool_names,
)

WEATHER = '{"city": "Paris", "unit": "celsius"}'
ALLOWED = frozenset({"get_weather", "add"})

CASES = [
    # (format, model output, expected content, expected [(name, arguments)])
    (HermesFormat(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER
     + '}\n</tool_call>', "Let me check.", [("get_weather", WEATHER)]),
    (HermesFormat(), '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 24}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER + '}\n</tool_call>', "",
     [("add", '{"a": 17, "b": 24}'), ("get_weather", WEATHER)]),
    (HermesFormat(), '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', "",  # cut at max_tokens
     [("add", '{"a": 1, "b": 2}')]),
    (HermesFormat(), "17 x 24 = 408.", "17 x 24 = 408.", []),
    (HermesFormat(), "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    (HermesFormat(), '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a declared tool
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    (Llama3Format(), '{"name": "get_weather", "parameters": ' + WEATHER + "}", "",
     [("get_weather", WEATHER)]),
    (Llama3Format(), '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "parameters": ' + WEATHER + "}", "",
     [("add", '{"a": 1, "b": 2}'), ("get_weather", WEATHER)]),
    (Llama3Format(), "The weather is fine.", "The weather is fine.", []),
    (Llama3Format(), '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),  # JSON, no call
    (MistralFormat(), '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER + "}]", "",
     [("get_weather", WEATHER)]),
    (MistralFormat(), 'Sure. [TOOL_CALLS]add[ARGS]{"a": 3, "b": 4}', "Sure.", [("add", '{"a": 3, "b": 4}')]),
    (MistralFormat(), "No tools needed.", "No tools needed.", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_split(fmt, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got = fmt.split(text, ALLOWED)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == [(n, json.loads(a)) for n, a in calls]
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_stream_matches_split(fmt, text: str, content: str, calls: list[tuple[str, str]],
                              step: int) -> None:
    """Fed in pieces, the released content never shows markup, and the end
    result is the same as parsing the whole answer."""
    stream = ToolStream(fmt, ALLOWED)
    out = "".join(stream.feed(text[i:i + step]) for i in range(0, len(text), step))
    rest, got = stream.finish()
    if calls:
        assert (out + rest).rstrip() == content
        assert not any(m in out for m in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"))
    else:
        assert out + rest == text
    assert [c.name for c in got] == [n for n, _ in calls]


@pytest.mark.parametrize("template, family", [
    ("{% if tools %}<tools>{{ tools }}</tools> ... <tool_call>{% endif %}", "hermes"),
    ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|>{% if tools %}...<|python_tag|>{% endif %}", "llama3"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", None),
    (None, None),
])
def test_format_from_template(template: str | None, family: str | None) -> None:
    fmt = format_for(template)
    assert (None if fmt is None else fmt.family) == family


def test_tool_names() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}},
             {"type": "function", "function": {"name": "get_weather"}}, {"bogus": 1}]
    assert tool_names(tools) == {"add", "get_weather"}
    assert tool_names(None) == frozenset()


BARE = [
    # a small model's answer in place of its family's markup: one call, taken when offered
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
     [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "add", "arguments": {"a": 1, "b": 2}}', [("add", '{"a": 1, "b": 2}')]),
    ('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]',
     []),  # a list must open with "{" or a fence to be held: this one is text
    ('```json\n{"name": "delete_all", "arguments": {}}\n```', []),  # not offered
    ("```python\nprint('hi')\n```", []),
    ('Here is JSON: {"name": "add", "arguments": {}}', []),  # not the whole answer
]


@pytest.mark.parametrize("text, calls", BARE)
@pytest.mark.parametrize("fmt", [HermesFormat(), MistralFormat(), Llama3Format()])
def test_bare_json_call(fmt, text: str, calls: list[tuple[str, str]]) -> None:
    content, got = fmt.split(text, ALLOWED)
    assert [(c.name, json.loads(c.arguments)) for c in got] == [(n, json.loads(a)) for n, a in calls]
    assert content == ("" if calls else text)
    stream = ToolStream(fmt, ALLOWED)
    out = "".join(stream.feed(text[i:i + 2]) for i in range(0, len(text), 2))
    rest, streamed = stream.finish()
    assert [c.name for c in streamed] == [c.name for c in got]
    assert (out + rest) == content if calls else out + rest == text


def test_code_answers_stream_while_tools_are_offered() -> None:
    """A fence that is not JSON is released as it comes, not held to the end."""
    stream = ToolStream(HermesFormat(), ALLOWED)
    assert stream.feed("``") == "" and stream.feed("`") == "" and stream.feed("js") == ""
    assert stream.feed("x\n") == "```jsx\n"  # not JSON: out it goes, the rest as it comes
    assert stream.feed("const a = 1;\n") == "const a = 1;\n"
