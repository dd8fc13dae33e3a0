"""Streaming filter for model text: strips `<think>` blocks and text-protocol tool calls.

Models without native tool calling write their calls into the answer text, and so do many
models served with native tool calling (llama.cpp, Ollama or vLLM without a tool parser for the
model): the turn runner filters the text of every model call of an agent that has tools,
whatever the provider's tool-calling mode, and runs the calls found in it like native ones.
The answer is streamed to the user while it is generated, so the markup has to be recognised on
the fly, whatever way the model's deltas split it, while ordinary prose streams through at once.

`MarkupFilter.feed` takes each delta and returns the clean text (and reasoning) that can be
released now; it holds back only the shortest suffix that could still open a construct, and
releases it as soon as it cannot. `finish` resolves whatever is held at the end of the stream.

Recognised (tool markup only with ``parse_tools=True``):

- ``<think>…</think>`` and ``<thinking>…</thinking>``: the content goes to ``reasoning``.
- ``<tool_call>{"name"|"tool": N, "arguments"|"args"|"parameters"|"input": {…}}</tool_call>``
  (Hermes/Qwen and the prismd text protocol), arguments possibly a JSON-encoded string.
- ``<tool_call>N<arg_key>k</arg_key><arg_value>v</arg_value>…</tool_call>`` (GLM/DeepSeek).
- ``<function=N><parameter=k>v</parameter>…</function>`` (Qwen3-coder), wrapped in
  ``<tool_call>`` or not.
- A bare JSON object ``{"tool"|"name": N, "args"|…: {…}}`` (name key first, one arguments
  key, no other keys but "id"/"type") when N is a known tool, and the same object alone in a
  fenced block (```` ``` ````, ```` ```json ````, ```` ```tool_call ````). Any other JSON or
  fenced block is text, released as soon as it cannot be a call (a candidate is held until
  its object closes, at most MAX_JSON_HOLD characters).

Every decision depends only on the text, never on where the deltas were cut: for any split of
an input, the concatenated outputs, the calls and the malformed calls are the same.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FilterOutput",
    "MalformedCall",
    "MarkupFilter",
    "ParsedCall",
    "malformed_feedback",
    "repair_json",
]

# A bare/fenced JSON candidate that has not closed within this many characters is text.
MAX_JSON_HOLD = 64 * 1024
# The opening of a candidate (`{ "tool": "name"`, a fence line) is decided within this many.
_HEAD_LIMIT = 256

_WS = " \t\r\n"
_NAME_KEYS = ("tool", "name")
_ARG_KEYS = ("args", "arguments", "parameters", "input")
_BARE_KEYS = frozenset({*_NAME_KEYS, *_ARG_KEYS, "id", "type"})
_FENCE_INFOS = ("", "json", "tool_call", "tool")

_THINK_OPEN = ("<think>", "<thinking>")
_THINK_CLOSE = ("</think>", "</thinking>")
_TOOL_OPEN = "<tool_call>"
_TOOL_CLOSE = "</tool_call>"
_FUNC_OPEN = "<function="
_FUNC_CLOSE = "</function>"
# A partial tag left at the very end of the stream that starts like this is dropped, not shown.
_DROP_PARTIAL_AT_END = ("<tool_call", "</tool_call", "<think", "</think", "<function")

_TEXT, _THINK, _TOOL, _FUNC = range(4)

_RX_JSON_CODE = re.compile(r'[{}"]')
_RX_JSON_STR = re.compile(r'["\\]')
_RX_GLM_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_RX_PARAM = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)
_RX_NAME = re.compile(r"[A-Za-z0-9_.:\-/]+")

_DECODER = json.JSONDecoder(strict=False)


@dataclass(slots=True)
class ParsedCall:
    name: str
    args: dict[str, Any]
    raw: str  # the exact markup it was parsed from


@dataclass(slots=True)
class MalformedCall:
    raw: str
    error: str  # what was wrong, in words fit for a corrective re-prompt to the model


@dataclass(slots=True)
class FilterOutput:
    text: str = ""  # clean text to stream now (may be "")
    reasoning: str = ""  # <think> content released now


# ---------------------------------------------------------------------------------------------
# JSON repair


def repair_json(text: str) -> Any:
    """Parse JSON as models write it; raise ValueError if it cannot be understood.

    Tolerated: raw control characters (newlines, tabs) inside strings, trailing commas before
    ``}``/``]``, unclosed strings/objects/arrays at the end (a missing final ``}``), and stray
    extra closing brackets after the value.
    """
    s = text.strip()
    try:
        return _loads(s)
    except ValueError as exc:
        first = exc
    try:
        return _loads(_fix_json(s))
    except ValueError:
        raise ValueError(str(first)) from None


def _loads(s: str) -> Any:
    obj, end = _DECODER.raw_decode(s)
    tail = s[end:].strip(_WS + "}]")
    if tail:
        raise ValueError(f"extra data after the JSON value: {s[end : end + 40]!r}")
    return obj


def _fix_json(s: str) -> str:
    out: list[str] = []
    closers: list[str] = []
    in_str = esc = False
    n = len(s)
    i = 0
    while i < n:
        c = s[i]
        i += 1
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            out.append(c)
            continue
        if c == '"':
            in_str = True
        elif c == "{":
            closers.append("}")
        elif c == "[":
            closers.append("]")
        elif c in "}]":
            if closers and closers[-1] == c:
                closers.pop()
        elif c == ",":
            j = i
            while j < n and s[j] in _WS:
                j += 1
            if j == n or s[j] in "}]":
                continue  # trailing comma
        out.append(c)
    if esc:
        out.pop()
    if in_str:
        out.append('"')
    out.extend(reversed(closers))
    return "".join(out)


def _one_newline_off(value: str) -> str:
    """A <parameter> block's value without the line break after its opening tag and before
    its closing one (the layout models write), and nothing more."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _decode_value(value: str) -> Any:
    """An argument value from tag-style markup: JSON if it parses as JSON, else the string."""
    s = value.strip()
    if not s:
        return value
    if s[0] in "{[":
        try:
            return repair_json(s)
        except ValueError:
            return value
    try:
        return json.loads(s, parse_constant=_no_constant)
    except ValueError:
        return value


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _coerce_args(value: Any) -> tuple[dict[str, Any] | None, str]:
    if value is None:
        return {}, ""
    if isinstance(value, str):
        if not value.strip():
            return {}, ""
        try:
            value = repair_json(value)
        except ValueError as exc:
            return None, f"arguments are not valid JSON: {exc}"
    if isinstance(value, dict):
        return value, ""
    return None, f"arguments must be a JSON object, got {_json_type(value)}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Candidates: constructs that start with `{` or a backtick and need look-ahead


_NEED, _REJECT, _OK = range(3)


@dataclass(slots=True)
class _Decision:
    consumed: str  # released as text, unless call is set (then it is the call's markup)
    rest: str  # input after it, to be scanned again
    call: ParsedCall | None = None


def _scan_json_head(head: str, names: frozenset[str], prefixes: frozenset[str]) -> tuple[int, int]:
    """``{ "tool"|"name" : "KNOWN"`` at the start of head? -> (status, end of the name string)."""
    n = len(head)
    i = 1
    while i < n and head[i] in _WS:
        i += 1
    if i == n:
        return _NEED, 0
    if head[i] != '"':
        return _REJECT, 0
    i += 1
    j = head.find('"', i)
    key = head[i:] if j < 0 else head[i:j]
    if j < 0:
        return (_NEED if "tool".startswith(key) or "name".startswith(key) else _REJECT), 0
    if key not in _NAME_KEYS:
        return _REJECT, 0
    i = j + 1
    while i < n and head[i] in _WS:
        i += 1
    if i == n:
        return _NEED, 0
    if head[i] != ":":
        return _REJECT, 0
    i += 1
    while i < n and head[i] in _WS:
        i += 1
    if i == n:
        return _NEED, 0
    if head[i] != '"':
        return _REJECT, 0
    i += 1
    j = head.find('"', i)
    value = head[i:] if j < 0 else head[i:j]
    if "\\" in value:
        return _REJECT, 0
    if j < 0:
        return (_NEED if value in prefixes else _REJECT), 0
    return (_OK if value in names else _REJECT), j + 1


def _scan_fence_head(head: str) -> tuple[int, int]:
    """```` ```json\\n ```` then `{` at the start of head? -> (status, index of the `{`)."""
    n = len(head)
    for i in range(3):
        if i >= n:
            return _NEED, 0
        if head[i] != "`":
            return _REJECT, 0
    j = 3
    while j < n and head[j] not in _WS:
        j += 1
    info = head[3:j].lower()
    if j == n:
        return (_NEED if any(x.startswith(info) for x in _FENCE_INFOS) else _REJECT), 0
    if info not in _FENCE_INFOS:
        return _REJECT, 0
    while j < n and head[j] in " \t\r":
        j += 1
    if j == n:
        return _NEED, 0
    if head[j] != "\n":
        return _REJECT, 0
    while j < n and head[j] in _WS:
        j += 1
    if j == n:
        return _NEED, 0
    return (_OK if head[j] == "{" else _REJECT), j


def _limited(status: int, head: str) -> int:
    # Undecided within the first _HEAD_LIMIT characters: not a candidate. Callers scan only
    # head[:_HEAD_LIMIT], so the outcome never depends on how much arrived at once.
    if status == _NEED and len(head) >= _HEAD_LIMIT:
        return _REJECT
    return status


class _JsonCandidate:
    """A `{` that may open a bare tool-call object: held until it is decided."""

    __slots__ = ("_f", "_head", "_parts", "_len", "_depth", "_in_str", "_esc", "_name")

    def __init__(self, owner: MarkupFilter) -> None:
        self._f = owner
        self._head = ""
        self._parts: list[str] | None = None  # set once the head matched
        self._len = 0
        self._depth = 1
        self._in_str = False
        self._esc = False
        self._name = ""

    def push(self, s: str, final: bool) -> _Decision | None:
        if self._parts is None:
            head = self._head + s
            f = self._f
            status, end = _scan_json_head(head[:_HEAD_LIMIT], f._names, f._name_prefixes)
            status = _limited(status, head)
            if status == _NEED and not final:
                self._head = head
                return None
            if status != _OK:
                return _Decision(head[:1], head[1:])
            self._name = head[head.rfind('"', 0, end - 1) + 1 : end - 1]
            self._parts = [head[:end]]
            self._len = end
            s = head[end:]
        parts = self._parts
        budget = MAX_JSON_HOLD - self._len
        seg = s[:budget]
        k = self._scan(seg)
        if k >= 0:
            text = "".join(parts) + seg[:k]
            call = self._f._bare_call(text, self._name)
            return _Decision(text, s[k:], call)
        parts.append(seg)
        self._len += len(seg)
        if self._len >= MAX_JSON_HOLD:
            raw = "".join(parts) + s[budget:]
            return _Decision(raw[:1], raw[1:])
        if not final:
            return None
        raw = "".join(parts)
        call = self._f._bare_call(raw, self._name)  # repaired: the model stopped inside it
        if call is not None:
            return _Decision(raw, "", call)
        return _Decision(raw[:1], raw[1:])

    def _scan(self, s: str) -> int:
        """Advance the brace matcher over s; the index after the closing `}`, or -1."""
        i = 0
        n = len(s)
        depth = self._depth
        in_str = self._in_str
        esc = self._esc
        result = -1
        while i < n:
            if in_str:
                if esc:
                    esc = False
                    i += 1
                    continue
                m = _RX_JSON_STR.search(s, i)
                if m is None:
                    break
                i = m.end()
                if m.group() == '"':
                    in_str = False
                else:
                    esc = True
            else:
                m = _RX_JSON_CODE.search(s, i)
                if m is None:
                    break
                i = m.end()
                c = m.group()
                if c == '"':
                    in_str = True
                elif c == "{":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        result = i
                        break
        self._depth = depth
        self._in_str = in_str
        self._esc = esc
        return result


class _FenceCandidate:
    """A backtick that may open a fenced block holding only a tool-call object."""

    __slots__ = ("_f", "_head", "_opening", "_json", "_body", "_call", "_trail")

    def __init__(self, owner: MarkupFilter) -> None:
        self._f = owner
        self._head = ""
        self._opening = ""  # the fence line and blank space before the `{`, once matched
        self._json: _JsonCandidate | None = None
        self._body = ""  # the object's text, once it closed as a call
        self._call: ParsedCall | None = None
        self._trail = ""

    def push(self, s: str, final: bool) -> _Decision | None:
        if self._json is None and self._call is None:
            head = self._head + s
            status, end = _scan_fence_head(head[:_HEAD_LIMIT])
            status = _limited(status, head)
            if status == _NEED and not final:
                self._head = head
                return None
            if status != _OK:
                return _Decision(head[:1], head[1:])
            self._opening = head[:end]
            self._json = _JsonCandidate(self._f)
            s = head[end:]
        if self._call is None:
            assert self._json is not None
            d = self._json.push(s, final)
            if d is None:
                return None
            if d.call is None:
                return self._reject(d.consumed + d.rest)
            self._call = d.call
            self._body = d.consumed
            s = d.rest
        trail = self._trail + s
        probe = trail[:_HEAD_LIMIT]
        k = len(probe) - len(probe.lstrip(_WS))
        tail = probe[k:]
        if tail.startswith("```"):
            raw = self._opening + self._body + trail[: k + 3]
            return _Decision(raw, trail[k + 3 :], ParsedCall(self._call.name, self._call.args, raw))
        if "```".startswith(tail) and len(trail) < _HEAD_LIMIT:
            if not final:
                self._trail = trail
                return None
            # The stream ended inside the fence, right after the object: still the call.
            raw = self._opening + self._body + trail
            return _Decision(raw, "", ParsedCall(self._call.name, self._call.args, raw))
        return self._reject(self._body + trail)

    def _reject(self, after_opening: str) -> _Decision:
        raw = self._opening + after_opening
        return _Decision(raw[:1], raw[1:])


# ---------------------------------------------------------------------------------------------
# The filter


class MarkupFilter:
    """Incremental filter over the text deltas of one model answer.

    ``tool_names``: the tools the model may call; a `<tool_call>` naming another goes to
    ``malformed``, and bare/fenced JSON objects are calls only when they name one of them
    (``None``: any name is accepted in `<tool_call>`, bare/fenced JSON is never a call).
    ``parse_tools=False``: only think blocks are handled (an agent without tools).
    ``starts_in_think=True``: the answer starts inside a think block whose opening tag the
    model does not write (DeepSeek-R1 distills, Qwen3 templates): text up to ``</think>`` is
    reasoning.
    """

    def __init__(
        self,
        tool_names: Collection[str] | None = None,
        parse_tools: bool = True,
        *,
        starts_in_think: bool = False,
    ) -> None:
        self.calls: list[ParsedCall] = []
        self.malformed: list[MalformedCall] = []
        self._known = None if tool_names is None else frozenset(tool_names)
        # What depends only on the tool names is built once per set of names (a turn's every
        # round makes a filter).
        g = _grammar(self._known or frozenset(), parse_tools)
        self._names = g.names
        self._name_prefixes = g.name_prefixes
        self._rx_text = g.rx_text
        self._rx_text_special = g.rx_text_special
        self._text_partials = g.text_partials
        self._text_maxlen = g.text_maxlen
        self._rx_think = g.rx_think
        self._think_partials = g.think_partials
        self._think_maxlen = g.think_maxlen

        self._mode = _THINK if starts_in_think else _TEXT
        self._hold = ""  # a partial tag at the end of what arrived
        self._pending: _JsonCandidate | _FenceCandidate | None = None
        self._body: list[str] = []  # of the open <tool_call> / <function=
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._finished = False

    # -- public ------------------------------------------------------------------------------

    def feed(self, delta: str) -> FilterOutput:
        """Take the next piece of the answer; return what can be shown now."""
        if self._finished:
            raise RuntimeError("MarkupFilter.feed after finish")
        if self._pending is None and not self._hold:
            # The common case: nothing held and nothing in the delta that could open markup.
            if self._mode == _TEXT:
                if self._rx_text_special.search(delta) is None:
                    return FilterOutput(delta)
            elif self._mode == _THINK and "<" not in delta:
                return FilterOutput("", delta)
        if delta:
            self._process(delta, final=False)
        return self._flush()

    def finish(self) -> FilterOutput:
        """End of the stream: release or resolve whatever is held."""
        if self._finished:
            return FilterOutput()
        self._process("", final=True)
        if self._mode in (_TOOL, _FUNC):
            self._close_block(closed=False)
        self._mode = _TEXT
        self._finished = True
        return self._flush()

    # -- scanning ----------------------------------------------------------------------------

    def _flush(self) -> FilterOutput:
        out = FilterOutput("".join(self._text), "".join(self._reasoning))
        self._text.clear()
        self._reasoning.clear()
        return out

    def _process(self, s: str, final: bool) -> None:
        while True:
            pending = self._pending
            if pending is not None:
                d = pending.push(s, final)
                if d is None:
                    return
                self._pending = None
                if d.call is not None:
                    self._add_call(d.call)
                elif d.consumed:
                    self._text.append(d.consumed)
                s = d.rest
                continue
            if self._hold:
                s = self._hold + s
                self._hold = ""
            if not s:
                return
            mode = self._mode
            if mode == _TEXT:
                rest = self._run_text(s, final)
            elif mode == _THINK:
                rest = self._run_think(s, final)
            else:
                rest = self._run_block(s, final)
            if rest is None:
                return
            s = rest

    def _run_text(self, s: str, final: bool) -> str | None:
        rx = self._rx_text
        pos = 0
        while True:
            m = rx.search(s, pos)
            if m is None:
                self._keep_partial(s, final, self._text, self._text_partials, self._text_maxlen)
                return None
            start = m.start()
            tok = m.group()
            if tok == "{" or tok == "`":
                # Already settled by the next characters (what the candidate would decide)?
                nxt = s[start + 1 : start + 3]
                if nxt and (
                    (nxt[0] != '"' and nxt[0] not in _WS)
                    if tok == "{"
                    else not "``".startswith(nxt)
                ):
                    pos = start + 1
                    continue
                if start:
                    self._text.append(s[:start])
                self._pending = _JsonCandidate(self) if tok == "{" else _FenceCandidate(self)
                return s[start:]
            if start:
                self._text.append(s[:start])
            if tok in _THINK_OPEN:
                self._mode = _THINK
            elif tok == _TOOL_OPEN:
                self._mode = _TOOL
                self._body = []
            elif tok == _FUNC_OPEN:
                self._mode = _FUNC
                self._body = []
            # else a stray closing tag (</think>, </tool_call>): dropped
            return s[m.end() :]

    def _run_think(self, s: str, final: bool) -> str | None:
        m = self._rx_think.search(s)
        if m is None:
            self._keep_partial(s, final, self._reasoning, self._think_partials, self._think_maxlen)
            return None
        if m.start():
            self._reasoning.append(s[: m.start()])
        if m.group() in _THINK_CLOSE:
            self._mode = _TEXT
        # else a nested opening tag: dropped
        return s[m.end() :]

    def _run_block(self, s: str, final: bool) -> str | None:
        close = _TOOL_CLOSE if self._mode == _TOOL else _FUNC_CLOSE
        k = s.find(close)
        if k < 0:
            cut = len(s)
            lo = max(0, len(s) - len(close) + 1)
            j = s.rfind("<", lo)
            if j >= 0 and close.startswith(s[j:]):
                cut = j
                if not final:
                    self._hold = s[j:]
            if cut:
                self._body.append(s[:cut])
            return None
        if k:
            self._body.append(s[:k])
        self._close_block(closed=True)
        self._mode = _TEXT
        return s[k + len(close) :]

    def _keep_partial(
        self, s: str, final: bool, sink: list[str], partials: frozenset[str], maxlen: int
    ) -> None:
        """Release s except a trailing partial tag, which is held (or, at the end, decided)."""
        cut = len(s)
        j = s.rfind("<", max(0, len(s) - maxlen + 1))
        if j >= 0 and s[j:] in partials:
            if not final:
                self._hold = s[j:]
                cut = j
            elif s.startswith(_DROP_PARTIAL_AT_END, j):
                cut = j
        if cut:
            sink.append(s[:cut])

    # -- calls -------------------------------------------------------------------------------

    def _add_call(self, call: ParsedCall) -> None:
        self.calls.append(call)

    def _close_block(self, closed: bool) -> None:
        body = "".join(self._body)
        self._body = []
        if self._mode == _TOOL:
            raw = _TOOL_OPEN + body + (_TOOL_CLOSE if closed else "")
            results = self._parse_tool_call(body, raw)
        else:
            raw = _FUNC_OPEN + body + (_FUNC_CLOSE if closed else "")
            results = [self._parse_function(body, raw)]
        for r in results:
            if isinstance(r, ParsedCall):
                self._add_call(r)
            else:
                self.malformed.append(r)

    def _parse_tool_call(self, body: str, raw: str) -> list[ParsedCall | MalformedCall]:
        text = body.strip()
        if not text:
            return [
                MalformedCall(
                    raw,
                    'empty tool call: expected <tool_call>{"tool": NAME, "args": {...}}'
                    "</tool_call>",
                )
            ]
        if text[0] in "{[":
            try:
                obj = repair_json(text)
            except ValueError as exc:
                return [MalformedCall(raw, f"the tool call is not valid JSON: {exc}")]
            items = obj if isinstance(obj, list) else [obj]
            if not items:
                return [MalformedCall(raw, "the tool call is an empty JSON array")]
            return [self._call_from_json(item, raw) for item in items]
        if text.startswith(_FUNC_OPEN):
            return [self._parse_function(text[len(_FUNC_OPEN) :], raw)]
        return [self._parse_glm(text, raw)]

    def _call_from_json(self, obj: Any, raw: str) -> ParsedCall | MalformedCall:
        if not isinstance(obj, dict):
            return MalformedCall(raw, f"the tool call must be a JSON object, got {_json_type(obj)}")
        if "tool" not in obj and "name" not in obj and isinstance(obj.get("function"), dict):
            obj = obj["function"]  # {"type": "function", "function": {"name": …, …}}
        name = obj.get("tool", obj.get("name"))
        if not isinstance(name, str) or not name.strip():
            return MalformedCall(
                raw, 'the tool call has no tool name: expected "tool" (or "name") with a string'
            )
        name = name.strip()
        unknown = self._unknown(name, raw)
        if unknown is not None:
            return unknown
        value = next((obj[k] for k in _ARG_KEYS if k in obj), None)
        args, error = _coerce_args(value)
        if args is None:
            return MalformedCall(raw, f"{name}: {error}")
        return ParsedCall(name, args, raw)

    def _parse_glm(self, text: str, raw: str) -> ParsedCall | MalformedCall:
        idx = text.find("<arg_key>")
        name = (text if idx < 0 else text[:idx]).strip()
        if not _RX_NAME.fullmatch(name):
            return MalformedCall(
                raw,
                "could not read the tool call: expected a JSON object like "
                '{"tool": NAME, "args": {...}} inside <tool_call>…</tool_call>',
            )
        return self._call_with_pairs(
            name,
            text,
            len(text) if idx < 0 else idx,
            _RX_GLM_PAIR,
            str.strip,
            "<arg_key>KEY</arg_key><arg_value>VALUE</arg_value> pairs",
            raw,
        )

    def _parse_function(self, inner: str, raw: str) -> ParsedCall | MalformedCall:
        text = inner.strip()
        if text.endswith(_FUNC_CLOSE):
            text = text[: -len(_FUNC_CLOSE)]
        name, sep, params = text.partition(">")
        name = name.strip()
        if not sep or not _RX_NAME.fullmatch(name):
            return MalformedCall(
                raw, "could not read the tool name: expected <function=NAME>…</function>"
            )
        return self._call_with_pairs(
            name,
            params,
            0,
            _RX_PARAM,
            _one_newline_off,
            "<parameter=KEY>VALUE</parameter> blocks",
            raw,
        )

    def _call_with_pairs(
        self,
        name: str,
        text: str,
        pos: int,
        pair: re.Pattern[str],
        value_of: Callable[[str], str],
        expected: str,
        raw: str,
    ) -> ParsedCall | MalformedCall:
        """The one reader of tag-style arguments (GLM's <arg_key>/<arg_value> pairs, Qwen's
        <parameter=KEY> blocks): consecutive `pair` matches from `pos` to the end of `text`,
        each value decoded as a JSON scalar where it is one; anything else between or after
        them makes the call malformed."""
        unknown = self._unknown(name, raw)
        if unknown is not None:
            return unknown
        args: dict[str, Any] = {}
        for m in pair.finditer(text, pos):
            if text[pos : m.start()].strip():
                break
            args[m.group(1).strip()] = _decode_value(value_of(m.group(2)))
            pos = m.end()
        if text[pos:].strip():
            return MalformedCall(raw, f"{name}: could not read the arguments: expected {expected}")
        return ParsedCall(name, args, raw)

    def _unknown(self, name: str, raw: str) -> MalformedCall | None:
        if self._known is None or name in self._known:
            return None
        available = ", ".join(sorted(self._known)) or "(none)"
        return MalformedCall(raw, f"unknown tool {name!r}; available: {available}")

    def _bare_call(self, text: str, name: str) -> ParsedCall | None:
        """The bare/fenced object `text` (whose first key names `name`) as a call, or None."""
        try:
            obj = repair_json(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not obj.keys() <= _BARE_KEYS:
            return None
        if obj.get("tool", obj.get("name")) != name:
            return None
        # Exactly one name key and one arguments key: `{"name": "search"}` alone is prose.
        if sum(k in obj for k in _NAME_KEYS) != 1 or sum(k in obj for k in _ARG_KEYS) != 1:
            return None
        args, _ = _coerce_args(next((obj[k] for k in _ARG_KEYS if k in obj), None))
        if args is None:
            return None
        return ParsedCall(name, args, text)


@dataclass(frozen=True, slots=True)
class _Grammar:
    names: frozenset[str]
    name_prefixes: frozenset[str]
    rx_text: re.Pattern[str]
    rx_text_special: re.Pattern[str]
    text_partials: frozenset[str]
    text_maxlen: int
    rx_think: re.Pattern[str]
    think_partials: frozenset[str]
    think_maxlen: int


@functools.lru_cache(maxsize=256)
def _grammar(names: frozenset[str], parse_tools: bool) -> _Grammar:
    json_calls = parse_tools and bool(names)
    tags = [*_THINK_OPEN, *_THINK_CLOSE]
    if parse_tools:
        tags += [_TOOL_OPEN, _TOOL_CLOSE, _FUNC_OPEN]
    alternatives = [re.escape(t) for t in sorted(tags, key=len, reverse=True)]
    if json_calls:
        alternatives += [r"\{", "`"]
    think_tags = [*_THINK_OPEN, *_THINK_CLOSE]
    return _Grammar(
        names=names,
        name_prefixes=frozenset(n[:i] for n in names for i in range(len(n) + 1)),
        rx_text=re.compile("|".join(alternatives)),
        rx_text_special=re.compile(r"[<{`]" if json_calls else "<"),
        text_partials=_proper_prefixes(tags),
        text_maxlen=max(map(len, tags)),
        rx_think=re.compile("|".join(re.escape(t) for t in think_tags)),
        think_partials=_proper_prefixes(think_tags),
        think_maxlen=max(map(len, think_tags)),
    )


def _proper_prefixes(tags: Iterable[str]) -> frozenset[str]:
    return frozenset(t[:i] for t in tags for i in range(1, len(t)))


def malformed_feedback(items: Iterable[MalformedCall], limit: int = 2000) -> str:
    """A corrective message for the model about tool calls that could not be understood."""
    lines = []
    for item in items:
        raw = item.raw if len(item.raw) <= limit else item.raw[:limit] + "…"
        lines.append(f"- {item.error}\n  You wrote: {raw}")
    if not lines:
        return ""
    return (
        "Some of your tool calls could not be understood and were not run:\n"
        + "\n".join(lines)
        + '\nWrite each call as <tool_call>{"tool": "TOOL_NAME", "args": {...}}</tool_call> '
        "with valid JSON, using only the available tools."
    )
