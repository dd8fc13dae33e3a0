"""Streaming sentence splitter: text arrives in chunks, speakable sentences come out as soon as
they are complete, so the first one is spoken long before the answer ends."""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (then optional quotes/brackets) followed by whitespace, or at a
# blank line / list item boundary. "e.g. " and decimals ("3.5") do not end one.
_END = re.compile(
    r"(?<!\be\.g)(?<!\bi\.e)(?<!\bMr)(?<!\bDr)(?<!\bMrs)(?<!\bvs)[.!?…]+[\"')\]]*\s+"
    r"|\n\s*\n|\n(?=\s*(?:[-*•]|\d+\.)\s)"
)
_MARKUP = re.compile(r"```.*?```|`([^`]*)`|\*\*|__|[*_#>]|\[([^\]]*)\]\([^)]*\)", re.S)
_LIST_MARK = re.compile(r"(?m)^\s*(?:[-•+]|\d+\.)\s+")
MAX_CHARS = 240  # a sentence longer than this is cut at a comma or a space


def speakable(text: str) -> str:
    """Markdown to plain speech text: code blocks dropped, emphasis/heading marks removed,
    links read by their label."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0).startswith("```"):
            return " "
        return m.group(1) or m.group(2) or ""

    text = _LIST_MARK.sub(" ", _MARKUP.sub(repl, text))
    return " ".join(text.split())


def pieces(text: str, max_chars: int = 400) -> list[str]:
    """`text` cut at sentence ends into pieces of about `max_chars` (a sentence longer than
    that stays whole), for synthesis a few sentences at a time; the text is not changed."""
    out: list[str] = []
    start = 0
    for m in _END.finditer(text):
        if m.end() - start >= max_chars:
            out.append(text[start : m.end()])
            start = m.end()
    out.append(text[start:])
    return [p for p in out if p.strip()] or [text]


class SentenceSplitter:
    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self._buf = ""
        self._in_code = False
        self.max_chars = max_chars

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while True:
            m = _END.search(self._buf)
            if m is None:
                break
            piece, self._buf = self._buf[: m.end()], self._buf[m.end() :]
            out.extend(self._clean(piece))
        while len(self._buf) > self.max_chars:
            limit = self.max_chars
            cut = max(self._buf.rfind(", ", 0, limit), self._buf.rfind(" ", 0, limit))
            cut = cut + 1 if cut > 0 else self.max_chars
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            out.extend(self._clean(piece))
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf, ""
        return self._clean(piece)

    def _clean(self, piece: str) -> list[str]:
        # Code fences can span pieces: what is inside one is not read aloud.
        spoken = []
        parts = piece.split("```")
        for i, part in enumerate(parts):
            if i > 0:
                self._in_code = not self._in_code
            if not self._in_code:
                spoken.append(part)
        text = speakable(" ".join(spoken))
        return [text] if any(c.isalnum() for c in text) else []
