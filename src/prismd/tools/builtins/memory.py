"""`memory_note` and `memory_search`: facts an agent keeps across sessions.

One SQLite database, `<data_dir>/memory.db` (WAL mode), shared by all agents; every note belongs
to one agent of one user (`ctx.memory_scope`) and only that agent's searches for that user see
it. Text and tags are indexed with FTS5; searches rank with bm25. The query is reduced to its
words, each quoted, joined with OR, so that no user text is read as FTS5 syntax. SQLite runs in
a worker thread with a connection per call.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec

MAX_NOTE_CHARS = 8000
MAX_TAGS = 20
DEFAULT_LIMIT = 10
MAX_LIMIT = 50
MAX_QUERY_TERMS = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    text TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS notes_agent ON notes(agent_id, id);
CREATE VIRTUAL TABLE IF NOT EXISTS notes_fts USING fts5(
    text, tags, content='notes', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS notes_ai AFTER INSERT ON notes BEGIN
    INSERT INTO notes_fts(rowid, text, tags) VALUES (new.id, new.text, new.tags);
END;
CREATE TRIGGER IF NOT EXISTS notes_ad AFTER DELETE ON notes BEGIN
    INSERT INTO notes_fts(notes_fts, rowid, text, tags)
    VALUES ('delete', old.id, old.text, old.tags);
END;
"""

_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str) -> str:
    """An FTS5 query matching any of the words of `text` (each quoted); "" when it has none."""
    terms: list[str] = []
    for word in _WORD.findall(text):
        quoted = '"' + word.replace('"', '""') + '"'
        if quoted not in terms:
            terms.append(quoted)
        if len(terms) >= MAX_QUERY_TERMS:
            break
    return " OR ".join(terms)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def db_path(ctx: ToolContext) -> Path:
    return Path(ctx.data_dir) / "memory.db"


def add_note(path: Path, agent_id: str, text: str, tags: list[str]) -> int:
    conn = _connect(path)
    try:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cur = conn.execute(
            "INSERT INTO notes(agent_id, created_at, text, tags) VALUES (?, ?, ?, ?)",
            (agent_id, now, text, ", ".join(tags)),
        )
        return int(cur.lastrowid or 0)
    finally:
        conn.close()


def search_notes(path: Path, agent_id: str, query: str, limit: int) -> list[tuple[Any, ...]]:
    conn = _connect(path)
    try:
        match = fts_query(query)
        if not match:  # no words: the most recent notes
            return conn.execute(
                "SELECT id, created_at, text, tags FROM notes WHERE agent_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (agent_id, limit),
            ).fetchall()
        return conn.execute(
            "SELECT n.id, n.created_at, n.text, n.tags FROM notes_fts "
            "JOIN notes AS n ON n.id = notes_fts.rowid "
            "WHERE notes_fts MATCH ? AND n.agent_id = ? "
            "ORDER BY bm25(notes_fts), n.id DESC LIMIT ?",
            (match, agent_id, limit),
        ).fetchall()
    finally:
        conn.close()


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
        tags = [" ".join(t.replace(",", " ").split())[:64] for t in raw_tags if t.strip()]
        tags = tags[:MAX_TAGS]
        try:
            note_id = await asyncio.to_thread(
                add_note, db_path(ctx), ctx.memory_scope, text.strip(), tags
            )
        except sqlite3.Error as exc:
            raise ToolError(f"memory database error: {exc}") from None
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
            rows = await asyncio.to_thread(
                search_notes, db_path(ctx), ctx.memory_scope, query, limit
            )
        except sqlite3.Error as exc:
            raise ToolError(f"memory database error: {exc}") from None
        if not rows:
            return "no matching notes"
        out = []
        for note_id, created, text, tags in rows:
            date = str(created).replace("T", " ").rstrip("Z") + " UTC"
            tag_text = f" [{tags}]" if tags else ""
            out.append(f"#{note_id} ({date}){tag_text}: {text}")
        return "\n".join(out)
