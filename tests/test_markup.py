"""The streaming markup filter: think blocks and text-protocol tool calls out of the answer."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismd.agent.markup import (
    MAX_JSON_HOLD,
    FilterOutput,
    MalformedCall,
    MarkupFilter,
    ParsedCall,
    malformed_feedback,
    repair_json,
)

TOOLS = frozenset({"search", "read_file", "write_file", "get_weather"})
FORBIDDEN = ("<tool_call", "</tool_call>", "<think>", "<arg_key>", "<function=")


@dataclass
class Case:
    id: str
    src: str
    text: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reasoning: str = ""
    malformed: int = 0
    tools: frozenset[str] | None = TOOLS
    parse_tools: bool = True
    starts_in_think: bool = False

    def make(self) -> MarkupFilter:
        return MarkupFilter(
            self.tools, parse_tools=self.parse_tools, starts_in_think=self.starts_in_think
        )


CORPUS = [
    Case(
        "hermes",
        'Let me look that up.\n<tool_call>\n{"name": "search", "arguments": '
        '{"query": "python asyncio"}}\n</tool_call>',
        "Let me look that up.\n",
        [("search", {"query": "python asyncio"})],
    ),
    Case(
        "prismd-protocol",
        '<tool_call>{"tool": "read_file", "args": {"path": "src/main.py"}}</tool_call>',
        "",
        [("read_file", {"path": "src/main.py"})],
    ),
    Case(
        "arguments-as-string",
        '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x < y\\"}"}</tool_call>',
        "",
        [("search", {"query": "x < y"})],
    ),
    Case(
        "parameters-and-input-keys",
        'A <tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call> B '
        '<tool_call>{"tool": "search", "input": {"query": "q"}}</tool_call> C',
        "A  B  C",
        [("get_weather", {"city": "Oslo"}), ("search", {"query": "q"})],
    ),
    Case(
        "openai-function-shape",
        '<tool_call>{"type": "function", "function": {"name": "search", '
        '"arguments": "{\\"query\\": \\"f\\"}"}}</tool_call>',
        "",
        [("search", {"query": "f"})],
    ),
    Case(
        "glm-arg-key-value",
        "I'll check the forecast.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
        "</tool_call>",
        "I'll check the forecast.\n",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    Case(
        "glm-json-values",
        '<tool_call>search<arg_key>query</arg_key><arg_value>"quoted value"</arg_value>'
        '<arg_key>filters</arg_key><arg_value>{"lang": "en",}</arg_value>'
        "<arg_key>note</arg_key><arg_value>not json {</arg_value></tool_call>",
        "",
        [("search", {"query": "quoted value", "filters": {"lang": "en"}, "note": "not json {"})],
    ),
    Case(
        "qwen3-coder-wrapped",
        "Writing the notes.\n<tool_call>\n<function=write_file>\n<parameter=path>\nnotes.md\n"
        "</parameter>\n<parameter=content>\n# Notes\n\nfirst line\n</parameter>\n</function>\n"
        "</tool_call>",
        "Writing the notes.\n",
        [("write_file", {"path": "notes.md", "content": "# Notes\n\nfirst line"})],
    ),
    Case(
        "qwen3-coder-bare-function",
        "I will read it.\n<function=read_file>\n<parameter=path>\nREADME.md\n</parameter>\n"
        "</function>\nThen summarise.",
        "I will read it.\n\nThen summarise.",
        [("read_file", {"path": "README.md"})],
    ),
    Case(
        "bare-json-call",
        'Searching now: {"tool": "search", "args": {"query": "rust {braces} \\"quoted\\""}}',
        "Searching now: ",
        [("search", {"query": 'rust {braces} "quoted"'})],
    ),
    Case(
        "bare-json-call-then-prose",
        '{ "name" : "read_file", "arguments": {"path": "a.txt"} }\nI read the file.',
        "\nI read the file.",
        [("read_file", {"path": "a.txt"})],
    ),
    Case(
        "fenced-json-call",
        'Calling the tool:\n```json\n{"name": "search", "arguments": {"query": "weather"}}\n```\n'
        "Done.",
        "Calling the tool:\n\nDone.",
        [("search", {"query": "weather"})],
    ),
    Case(
        "fenced-tool-call-info",
        '```tool_call\n{"tool": "get_weather", "args": {"city": "Rome"}}\n```',
        "",
        [("get_weather", {"city": "Rome"})],
    ),
    Case(
        "fence-not-closed-after-call",
        '```\n{"tool": "search", "args": {"query": "z"}}\nmore',
        "```\n\nmore",
        [("search", {"query": "z"})],
    ),
    Case(
        "prose-json-example",
        'A user record looks like {"name": "Alice", "age": 3}. Done.',
        'A user record looks like {"name": "Alice", "age": 3}. Done.',
    ),
    Case(
        "fenced-json-example",
        'Example:\n```json\n{"name": "Alice", "tags": ["a", "b"]}\n```\n',
        'Example:\n```json\n{"name": "Alice", "tags": ["a", "b"]}\n```\n',
    ),
    Case(
        "tool-schema-in-prose",
        'The tool is {"name": "search", "description": "Search the web", '
        '"parameters": {"type": "object"}}.',
        'The tool is {"name": "search", "description": "Search the web", '
        '"parameters": {"type": "object"}}.',
    ),
    Case(
        "python-fence",
        '```python\nconfig = {"tool": "hammer", "args": {}}\nprint(f"{config}")\n'
        'd = {"name": "search"}\n```',
        '```python\nconfig = {"tool": "hammer", "args": {}}\nprint(f"{config}")\n'
        'd = {"name": "search"}\n```',
    ),
    Case(
        "js-fence",
        '```js\nconst o = { name: "x", f() { return `${a}` } };\nif (a<b && c>d) {}\n```',
        '```js\nconst o = { name: "x", f() { return `${a}` } };\nif (a<b && c>d) {}\n```',
    ),
    Case(
        "html-ish-prose",
        "Use <b>bold</b> and a < b > c, also x<y and <tomato>, <to be> <tool>, "
        "<thinker> and <functional>. Contact <john@example.com>.",
        "Use <b>bold</b> and a < b > c, also x<y and <tomato>, <to be> <tool>, "
        "<thinker> and <functional>. Contact <john@example.com>.",
    ),
    Case(
        "inline-code",
        "Run `ls -la` then ``code`` and ```inline``` or ````quad````.",
        "Run `ls -la` then ``code`` and ```inline``` or ````quad````.",
    ),
    Case(
        "think-block",
        "<think>\nThe user wants weather.\n</think>\nIt is sunny.",
        "\nIt is sunny.",
        reasoning="\nThe user wants weather.\n",
    ),
    Case(
        "thinking-then-call",
        "<thinking>plan: search</thinking>Sure.<tool_call>"
        '{"name":"search","arguments":{"query":"q"}}</tool_call>',
        "Sure.",
        [("search", {"query": "q"})],
        reasoning="plan: search",
    ),
    Case(
        "starts-in-think",
        "Okay, the user asks for a greeting.\n</think>\n\nHello!",
        "\n\nHello!",
        reasoning="Okay, the user asks for a greeting.\n",
        starts_in_think=True,
    ),
    Case(
        "unclosed-think",
        "Answer first.<think>still thinking",
        "Answer first.",
        reasoning="still thinking",
    ),
    Case(
        "multiple-calls",
        'First <tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>\n'
        'then <tool_call>{"name": "read_file", "arguments": {"path": "b"}}</tool_call>\n'
        '{"tool": "get_weather", "args": {"city": "Lima"}}',
        "First \nthen \n",
        [
            ("search", {"query": "a"}),
            ("read_file", {"path": "b"}),
            ("get_weather", {"city": "Lima"}),
        ],
    ),
    Case(
        "call-then-prose",
        '<tool_call>{"name": "search", "arguments": {}}</tool_call>\nI will wait for results.',
        "\nI will wait for results.",
        [("search", {})],
    ),
    Case(
        "unknown-tool",
        'Ok.<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
        "Ok.",
        malformed=1,
    ),
    Case(
        "unknown-tool-bare-json-is-text",
        '{"tool": "hammer", "args": {"nail": 1}}',
        '{"tool": "hammer", "args": {"nail": 1}}',
    ),
    Case(
        "repaired-json",
        '<tool_call>{"name": "write_file", "arguments": {"path": "a.txt", '
        '"content": "line1\nline2\tend",},}</tool_call>',
        "",
        [("write_file", {"path": "a.txt", "content": "line1\nline2\tend"})],
    ),
    Case(
        "missing-final-brace",
        '<tool_call>{"name": "search", "arguments": {"query": "x"}</tool_call>',
        "",
        [("search", {"query": "x"})],
    ),
    Case(
        "unclosed-tool-call",
        'Let me check.<tool_call>{"name": "search", "arguments": {"query": "y"}}',
        "Let me check.",
        [("search", {"query": "y"})],
    ),
    Case(
        "truncated-close-tag",
        '<tool_call>{"name": "search", "arguments": {"query": "t"}}</tool_ca',
        "",
        [("search", {"query": "t"})],
    ),
    Case(
        "unclosed-bare-json",
        'ok {"name": "search", "arguments": {"query": "w"}',
        "ok ",
        [("search", {"query": "w"})],
    ),
    Case(
        "beyond-repair",
        '<tool_call>{"name": "search", "arguments": {"query": x y z}}</tool_call> sorry',
        " sorry",
        malformed=1,
    ),
    Case(
        "prose-inside-tool-call",
        "<tool_call>I think I should search the web</tool_call>",
        "",
        malformed=1,
    ),
    Case(
        "braces-in-strings",
        '<tool_call>{"name":"write_file","arguments":{"path":"x.json",'
        '"content":"{\\"a\\": \\"}\\"}\\n<tool_call>"}}</tool_call>',
        "",
        [("write_file", {"path": "x.json", "content": '{"a": "}"}\n<tool_call>'})],
    ),
    Case(
        "stray-closing-tags",
        "Done.</tool_call> ok</think>",
        "Done. ok",
    ),
    Case(
        "json-array-prose",
        'Items: [{"name": "x"}, {"name": "y"}] and {} and { } and {"a": {"b": 1}}',
        'Items: [{"name": "x"}, {"name": "y"}] and {} and { } and {"a": {"b": 1}}',
    ),
    Case(
        "no-tool-names",
        'Plain {"tool": "search", "args": {}} stays; <tool_call>{"name": "anything"}</tool_call>',
        'Plain {"tool": "search", "args": {}} stays; ',
        [("anything", {})],
        tools=None,
    ),
    Case(
        "native-tools-only-think",
        '<think>r</think>Here: {"tool": "search", "args": {}} and <b>x</b>',
        'Here: {"tool": "search", "args": {}} and <b>x</b>',
        reasoning="r",
        parse_tools=False,
    ),
    Case(
        "markdown-answer",
        "# Title\n\n- item *one*\n- item **two**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "> quote with 3 > 2 and 1 < 2\n",
        "# Title\n\n- item *one*\n- item **two**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "> quote with 3 > 2 and 1 < 2\n",
    ),
]


def run(case: Case, pieces: list[str]) -> tuple[list[FilterOutput], MarkupFilter]:
    f = case.make()
    outs = [f.feed(p) for p in pieces]
    outs.append(f.finish())
    return outs, f


def summary(outs: list[FilterOutput], f: MarkupFilter) -> tuple[Any, ...]:
    return (
        "".join(o.text for o in outs),
        "".join(o.reasoning for o in outs),
        [(c.name, c.args, c.raw) for c in f.calls],
        [(m.raw, m.error) for m in f.malformed],
    )


def split_at(s: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(s)]
    return [s[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_corpus(case: Case) -> None:
    outs, f = run(case, [case.src])
    text, reasoning, _, _ = summary(outs, f)
    assert text == case.text
    assert reasoning == case.reasoning
    assert [(c.name, c.args) for c in f.calls] == case.calls
    assert len(f.malformed) == case.malformed, f.malformed
    for c in f.calls:
        assert c.raw and c.raw in case.src
    for m in f.malformed:
        assert m.raw in case.src and m.error
    # one character per delta gives the same
    assert summary(*run(case, list(case.src))) == summary(outs, f)


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_corpus_char_by_char_never_leaks(case: Case) -> None:
    if not case.parse_tools:
        return
    outs, _ = run(case, list(case.src))
    for o in outs:
        for bad in FORBIDDEN:
            assert bad not in o.text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_split_gives_same_result(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CORPUS))
    cuts = data.draw(st.lists(st.integers(0, len(case.src)), max_size=25))
    outs, f = run(case, split_at(case.src, cuts))
    assert summary(outs, f) == summary(*run(case, [case.src]))
    if case.parse_tools:
        text = "".join(o.text for o in outs)
        for bad in FORBIDDEN:
            assert bad not in text


# Random prose rich in markup characters, that names no known tool.
PROSE_TOKENS = [
    "<", ">", "{", "}", '"', "`", "``", "```", "a", "b", "x", " ", "\n", ":", ",", "\\",
    "name", "tool", "args", "json", "<b>", "</b>", "<think>", "</think>", "<thinking>",
    '{"name": ', '{"tool":"', '"s', "se", "```json\n", "<tool", "<func", "</", "[", "]",
]  # fmt: skip
prose = st.lists(st.sampled_from(PROSE_TOKENS), max_size=60).map("".join)
THINK_TAG = re.compile(r"</?think(?:ing)?>")


def strip_think(s: str, starts_in_think: bool = False) -> tuple[str, str]:
    """Reference: text and reasoning of s when only think tags are markup."""
    text: list[str] = []
    reasoning: list[str] = []
    inside = starts_in_think
    pos = 0
    for m in THINK_TAG.finditer(s):
        (reasoning if inside else text).append(s[pos : m.start()])
        inside = not m.group().startswith("</")
        pos = m.end()
    (reasoning if inside else text).append(s[pos:])
    return "".join(text), "".join(reasoning)


@settings(max_examples=200, deadline=None)
@given(prose, st.lists(st.integers(0, 400), max_size=20), st.booleans(), st.booleans())
def test_prose_without_calls_passes_unchanged(
    src: str, cuts: list[int], parse_tools: bool, starts_in_think: bool
) -> None:
    f = MarkupFilter(TOOLS, parse_tools=parse_tools, starts_in_think=starts_in_think)
    outs = [f.feed(p) for p in split_at(src, [c for c in cuts if c <= len(src)])]
    outs.append(f.finish())
    text = "".join(o.text for o in outs)
    reasoning = "".join(o.reasoning for o in outs)
    assert (text, reasoning) == strip_think(src, starts_in_think)
    assert f.calls == [] and f.malformed == []


@settings(max_examples=200, deadline=None)
@given(prose)
def test_prose_streams_char_by_char_like_unsplit(src: str) -> None:
    one = MarkupFilter(TOOLS)
    whole = [one.feed(src), one.finish()]
    many = MarkupFilter(TOOLS)
    outs = [many.feed(c) for c in src] + [many.finish()]
    assert "".join(o.text for o in outs) == "".join(o.text for o in whole)
    assert "".join(o.reasoning for o in outs) == "".join(o.reasoning for o in whole)


json_scalars = st.none() | st.booleans() | st.integers() | st.text('ab<>{}[]"\\`\n :,/é')
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("kv<{", max_size=4), inner),
    max_leaves=8,
)
FORMATS = ["hermes", "protocol", "string-args", "bare", "fenced", "glm", "function"]


def render(fmt: str, name: str, args: dict[str, Any], ascii_only: bool) -> str:
    def dumps(v: Any) -> str:
        return json.dumps(v, ensure_ascii=ascii_only)

    if fmt == "hermes":
        return f'<tool_call>\n{{"name": "{name}", "arguments": {dumps(args)}}}\n</tool_call>'
    if fmt == "protocol":
        return f'<tool_call>{{"tool": "{name}", "args": {dumps(args)}}}</tool_call>'
    if fmt == "string-args":
        return f'<tool_call>{{"name": "{name}", "arguments": {dumps(dumps(args))}}}</tool_call>'
    if fmt == "bare":
        return f'{{"tool": "{name}", "args": {dumps(args)}}}'
    if fmt == "fenced":
        return f'```json\n{{"name": "{name}", "arguments": {dumps(args)}}}\n```'
    if fmt == "glm":
        pairs = "".join(
            f"<arg_key>{k}</arg_key><arg_value>{dumps(v)}</arg_value>" for k, v in args.items()
        )
        return f"<tool_call>{name}\n{pairs}\n</tool_call>"
    params = "".join(f"<parameter={k}>\n{dumps(v)}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(FORMATS),
    st.sampled_from(sorted(TOOLS)),
    st.dictionaries(st.sampled_from(["path", "query", "n", "opts"]), json_values, max_size=4),
    st.booleans(),
    st.lists(st.integers(0, 600), max_size=15),
)
def test_generated_calls_round_trip(
    fmt: str, name: str, args: dict[str, Any], ascii_only: bool, cuts: list[int]
) -> None:
    markup = render(fmt, name, args, ascii_only)
    src = "Before it. " + markup + " After it."
    f = MarkupFilter(TOOLS)
    outs = [f.feed(p) for p in split_at(src, [c for c in cuts if c <= len(src)])]
    outs.append(f.finish())
    assert "".join(o.text for o in outs) == "Before it.  After it."
    assert f.malformed == []
    assert [(c.name, c.args) for c in f.calls] == [(name, args)]
    assert f.calls[0].raw == markup


def test_prose_is_released_in_the_same_feed() -> None:
    f = MarkupFilter(TOOLS)
    for ch in "Hello world, this is prose. ":
        assert f.feed(ch) == FilterOutput(ch, "")
    assert f.finish() == FilterOutput()


def test_holds_only_what_could_open_markup() -> None:
    f = MarkupFilter(TOOLS)
    assert f.feed("Hello <to").text == "Hello "
    assert f.feed("mato> and <").text == "<tomato> and "
    assert f.feed("b>").text == "<b>"
    assert f.feed("a <").text == "a "
    assert f.feed(" b").text == "< b"
    assert f.feed("x<").text == "x"
    assert f.feed("y").text == "<y"
    assert f.feed("<think").text == ""
    assert f.feed(">hm").text == ""
    assert f.feed("m</th").reasoning == "m"
    out = f.feed("ink>ok")
    assert out == FilterOutput("ok", "")


def test_json_released_as_soon_as_it_is_not_a_call() -> None:
    f = MarkupFilter(TOOLS)
    assert f.feed("x {").text == "x "
    assert f.feed('"a').text == '{"a'
    assert f.feed(' {"to').text == " "
    assert f.feed('ol": "se').text == ""  # could still be {"tool": "search"
    assert f.feed("x").text == '{"tool": "sex'
    assert f.feed(' {"name": "read_file"').text == " "  # a candidate: held until it closes
    assert f.feed(', "extra": 1}').text == '{"name": "read_file", "extra": 1}'
    assert f.finish() == FilterOutput()
    assert f.calls == []


def test_fence_released_as_soon_as_it_is_not_a_call() -> None:
    f = MarkupFilter(TOOLS)
    assert f.feed("```").text == ""
    assert f.feed("py").text == "```py"
    assert f.feed("thon\n").text == "thon\n"
    f = MarkupFilter(TOOLS)
    assert f.feed("```json\n").text == ""
    assert f.feed('{"na').text == ""
    assert f.feed('me": "Ali').text == '```json\n{"name": "Ali'
    f = MarkupFilter(TOOLS)
    assert f.feed('```json\n{"name": "search", "arguments": {}}\n``').text == ""
    assert f.feed("`\nok").text == "\nok"
    assert [c.name for c in f.calls] == ["search"]


def test_tools_not_parsed_without_tool_names_or_parse_tools() -> None:
    f = MarkupFilter(None)
    assert f.feed('{"tool"').text == '{"tool"'
    assert f.feed("```json\n").text == "```json\n"
    f = MarkupFilter(TOOLS, parse_tools=False)
    assert f.feed("<tool_call>{").text == "<tool_call>{"
    assert f.feed("<think>a</think>b") == FilterOutput("b", "a")


def test_large_candidate_is_released_after_the_bound() -> None:
    src = '{"tool": "search", "args": {"query": "' + "x" * (MAX_JSON_HOLD + 5000) + "\n and more"
    f = MarkupFilter(TOOLS)
    released = 0
    held_max = 0
    fed = 0
    for i in range(0, len(src), 1000):
        released += len(f.feed(src[i : i + 1000]).text)
        fed = min(len(src), i + 1000)
        held_max = max(held_max, fed - released)
    released += len(f.finish().text)
    assert released == len(src)
    assert held_max <= MAX_JSON_HOLD + 1000
    assert f.calls == []


def test_large_tool_call_body_streams_in_linear_time() -> None:
    content = ("line of code {x} <y> `z`\n" * 8000)[:200_000]
    src = "Writing.\n<tool_call>" + json.dumps(
        {"name": "write_file", "arguments": {"path": "big.txt", "content": content}}
    )
    src += "</tool_call>\nDone. " + "prose " * 20000
    f = MarkupFilter(TOOLS)
    # CPU time of this process, not the wall clock: other processes' load does not count.
    start = time.process_time()
    text = "".join(f.feed(src[i : i + 3]).text for i in range(0, len(src), 3)) + f.finish().text
    cpu_s = time.process_time() - start
    assert text == "Writing.\n\nDone. " + "prose " * 20000
    assert f.calls[0].args["content"] == content
    assert cpu_s < 5.0  # about 0.1 s of CPU here: rescanning what it holds would be far more


def test_malformed_errors_are_clear() -> None:
    f = MarkupFilter(["search", "read_file"])
    f.feed('<tool_call>{"name": "rm", "arguments": {}}</tool_call>')
    f.feed('<tool_call>{"name": "search", "arguments": {"q": nope}}</tool_call>')
    f.feed('<tool_call>{"name": "search", "arguments": [1]}</tool_call>')
    f.feed('<tool_call>{"arguments": {}}</tool_call>')
    f.feed("<tool_call></tool_call>")
    f.finish()
    errors = [m.error for m in f.malformed]
    assert errors[0] == "unknown tool 'rm'; available: read_file, search"
    assert errors[1].startswith("the tool call is not valid JSON: ")
    assert errors[2] == "search: arguments must be a JSON object, got an array"
    assert "no tool name" in errors[3]
    assert "empty tool call" in errors[4]
    feedback = malformed_feedback(f.malformed)
    assert "unknown tool 'rm'" in feedback and '<tool_call>{"name": "rm"' in feedback
    assert malformed_feedback([]) == ""


def test_unknown_tool_in_other_styles() -> None:
    f = MarkupFilter(["search"])
    f.feed("<tool_call>rm<arg_key>p</arg_key><arg_value>/</arg_value></tool_call>")
    f.feed("<function=rm><parameter=p>/</parameter></function>")
    f.finish()
    assert [m.error for m in f.malformed] == ["unknown tool 'rm'; available: search"] * 2
    assert isinstance(f.malformed[0], MalformedCall)


def test_tag_style_arguments_with_stray_text_are_malformed() -> None:
    """Both tag styles go through one argument reader: text between or after the pairs makes
    the call malformed (never a call with half its arguments), and the message names the
    style's expected layout."""
    f = MarkupFilter(["search"])
    f.feed("<tool_call>search<arg_key>q</arg_key><arg_value>a</arg_value> stray </tool_call>")
    f.feed("<function=search><parameter=q>\na\n</parameter>stray</function>")
    f.feed("<function=search><parameter=q>\nline one\n\n</parameter></function>")
    f.finish()
    assert [m.error for m in f.malformed] == [
        "search: could not read the arguments: expected "
        "<arg_key>KEY</arg_key><arg_value>VALUE</arg_value> pairs",
        "search: could not read the arguments: expected <parameter=KEY>VALUE</parameter> blocks",
    ]
    # One line break is taken off each end of a <parameter> value, and only one.
    assert [c.args for c in f.calls] == [{"q": "line one\n"}]


def test_calls_keep_their_markup() -> None:
    f = MarkupFilter(TOOLS)
    f.feed('a {"tool": "search", "args": {"query": "q"}} b')
    f.finish()
    assert f.calls == [
        ParsedCall("search", {"query": "q"}, '{"tool": "search", "args": {"query": "q"}}')
    ]


def test_feed_after_finish_is_an_error() -> None:
    f = MarkupFilter(TOOLS)
    f.finish()
    assert f.finish() == FilterOutput()
    with pytest.raises(RuntimeError):
        f.feed("x")


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('{"a": "x\ny\tz"}', {"a": "x\ny\tz"}),
        ('{"a": [1, 2,], "b": {"c": 3,},}', {"a": [1, 2], "b": {"c": 3}}),
        ('{"a": {"b": 1}', {"a": {"b": 1}}),
        ('{"a": "unterminated', {"a": "unterminated"}),
        ('{"a": 1}}', {"a": 1}),
        ('  [1, "}", {"x": "]"}]  ', [1, "}", {"x": "]"}]),
    ],
)
def test_repair_json(src: str, expected: Any) -> None:
    assert repair_json(src) == expected


@pytest.mark.parametrize("src", ["", "{a: 1}", '{"a": x}', '{"a": 1} trailing', "{'a': 1}"])
def test_repair_json_gives_up(src: str) -> None:
    with pytest.raises(ValueError):
        repair_json(src)


# ---------------------------------------------------------------------------------------------
# End to end with a provider in native tool-calling mode: the model writes its call as text
# (llama.cpp, Ollama or vLLM without a tool parser do), the server still runs it, and the client
# never sees the markup.

_turns = iter(range(1_000_000))


def _native_turn(server, fake, pieces: list[str], after: str = "It is noon.") -> tuple[Any, ...]:
    """One chat whose first model call streams `pieces` as text (tools offered natively) and
    whose second answers `after`; returns (frames, the two requests)."""
    from prismd.testing.fake_models import Reply

    from .conftest import of_type

    tag = f"native-turn-{next(_turns)}"
    before = len(fake.requests)
    fake.script(Reply(text=pieces, times=1), match=tag)
    fake.script(Reply(text=[after], times=1), match=tag)
    with server.client() as c:
        frames = c.turn(message=f"what time is it? {tag}")
    requests = fake.requests[before:]
    assert of_type(frames, "done"), frames
    return frames, requests


def _assert_clean(frames: list[dict[str, Any]]) -> None:
    from .conftest import of_type

    for chunk in of_type(frames, "chunk"):
        for bad in FORBIDDEN:
            assert bad not in chunk["delta"], chunk
    final = of_type(frames, "done")[0]["finalContent"]
    for bad in FORBIDDEN:
        assert bad not in final


def test_native_provider_runs_a_call_written_as_text(server, fake_openai):
    from .conftest import of_type, text_of

    markup = '<tool_call>{"tool": "current_time", "args": {}}</tool_call>'
    pieces = ["Let me check. "] + [markup[i : i + 4] for i in range(0, len(markup), 4)]
    frames, (first, second) = _native_turn(server, fake_openai, pieces)
    # Native mode: the tools went as the API's `tools`, not described in the prompt.
    assert "current_time" in {t["function"]["name"] for t in first["tools"]}
    assert "<tool_call>" not in first["messages"][0]["content"]
    _assert_clean(frames)
    assert text_of(frames) == "Let me check. It is noon."
    (start,), (end,) = of_type(frames, "tool_start"), of_type(frames, "tool_end")
    assert start["name"] == "current_time" and start["input"] == {}
    assert end["status"] == "ok" and end["id"] == start["id"] and "UTC" in end["output"]
    assert of_type(frames, "done")[0]["finalContent"] == "It is noon."
    # The model sees its call as a native call with its result.
    assistant, result = second["messages"][-2:]
    assert assistant["role"] == "assistant" and assistant["content"] == "Let me check. "
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["current_time"]
    assert result == {
        "role": "tool",
        "tool_call_id": assistant["tool_calls"][0]["id"],
        "content": end["output"],
    }
    # And what is stored is clean too.
    sid = frames[0]["sessionId"]
    stored = server.get(f"/api/sessions/{sid}/messages").json()
    assert all("<tool_call" not in m["content"] for m in stored)
    assert json.loads(stored[1]["tool_calls"])[0]["name"] == "current_time"


def test_native_provider_streams_code_and_ordinary_json(server, fake_openai):
    from .conftest import of_type, text_of

    answer = (
        'Config: {"tool": "hammer", "size": 3} and {"name": "x"}.\n'
        '```json\n{"a": [1, 2], "tool": "current_time"}\n```\n'
        "```python\nprint({'tool': 'current_time'})\n```\n<b>bold</b> done"
    )
    pieces = [answer[i : i + 5] for i in range(0, len(answer), 5)]
    frames, requests = _native_turn(server, fake_openai, pieces)
    assert len(requests) == 1  # no tool ran, so no second round
    assert text_of(frames) == answer and not of_type(frames, "tool_start")
    assert of_type(frames, "done")[0]["finalContent"] == answer


TIMEZONES = ["UTC", "Europe/Paris", "Asia/Tokyo"]
SAFE_PROSE = st.lists(
    st.sampled_from(["a", "b", " ", "\n", "x < y", "{}", "[1]", "`x`", '{"a": 1}', "é", "."]),
    max_size=12,
).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FORMATS),
    zone=st.sampled_from(TIMEZONES),
    before=SAFE_PROSE,
    after=SAFE_PROSE,
    cuts=st.lists(st.integers(0, 300), max_size=12),
)
def test_native_provider_any_format_any_split(server, fake_openai, fmt, zone, before, after, cuts):
    """Whatever the call's format and wherever the model's deltas cut it, in native mode the
    call runs once and the client gets exactly the prose around it."""
    from .conftest import of_type, text_of

    src = before + " " + render(fmt, "current_time", {"timezone": zone}, True) + " " + after
    pieces = [p for p in split_at(src, [c for c in cuts if c <= len(src)]) if p]
    frames, requests = _native_turn(server, fake_openai, pieces, after="Done.")
    _assert_clean(frames)
    assert [e["name"] for e in of_type(frames, "tool_end")] == ["current_time"]
    assert of_type(frames, "tool_start")[0]["input"] == {"timezone": zone}
    assert of_type(frames, "tool_end")[0]["status"] == "ok"
    assert text_of(frames) == before + "  " + after + "Done."
    assert len(requests) == 2 and requests[1]["messages"][-1]["role"] == "tool"
