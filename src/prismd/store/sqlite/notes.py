"""The agents' memory notes in the SQLite store (`memory_notes`), searched with FTS5
and ranked with bm25 (`fts_query`). Their tables, and the import of an older `memory.db`, are
in schema.py.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..base import NoteRecord, note_time, query_words
from ..common import _note
from .core import SqliteCore


class SqliteNotes(SqliteCore):
    async def add_note(self, scope: str, text: str, tags: list[str]) -> int:
        row = (scope, note_time(), text, ", ".join(tags))
        return await self._call(
            lambda: int(
                self._w()
                .execute(
                    "INSERT INTO memory_notes (scope, created_at, text, tags) VALUES (?,?,?,?)",
                    row,
                )
                .lastrowid
                or 0
            )
        )

    async def search_notes(self, scope: str, query: str, limit: int) -> list[NoteRecord]:
        match = fts_query(query)

        def op(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            if not match:  # no words: the newest notes
                return db.execute(
                    "SELECT id, created_at, text, tags FROM memory_notes WHERE scope=? "
                    "ORDER BY id DESC LIMIT ?",
                    (scope, limit),
                ).fetchall()
            return db.execute(
                "SELECT n.id, n.created_at, n.text, n.tags FROM memory_notes_fts "
                "JOIN memory_notes AS n ON n.id = memory_notes_fts.rowid "
                "WHERE memory_notes_fts MATCH ? AND n.scope=? "
                "ORDER BY bm25(memory_notes_fts), n.id DESC LIMIT ?",
                (match, scope, limit),
            ).fetchall()

        return [_note(scope, row) for row in await self._read(op)]


def fts_query(query: str) -> str:
    """An FTS5 query matching any of the words of `query` (`query_words`), each quoted (a
    phrase of the tokens it holds, never syntax); "" when it has none."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in query_words(query))
