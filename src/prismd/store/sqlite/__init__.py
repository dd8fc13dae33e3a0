"""SQLite store: one database (`prismd.db`) for everything, one writer thread, readers apart.

Every session is rows keyed by its id in the same file (one WAL, one commit per batch of queued
writes across all sessions). Until this layout, each session had a database of its own
(`sessions/<id>.db`); such files are imported at start, once (see `_import_legacy`), and
`prismd sessions export ID` still writes one session as a standalone file in that layout.

`SqliteStore` is made of one part per concept, each a class of its own module, all built on
`SqliteCore`:

- core.py      the writer thread (batches, one commit each, failures) and the reader threads
- schema.py    the tables, their migrations, the import of older layouts (`sessions/<id>.db`,
               `memory.db`)
- sessions.py  session rows: create, list, update, delete; usage totals over their turns
- log.py       one session's log: messages and their files, events, turns, activity, export
- agents.py    the agents: the configuration's and those users made
- accounts.py  users, login sessions, API tokens, preferences
- uploads.py   uploads (files under `uploads/`), their links to sessions, daily chat totals
- notes.py     the agents' memory notes, searched with FTS5

What the PostgreSQL store shares with it is in store/common.py (column lists, row conversion)
and store/session_file.py (a session as a standalone file).
"""

from __future__ import annotations

from ..common import _FILE_COLUMNS, _MESSAGE_COLUMNS, _SESSION_FIELDS_ORDER, _TURN_COLUMNS
from ..session_file import LEGACY_SESSION_SCHEMA
from .accounts import SqliteAccounts
from .agents import SqliteAgents
from .log import SqliteLog
from .notes import SqliteNotes, fts_query
from .schema import NOTE_ID_IS_FREE, NOTE_IS_HERE, SqliteSchema
from .sessions import SqliteSessions
from .uploads import SqliteUploads


class SqliteStore(
    SqliteSchema,
    SqliteSessions,
    SqliteLog,
    SqliteAgents,
    SqliteAccounts,
    SqliteUploads,
    SqliteNotes,
):
    """The Store interface (store/base.py) on one SQLite database in `data_dir`."""


__all__ = [
    "LEGACY_SESSION_SCHEMA",
    "NOTE_ID_IS_FREE",
    "NOTE_IS_HERE",
    "SqliteStore",
    "_FILE_COLUMNS",
    "_MESSAGE_COLUMNS",
    "_SESSION_FIELDS_ORDER",
    "_TURN_COLUMNS",
    "fts_query",
]
