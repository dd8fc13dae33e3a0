"""`memory_note` and `memory_search`: facts an agent keeps across sessions.

The notes live in the store (`ToolContext.store`: Store.add_note, Store.search_notes), so every
prismd process on every machine sharing the database sees the same notes: SQLite's prismd.db
(an FTS5 index, bm25 ranking) or PostgreSQL (a tsvector with a GIN index, ts_rank). Every note
belongs to one agent of one user (`ctx.memory_scope`) and only that agent's searches for that
user see it. The query is reduced to its words, each searched for as it is, so that no user
text is read as search syntax.
"""

from __future__ import annotations

from typing import Any

from ...protocol import clean_text
from ...store.base import Store, StoreUnavailable
from ..base import Tool, ToolContext, ToolError, ToolSpec

MAX_NOTE_CHARS = 8000
MAX_TAGS = 20
DEFAULT_LIMIT = 10
MAX_LIMIT = 50


def _clean(text: str) -> str:
    """Text every store holds: a NUL (PostgreSQL refuses it) or an unpaired surrogate (from
    escaped JSON; not valid Unicode) becomes U+FFFD."""
    return clean_text(text).replace("\x00", "\ufffd")


def _store(ctx: ToolContext) -> Store:
    if ctx.store is None:
        raise ToolError("memory is not available here (no store)")
    return ctx.store


class MemoryNote(Tool):
    spec = ToolSpec(
        name="memory_note",
        description=(
            "Save a fact to your long-term memory, kept across sessions (e.g. the user's "
            "preferences, decisions, names, project facts). Write one self-contained fact per "
            "note, so it makes sense when found later. Returns the note's id."
        ),
        parameters={
            "type": "object",
            "properties": {
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_NOTE_CHARS,
                    "description": "The fact to remember.",
                },
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 64},
                    "maxItems": MAX_TAGS,
                    "description": "Optional keywords that help find the note.",
                },
            },
            "required": ["text"],
            "additionalProperties": False,
        },
    )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        text = args.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ToolError("text must be a non-empty string")
        if len(text) > MAX_NOTE_CHARS:
            raise ToolError(f"text is longer than {MAX_NOTE_CHARS} characters")
        raw_tags = args.get("tags") or []
        if not isinstance(raw_tags, list) or not all(isinstance(t, str) for t in raw_tags):
            raise ToolError("tags must be a list of strings")
        tags = [_clean(" ".join(t.replace(",", " ").split())[:64]) for t in raw_tags if t.strip()]
        tags = tags[:MAX_TAGS]
        try:
            note_id = await _store(ctx).add_note(ctx.memory_scope, _clean(text.strip()), tags)
        except StoreUnavailable:
            raise ToolError("the memory database is unavailable; try again later") from None
        return f"saved note #{note_id}"


class MemorySearch(Tool):
    spec = ToolSpec(
        name="memory_search",
        description=(
            "Search your long-term memory (notes saved with memory_note in any session) by "
            "words; the best matches come first. Returns each note's id, date and text. An "
            "empty query returns the most recent notes."
        ),
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Words to look for."},
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIMIT,
                    "description": f"Maximum number of notes. Default {DEFAULT_LIMIT}.",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        query = args.get("query")
        if not isinstance(query, str):
            raise ToolError("query must be a string")
        limit = args.get("limit", DEFAULT_LIMIT)
        if limit is None:
            limit = DEFAULT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ToolError("limit must be a positive integer")
        limit = min(limit, MAX_LIMIT)
        try:
            notes = await _store(ctx).search_notes(ctx.memory_scope, query, limit)
        except StoreUnavailable:
            raise ToolError("the memory database is unavailable; try again later") from None
        if not notes:
            return "no matching notes"
        out = []
        for note in notes:
            date = note.created_at.replace("T", " ").rstrip("Z") + " UTC"
            tag_text = f" [{', '.join(note.tags)}]" if note.tags else ""
            out.append(f"#{note.id} ({date}){tag_text}: {note.text}")
        return "\n".join(out)
