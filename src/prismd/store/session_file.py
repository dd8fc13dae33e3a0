"""One session as a standalone SQLite file: the per-session layout of PROTOCOL.md A4 (before
one database held every session, each had a file of its own, `sessions/<id>.db`).

`prismd sessions export ID` writes one (both stores' `export_session`, with
`write_session_file`); the SQLite store imports the files of that older layout at start
(store/sqlite/schema.py).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .common import _FILE_COLUMNS, _MESSAGE_COLUMNS, _TURN_COLUMNS

# The per-session layout of PROTOCOL.md A4, for `export_session` and the legacy import.
LEGACY_SESSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS session_messages (
  id TEXT PRIMARY KEY, role TEXT NOT NULL, content TEXT NOT NULL DEFAULT '', tool_calls TEXT,
  tool_result TEXT, token_count INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
  turn_id TEXT, status TEXT NOT NULL DEFAULT 'complete', reasoning TEXT,
  meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS session_files (
  id TEXT PRIMARY KEY, message_id TEXT NOT NULL, filename TEXT NOT NULL,
  mime_type TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL, text TEXT
);
CREATE TABLE IF NOT EXISTS session_events (
  seq INTEGER PRIMARY KEY, turn_id TEXT, frame TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
  id TEXT PRIMARY KEY, client_message_id TEXT UNIQUE, status TEXT NOT NULL DEFAULT 'running',
  stop_reason TEXT, started_at TEXT, ended_at TEXT, provider TEXT, model TEXT,
  tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0, cost_usd REAL
);
"""


# A session's tables in a standalone export: (table, columns, the order of its rows here).
EXPORT_TABLES = (
    ("session_messages", _MESSAGE_COLUMNS, "rowid"),
    ("session_files", _FILE_COLUMNS, "rowid"),
    ("session_events", "seq, turn_id, frame", "seq"),
    ("turns", _TURN_COLUMNS, "rowid"),
)


def write_session_file(path: str, rows: Callable[[str, str, str], Iterable[Sequence[Any]]]) -> None:
    """Write one session as a standalone SQLite database in the per-session layout
    (LEGACY_SESSION_SCHEMA), under a temporary name renamed into place. `rows(table, columns,
    order)` gives each table of EXPORT_TABLES's rows, in that order."""
    tmp = f"{path}.tmp"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    out = sqlite3.connect(tmp)
    try:
        out.executescript(LEGACY_SESSION_SCHEMA)
        for table, columns, order in EXPORT_TABLES:
            marks = ",".join("?" * len(columns.split(",")))
            out.executemany(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows(table, columns, order)
            )
        out.commit()
    finally:
        out.close()
    os.replace(tmp, path)
