"""`prismd db import --from-sqlite DATA_DIR`: move an embedded install into PostgreSQL.

The SQLite store is opened on DATA_DIR first, which brings it to the current layout (it imports
the older per-session files, `sessions/<id>.db`, as it does at every start); then every table is
copied, in its own order, in chunks: each chunk is COPYed into a temporary table and inserted
with `ON CONFLICT DO NOTHING`, so that a row already there (a second run, or a run cut off
halfway) is left alone and counted as not moved. Uploads are read from DATA_DIR/uploads/ into
the database. Config agents are not copied: each start writes them from the configuration.

The agents' memory notes (and a `memory.db` of an older install, which opening the SQLite
store imports first) are moved with their search vectors; a note already there (same scope,
time, text and tags) is skipped, the others keep their number when it is free and get a new
one otherwise: the notes of several installs (a machine each) can be moved into one database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .postgres import connect, migrate, note_vector
from .sqlite import (
    _FILE_COLUMNS,
    _MESSAGE_COLUMNS,
    _SESSION_FIELDS_ORDER,
    _TURN_COLUMNS,
    NOTE_ID_IS_FREE,
    NOTE_IS_HERE,
    SqliteStore,
)

CHUNK_ROWS = 5000
CHUNK_BYTES = 64 * 1024 * 1024

# (kind, table, columns, the rows to take and their order). Accounts first, then sessions and
# what hangs off them.
PLAN: tuple[tuple[str, str, str, str], ...] = (
    ("users", "users", "id, name, password_hash, admin, created_at", "ORDER BY rowid"),
    (
        "API tokens",
        "api_tokens",
        "id, user_id, name, token_hash, created_at, last_used_at",
        "ORDER BY rowid",
    ),
    ("login sessions", "login_sessions", "token_hash, user_id, expires_at", "ORDER BY rowid"),
    ("preferences", "user_prefs", "user_id, key, value", "ORDER BY rowid"),
    (
        "agents",
        "agents",
        "id, name, description, provider, model, system_prompt, temperature, tools, builtin, "
        "source, owner_id",
        "WHERE source='user' ORDER BY rowid",
    ),
    ("sessions", "sessions", ", ".join(_SESSION_FIELDS_ORDER), "ORDER BY rowid"),
    ("messages", "session_messages", f"session_id, {_MESSAGE_COLUMNS}", "ORDER BY rowid"),
    ("files", "session_files", f"session_id, {_FILE_COLUMNS}", "ORDER BY rowid"),
    ("turns", "turns", f"session_id, {_TURN_COLUMNS}, start_seq", "ORDER BY rowid"),
    ("events", "session_events", "session_id, seq, turn_id, frame", "ORDER BY session_id, seq"),
)
KINDS = (*(kind for kind, *_ in PLAN), "uploads", "memory notes")
# Columns that SQLite keeps as 0/1 and PostgreSQL as booleans.
_BOOLEANS = {"admin", "builtin"}


class ImportSourceError(Exception):
    """The source cannot be imported (the message says why)."""


def _columns(columns: str) -> list[str]:
    return [c.strip() for c in columns.split(",")]


def _rows(
    db: sqlite3.Connection, table: str, columns: str, rest: str
) -> Iterator[list[Sequence[Any]]]:
    """The table's rows in chunks (booleans converted)."""
    names = _columns(columns)
    booleans = [i for i, name in enumerate(names) if name in _BOOLEANS]
    cur = db.execute(f"SELECT {columns} FROM {table} {rest}")
    while chunk := cur.fetchmany(CHUNK_ROWS):
        if booleans:
            chunk = [
                tuple(bool(v) if i in booleans else v for i, v in enumerate(row)) for row in chunk
            ]
        yield chunk


def _uploads(db: sqlite3.Connection, data_dir: Path) -> Iterator[list[Sequence[Any]]]:
    """Uploads with their bytes (read from DATA_DIR/uploads/USER/ID), in chunks of bounded
    size; an upload whose file is gone is skipped."""
    chunk: list[Sequence[Any]] = []
    size = 0
    for row in db.execute(
        "SELECT id, user_id, filename, mime_type, size, created_at FROM uploads ORDER BY rowid"
    ):
        try:
            data = (data_dir / "uploads" / row[1] / row[0]).read_bytes()
        except (OSError, ValueError):
            continue
        chunk.append((*row, data))
        size += len(data)
        if len(chunk) >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


async def _copy(conn: Any, table: str, names: list[str], chunks: Iterator[Any]) -> int:
    """Insert the rows that are not there yet, in their order; returns how many were."""
    moved = 0
    cols = ", ".join(names)
    for chunk in chunks:
        async with conn.transaction():
            await conn.execute(
                f"CREATE TEMP TABLE import_rows ON COMMIT DROP AS "
                f"SELECT {cols}, 0::bigint AS import_order FROM {table} WITH NO DATA"
            )
            await conn.copy_records_to_table(
                "import_rows",
                records=[(*row, i) for i, row in enumerate(chunk)],
                columns=[*names, "import_order"],
            )
            status = await conn.execute(
                f"INSERT INTO {table} ({cols}) SELECT {cols} FROM import_rows "
                "ORDER BY import_order ON CONFLICT DO NOTHING"
            )
            moved += int(status.rsplit(" ", 1)[-1])
    return moved


def _notes(db: sqlite3.Connection) -> Iterator[list[Sequence[Any]]]:
    """The memory notes with their search vectors (note_vector), in chunks."""
    cur = db.execute("SELECT id, scope, created_at, text, tags FROM memory_notes ORDER BY id")
    while chunk := cur.fetchmany(CHUNK_ROWS):
        yield [(*row, note_vector(row[3], row[4])) for row in chunk]


# Per chunk, as the SQLite store imports a memory.db (NOTE_IS_HERE): a note already there is
# skipped; the others keep their id if it is free, else get the next of the identity (moved
# past every id first). The table is locked meanwhile: no process takes an id in between.
_NOTES_IMPORT = (
    "INSERT INTO memory_notes (id, scope, created_at, text, tags, search) "
    "SELECT id, scope, created_at, text, tags, search::tsvector FROM import_notes o "
    f"WHERE NOT {NOTE_IS_HERE} AND {NOTE_ID_IS_FREE} ORDER BY import_order",
    "SELECT setval(pg_get_serial_sequence('memory_notes', 'id'), "
    "COALESCE(MAX(id), 0) + 1, false) FROM memory_notes",
    "INSERT INTO memory_notes (scope, created_at, text, tags, search) "
    "SELECT scope, created_at, text, tags, search::tsvector FROM import_notes o "
    f"WHERE NOT {NOTE_IS_HERE} ORDER BY import_order",
)


async def _copy_notes(conn: Any, chunks: Iterator[list[Sequence[Any]]]) -> int:
    """Insert the notes that are not there yet (see _NOTES_IMPORT); returns how many were."""
    moved = 0
    names = ["id", "scope", "created_at", "text", "tags", "search", "import_order"]
    for chunk in chunks:
        async with conn.transaction():
            await conn.execute("LOCK TABLE memory_notes IN SHARE ROW EXCLUSIVE MODE")
            await conn.execute(
                "CREATE TEMP TABLE import_notes (id BIGINT, scope TEXT, created_at TEXT, "
                "text TEXT, tags TEXT, search TEXT, import_order BIGINT) ON COMMIT DROP"
            )
            await conn.copy_records_to_table(
                "import_notes",
                records=[(*row, i) for i, row in enumerate(chunk)],
                columns=names,
            )
            for sql in _NOTES_IMPORT:
                status = await conn.execute(sql)
                if status.startswith("INSERT"):
                    moved += int(status.rsplit(" ", 1)[-1])
    return moved


async def import_sqlite(
    data_dir: Path,
    url: str,
    timeout_s: float = 5.0,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Move everything of the embedded install in `data_dir` into the PostgreSQL database at
    `url` (migrated first); returns how many rows of each kind (KINDS) moved."""
    core = data_dir / "prismd.db"
    if not any(
        (core.is_file(), (data_dir / "sessions").is_dir(), (data_dir / "memory.db").is_file())
    ):
        raise ImportSourceError(f"{data_dir} holds no prismd data (no prismd.db)")
    source = SqliteStore(data_dir)
    await source.open()  # the current layout: imports sessions/<id>.db files, adds columns
    await source.close()
    await migrate(url, timeout_s)
    counts: dict[str, int] = {}
    db = sqlite3.connect(f"file:{core}?mode=ro", uri=True)
    conn = await connect(url, timeout_s, command_timeout=None)
    try:
        for kind, table, columns, rest in PLAN:
            chunks = _rows(db, table, columns, rest)
            counts[kind] = await _copy(conn, table, _columns(columns), chunks)
            if progress is not None:
                progress(kind, counts[kind])
        names = ["id", "user_id", "filename", "mime_type", "size", "created_at", "data"]
        counts["uploads"] = await _copy(conn, "uploads", names, _uploads(db, data_dir))
        if progress is not None:
            progress("uploads", counts["uploads"])
        counts["memory notes"] = await _copy_notes(conn, _notes(db))
        if progress is not None:
            progress("memory notes", counts["memory notes"])
    finally:
        db.close()
        await conn.close()
    return counts
