"""PostgreSQL store: everything durable in one PostgreSQL database, shared by every prismd process
on every machine (`[store] url` / PRISMD_DATABASE_URL).

The same layout as the SQLite store (store/sqlite/): sessions are rows keyed by their id, a
session's event log is `session_events` with primary key (session_id, seq). The same semantics
too: one writer applies the queued writes in batches, reads see what is committed (core.py).

`PostgresStore` is made of one part per concept, each a class of its own module, all built on
`PostgresCore`:

- connection.py  connecting, what counts as the server being unavailable
- core.py        the writer task (batches, one transaction each, failures) and the pool
- schema.py      the versioned schema: its migrations and `migrate`
- sessions.py    session rows: create, list, update, delete; usage totals over their turns
- log.py         one session's log: messages and their files, events, turns, activity, export
- leases.py      which process runs a session's turn; the turns a dead process left running
- agents.py      the agents: the configuration's and those users made
- accounts.py    users, login sessions, API tokens, preferences, the credentials version
- uploads.py     uploads (their bytes in the database), their links to sessions, daily totals
- notes.py       the agents' memory notes: full text search with FTS5's tokens

What it shares with the SQLite store is in store/common.py (column lists, row conversion) and
store/session_file.py (a session as a standalone file).
"""

from __future__ import annotations

from ..base import StoreUnavailable
from .accounts import PostgresAccounts
from .agents import PostgresAgents
from .connection import connect, describe_url
from .leases import PostgresLeases
from .log import PostgresLog
from .notes import PostgresNotes, note_query, note_tokens, note_vector
from .schema import MIGRATIONS, SCHEMA_VERSION, migrate
from .sessions import PostgresSessions
from .uploads import PostgresUploads


class PostgresStore(
    PostgresSessions,
    PostgresLog,
    PostgresLeases,
    PostgresAgents,
    PostgresAccounts,
    PostgresUploads,
    PostgresNotes,
):
    """The Store interface (store/base.py) on a PostgreSQL database, and the session leases
    (leases.py) that let several processes share it."""


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresStore",
    "StoreUnavailable",
    "connect",
    "describe_url",
    "migrate",
    "note_query",
    "note_tokens",
    "note_vector",
]
