"""SQLite store: one database (`prismd.db`) for everything, one writer thread, readers apart.

Every session is rows keyed by its id in the same file (one WAL, one commit per batch of queued
writes across all sessions). Until this layout, each session had a database of its own
(`sessions/<id>.db`); such files are imported at start, once (see `_import_legacy`), and
`prismd sessions export ID` still writes one session as a standalone file in that layout.

Writes are queued to the writer thread, which drains whatever is queued, runs it, commits once,
and then resolves the writes' futures on the event loop in one callback: under load many small
writes (stream events) share one commit, and the event loop never waits on the disk. Reads run
on a small pool of reader threads with connections of their own (WAL readers do not block the
writer nor wait for it), so history loads, replays and credential lookups never queue behind a
batch of events. A read sees what is committed.

Durability: WAL with synchronous=NORMAL. A committed batch survives a process crash (kill -9);
an OS crash or power loss may lose the last batches, never corrupt the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..protocol import SESSION_ID_RE
from .base import (
    LOCAL_USER_ID,
    EventRow,
    FileRecord,
    LoginRecord,
    MessageRecord,
    NoteRecord,
    SessionActivity,
    SessionLog,
    SessionRecord,
    Store,
    StoreUnavailable,
    StreamingMessage,
    TokenRecord,
    TouchLimiter,
    UploadRecord,
    UsageTotals,
    UserRecord,
    Written,
    note_time,
    query_words,
)

log = logging.getLogger("prismd.store")
T = TypeVar("T")

# Agent ids are per user: (owner_id, id) is the key; config agents have owner ''.
AGENTS_TABLE = """
CREATE TABLE IF NOT EXISTS agents (
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  provider TEXT,
  model TEXT,
  system_prompt TEXT NOT NULL DEFAULT '',
  temperature REAL,
  tools TEXT NOT NULL DEFAULT '[]',
  builtin INTEGER NOT NULL DEFAULT 0,
  source TEXT NOT NULL DEFAULT 'config',
  owner_id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (owner_id, id)
);
"""
CORE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL DEFAULT '',
  agent_id TEXT NOT NULL,
  channel TEXT NOT NULL DEFAULT 'web',
  status TEXT NOT NULL DEFAULT 'active',
  turn_count INTEGER NOT NULL DEFAULT 0,
  started_at TEXT NOT NULL,
  last_turn_at TEXT,
  closed_at TEXT,
  parent_session_id TEXT,
  tokens_in INTEGER NOT NULL DEFAULT 0,
  tokens_out INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL
);
CREATE INDEX IF NOT EXISTS sessions_recent ON sessions(last_turn_at DESC, started_at DESC);
{AGENTS_TABLE}CREATE TABLE IF NOT EXISTS users (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL DEFAULT '',
  admin INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS login_sessions (
  token_hash TEXT PRIMARY KEY,
  user_id TEXT NOT NULL,
  expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
  id TEXT PRIMARY KEY,
  user_id TEXT NOT NULL,
  name TEXT NOT NULL DEFAULT '',
  token_hash TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS user_prefs (
  user_id TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (user_id, key)
);
CREATE TABLE IF NOT EXISTS uploads (
  id TEXT PRIMARY KEY,
  user_id TEXT NOT NULL,
  filename TEXT NOT NULL,
  mime_type TEXT NOT NULL,
  size INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_user ON uploads(user_id);
CREATE TABLE IF NOT EXISTS upload_refs (
  upload_id TEXT NOT NULL,
  session_id TEXT NOT NULL,
  PRIMARY KEY (upload_id, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS upload_refs_session ON upload_refs(session_id);
CREATE TABLE IF NOT EXISTS chat_usage (
  user_id TEXT NOT NULL,
  day TEXT NOT NULL,
  bytes INTEGER NOT NULL DEFAULT 0,
  files INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (user_id, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_messages (
  id TEXT PRIMARY KEY,
  session_id TEXT NOT NULL,
  role TEXT NOT NULL,
  content TEXT NOT NULL DEFAULT '',
  tool_calls TEXT,
  tool_result TEXT,
  token_count INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  turn_id TEXT,
  status TEXT NOT NULL DEFAULT 'complete',
  reasoning TEXT,
  meta TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS session_messages_session ON session_messages(session_id);
CREATE TABLE IF NOT EXISTS session_files (
  id TEXT PRIMARY KEY,
  session_id TEXT NOT NULL,
  message_id TEXT NOT NULL,
  filename TEXT NOT NULL,
  mime_type TEXT NOT NULL,
  size INTEGER NOT NULL,
  data BLOB NOT NULL,
  text TEXT
);
CREATE INDEX IF NOT EXISTS session_files_session ON session_files(session_id, message_id);
CREATE TABLE IF NOT EXISTS session_events (
  session_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  turn_id TEXT,
  frame TEXT NOT NULL,
  PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
  id TEXT PRIMARY KEY,
  session_id TEXT NOT NULL,
  client_message_id TEXT,
  status TEXT NOT NULL DEFAULT 'running',
  stop_reason TEXT,
  started_at TEXT,
  ended_at TEXT,
  provider TEXT,
  model TEXT,
  tokens_in INTEGER NOT NULL DEFAULT 0,
  tokens_out INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL,
  start_seq INTEGER
);
CREATE INDEX IF NOT EXISTS turns_session ON turns(session_id, client_message_id);
CREATE INDEX IF NOT EXISTS turns_running ON turns(status) WHERE status = 'running';
"""
# The agents' memory notes (until this layout, `memory.db`: see `_import_memory`). Text and
# tags are indexed with FTS5 (an external-content table kept by triggers); searches rank with
# bm25.
NOTES_SCHEMA = """
CREATE TABLE IF NOT EXISTS memory_notes (
  id INTEGER PRIMARY KEY,
  scope TEXT NOT NULL,
  created_at TEXT NOT NULL,
  text TEXT NOT NULL,
  tags TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS memory_notes_scope ON memory_notes(scope, id);
CREATE VIRTUAL TABLE IF NOT EXISTS memory_notes_fts USING fts5(
  text, tags, content='memory_notes', content_rowid='id',
  tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS memory_notes_ai AFTER INSERT ON memory_notes BEGIN
  INSERT INTO memory_notes_fts(rowid, text, tags) VALUES (new.id, new.text, new.tags);
END;
CREATE TRIGGER IF NOT EXISTS memory_notes_ad AFTER DELETE ON memory_notes BEGIN
  INSERT INTO memory_notes_fts(memory_notes_fts, rowid, text, tags)
  VALUES ('delete', old.id, old.text, old.tags);
END;
"""
# Columns added after the first release: (table, column, definition).
CORE_MIGRATIONS = (
    ("sessions", "owner_id", f"TEXT NOT NULL DEFAULT '{LOCAL_USER_ID}'"),
    ("login_sessions", "created_at", "REAL"),
)
# Agent ids became per user: a database whose agents table is keyed by id alone is rebuilt
# with the key (owner_id, id) (config agents have owner '').
_AGENT_COLUMNS = (
    "id, name, description, provider, model, system_prompt, temperature, tools, builtin, source"
)
AGENTS_PER_USER = f"""
ALTER TABLE agents RENAME TO agents_v1;
{AGENTS_TABLE}
INSERT INTO agents ({_AGENT_COLUMNS}, owner_id)
  SELECT {_AGENT_COLUMNS},
    CASE WHEN source='user' THEN coalesce({{owner}}, '{LOCAL_USER_ID}') ELSE '' END
  FROM agents_v1;
DROP TABLE agents_v1;
"""

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
_MESSAGE_COLUMNS = (
    "id, role, content, tool_calls, tool_result, token_count, created_at, turn_id, status, "
    "reasoning, meta"
)
_FILE_COLUMNS = "id, message_id, filename, mime_type, size, data, text"
_TURN_COLUMNS = (
    "id, client_message_id, status, stop_reason, started_at, ended_at, provider, model, "
    "tokens_in, tokens_out, cost_usd"
)

_SESSION_FIELDS_ORDER = (
    "id",
    "name",
    "agent_id",
    "channel",
    "status",
    "turn_count",
    "started_at",
    "last_turn_at",
    "closed_at",
    "parent_session_id",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "owner_id",
)
_SESSION_COLUMNS = ", ".join(_SESSION_FIELDS_ORDER)
_SESSION_MARKS = ",".join("?" * len(_SESSION_FIELDS_ORDER))
_MESSAGE_FIELDS = {"content", "status", "token_count", "reasoning", "meta", "tool_calls"}
_SESSION_FIELDS = {"name", "agent_id", "status", "closed_at", "last_turn_at", "channel"}
_TURN_FIELDS = {
    "client_message_id",
    "status",
    "stop_reason",
    "started_at",
    "ended_at",
    "provider",
    "model",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "start_seq",
}
# An upload no existing session refers to (a link whose session is gone does not count: a
# session deleted by a process that did not clean its links frees its uploads all the same).
_UNREFERENCED = (
    "NOT EXISTS (SELECT 1 FROM upload_refs r JOIN sessions s ON s.id = r.session_id "
    "WHERE r.upload_id = uploads.id)"
)
MAX_BATCH = 4096
# A write's outcome: (its future, its value, its error).
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]
READERS = 2
# A token's last use is written at most this often (every request used to write it).
TOKEN_TOUCH_S = 60.0
_STOP = object()


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    conn.execute("PRAGMA busy_timeout=5000")
    if readonly:
        conn.execute("PRAGMA query_only=1")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteStore(Store):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "prismd.db"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._token_touched = TouchLimiter(TOKEN_TOUCH_S)

    # ------------------------------------------------------------ machinery

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="prismd-store", daemon=True)
        self._thread.start()
        await self._call(self._open_db)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="prismd-read")

    def _open_db(self) -> None:
        db = self._db = _connect(self.path)
        db.executescript(CORE_SCHEMA)
        for table, column, definition in CORE_MIGRATIONS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        agent_key = [r[1] for r in db.execute("PRAGMA table_info(agents)") if r[5]]
        if agent_key == ["id"]:
            have = {r[1] for r in db.execute("PRAGMA table_info(agents)")}
            owner = "owner_id" if "owner_id" in have else "NULL"
            db.commit()
            db.executescript(AGENTS_PER_USER.format(owner=owner))
        db.execute("CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner_id)")
        db.executescript(NOTES_SCHEMA)
        db.commit()
        self._import_legacy()
        self._import_memory()
        (self.data_dir / "session-template.db").unlink(missing_ok=True)

    async def close(self) -> None:
        if self._thread is None:
            return
        await self.flush()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results = self._apply([item for item in batch if item is not _STOP])
            if results and self._loop is not None:
                self._loop.call_soon_threadsafe(_resolve_all, results)
            if _STOP in batch:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                return

    def _apply(self, writes: list[tuple[Callable[[], Any], Written]]) -> list[_Result]:
        """Run a batch's writes in one transaction and commit it. A write that fails fails
        alone, and nothing of it is kept: the batch is rolled back and its writes run again
        one by one, each committed on its own. If the database cannot be used (locked, disk
        full) or the commit fails, every write of the batch fails."""
        results: list[_Result] = []
        for fn, fut in writes:
            try:
                value = _run_write(fn)
            except Exception as exc:  # noqa: BLE001 - reported to the callers and logged
                self._rollback()
                failed = _unavailable(exc)
                if isinstance(failed, StoreUnavailable):  # the others would fail the same way
                    log.error("store write failed: %s", failed)
                    return [(f, None, failed) for _, f in writes]
                log.warning("a store write failed (%s); running the batch's writes one by one", exc)
                return [self._alone(fn, fut) for fn, fut in writes]
            results.append((fut, value, None))
        return self._commit(results)

    def _alone(self, fn: Callable[[], Any], fut: Written) -> _Result:
        try:
            value = _run_write(fn)
        except Exception as exc:  # noqa: BLE001 - reported to the caller and logged
            log.exception("store write failed")
            self._rollback()
            return (fut, None, _unavailable(exc))
        return self._commit([(fut, value, None)])[0]

    def _commit(self, results: list[_Result]) -> list[_Result]:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.commit()
            except sqlite3.Error as exc:
                log.exception("store commit failed")
                # Nothing of this batch is durable: every write of it failed.
                failed = _unavailable(exc)
                self._rollback()
                return [(f, None, failed) for f, _, _ in results]
        return results

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.rollback()
            except sqlite3.Error:
                log.exception("store rollback failed")

    def _submit(self, fn: Callable[[], Any]) -> Written:
        """Queue a write; the future resolves once it is committed."""
        assert self._loop is not None, "store is not open"
        fut: Written = self._loop.create_future()
        self._queue.put((fn, fut))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, fut))
        return await fut

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._readers is not None, "store is not open"
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._on_reader, fn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path, readonly=True)
            self._reader_conns.append(conn)
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.rollback()  # end the read snapshot

    async def flush(self) -> None:
        await self._call(lambda: None)

    def _w(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    # ------------------------------------------------------------ sessions

    def create_session(self, record: SessionRecord) -> Written:
        row = _session_row(record)
        return self._submit(
            lambda: self._w().execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({_SESSION_MARKS}) "
                "ON CONFLICT(id) DO NOTHING",
                row,
            )
        )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def op(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=?", (session_id,)
            ).fetchone()
            return _session_record(row) if row else None

        return await self._read(op)

    async def list_sessions(
        self,
        limit: int,
        offset: int,
        agent_id: str | None = None,
        *,
        owner_id: str | None = None,
        query: str | None = None,
        statuses: tuple[str, ...] | None = None,
        order: str = "activity",
    ) -> tuple[list[SessionRecord], int]:
        conds: list[str] = []
        args: list[Any] = []
        if agent_id:
            conds.append("agent_id=?")
            args.append(agent_id)
        if owner_id is not None:
            conds.append("owner_id=?")
            args.append(owner_id)
        if query:
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append("name LIKE ? ESCAPE '\\'")
            args.append(f"%{escaped}%")
        if statuses is not None:
            conds.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        sort = "started_at" if order == "started" else "COALESCE(last_turn_at, started_at)"

        def op(db: sqlite3.Connection) -> tuple[list[SessionRecord], int]:
            total = db.execute(f"SELECT COUNT(*) FROM sessions {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions {where} "
                f"ORDER BY {sort} DESC, rowid DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [_session_record(r) for r in rows], total

        return await self._read(op)

    def update_session(self, session_id: str, **fields: Any) -> Written:
        _check_fields(fields, _SESSION_FIELDS)
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [*fields.values(), session_id]
        return self._submit(
            lambda: self._w().execute(f"UPDATE sessions SET {sets} WHERE id=?", values)
        )

    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> Written:
        return self._submit(
            lambda: self._w().execute(
                "UPDATE sessions SET turn_count=turn_count+1, last_turn_at=?, "
                "tokens_in=tokens_in+?, tokens_out=tokens_out+?, "
                "cost_usd=CASE WHEN ? IS NULL THEN cost_usd ELSE COALESCE(cost_usd,0)+? END "
                "WHERE id=?",
                (at, tokens_in, tokens_out, cost_usd, cost_usd, session_id),
            )
        )

    async def delete_session(self, session_id: str) -> bool:
        def op() -> bool:
            db = self._w()
            for table in ("session_messages", "session_files", "session_events", "turns"):
                db.execute(f"DELETE FROM {table} WHERE session_id=?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id=?", (session_id,)).rowcount > 0

        return await self._call(op)

    # ------------------------------------------------------------ agents

    async def sync_agents(self, agents: list[dict[str, Any]]) -> None:
        def op() -> None:
            db = self._w()
            db.execute("DELETE FROM agents WHERE source='config'")
            db.executemany(
                "INSERT OR REPLACE INTO agents (id, name, description, provider, model, "
                "system_prompt, temperature, tools, builtin, source) "
                "VALUES (:id,:name,:description,:provider,:model,:system_prompt,:temperature,"
                ":tools,:builtin,'config')",
                [{**a, "tools": json.dumps(a.get("tools", []))} for a in agents],
            )

        await self._call(op)

    async def list_custom_agents(self) -> list[dict[str, Any]]:
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = db.execute(
                "SELECT id, name, description, provider, model, system_prompt, temperature, "
                "tools, owner_id FROM agents WHERE source='user' ORDER BY rowid"
            )
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            for row in rows:
                row["tools"] = json.loads(row["tools"] or "[]")
            return rows

        return await self._read(op)

    async def save_agent(self, row: dict[str, Any], owner_id: str) -> None:
        values = {**row, "tools": json.dumps(row.get("tools", [])), "owner_id": owner_id}
        await self._call(
            lambda: self._w().execute(
                "INSERT OR REPLACE INTO agents (id, name, description, provider, model, "
                "system_prompt, temperature, tools, builtin, source, owner_id) "
                "VALUES (:id,:name,:description,:provider,:model,:system_prompt,:temperature,"
                ":tools,0,'user',:owner_id)",
                values,
            )
        )

    async def delete_agent(self, agent_id: str, owner_id: str) -> bool:
        return await self._call(
            lambda: (
                self._w()
                .execute(
                    "DELETE FROM agents WHERE id=? AND owner_id=? AND source='user'",
                    (agent_id, owner_id),
                )
                .rowcount
                > 0
            )
        )

    # ------------------------------------------------------------ users and credentials

    _USER_COLUMNS = "id, name, admin, password_hash, created_at"

    async def data_version(self) -> int:
        """SQLite's `PRAGMA data_version` on the writer's connection: it changes only when
        another connection (another process: the CLI) commits, never for this store's writes
        (its readers never write)."""
        return await self._call(lambda: int(self._w().execute("PRAGMA data_version").fetchone()[0]))

    async def count_users(self) -> int:
        return await self._read(
            lambda db: int(db.execute("SELECT COUNT(*) FROM users").fetchone()[0])
        )

    async def create_user(self, user: UserRecord) -> None:
        await self._call(
            lambda: self._w().execute(
                "INSERT INTO users (id, name, admin, password_hash, created_at) VALUES (?,?,?,?,?)",
                (user.id, user.name, int(user.admin), user.password_hash, user.created_at),
            )
        )

    def _user_where(self, db: sqlite3.Connection, where: str, *args: Any) -> UserRecord | None:
        row = db.execute(f"SELECT {self._USER_COLUMNS} FROM users WHERE {where}", args).fetchone()
        return _user_record(row) if row else None

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._read(lambda db: self._user_where(db, "id=?", user_id))

    async def get_user_by_name(self, name: str) -> UserRecord | None:
        return await self._read(lambda db: self._user_where(db, "name=?", name))

    async def list_users(self) -> list[UserRecord]:
        def op(db: sqlite3.Connection) -> list[UserRecord]:
            rows = db.execute(f"SELECT {self._USER_COLUMNS} FROM users ORDER BY created_at, rowid")
            return [_user_record(r) for r in rows.fetchall()]

        return await self._read(op)

    async def delete_user(self, user_id: str) -> bool:
        def op() -> bool:
            db = self._w()
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM api_tokens WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM user_prefs WHERE user_id=?", (user_id,))
            return db.execute("DELETE FROM users WHERE id=?", (user_id,)).rowcount > 0

        return await self._call(op)

    async def set_password(self, user_id: str, password_hash: str) -> None:
        def op() -> None:
            db = self._w()
            db.execute("UPDATE users SET password_hash=? WHERE id=?", (password_hash, user_id))
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))

        await self._call(op)

    async def create_login(self, token_hash: str, user_id: str, expires_at: float) -> None:
        def op() -> None:
            db = self._w()
            db.execute("DELETE FROM login_sessions WHERE expires_at<?", (time.time(),))
            db.execute(
                "INSERT INTO login_sessions (token_hash, user_id, expires_at, created_at) "
                "VALUES (?,?,?,?)",
                (token_hash, user_id, expires_at, time.time()),
            )

        await self._call(op)

    async def login_user(self, token_hash: str, now: float) -> UserRecord | None:
        def op(db: sqlite3.Connection) -> tuple[UserRecord | None, bool]:
            row = db.execute(
                "SELECT user_id, expires_at FROM login_sessions WHERE token_hash=?", (token_hash,)
            ).fetchone()
            if row is None:
                return None, False
            if row[1] < now:
                return None, True
            return self._user_where(db, "id=?", row[0]), False

        user, expired = await self._read(op)
        if expired:
            self._submit(
                lambda: self._w().execute(
                    "DELETE FROM login_sessions WHERE token_hash=?", (token_hash,)
                )
            )
        return user

    async def delete_login(self, token_hash: str) -> None:
        await self._call(
            lambda: self._w().execute(
                "DELETE FROM login_sessions WHERE token_hash=?", (token_hash,)
            )
        )

    async def create_token(self, token: TokenRecord) -> None:
        await self._call(
            lambda: self._w().execute(
                "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) "
                "VALUES (?,?,?,?,?)",
                (token.id, token.user_id, token.name, token.token_hash, token.created_at),
            )
        )

    async def list_tokens(self) -> list[TokenRecord]:
        def op(db: sqlite3.Connection) -> list[TokenRecord]:
            rows = db.execute(
                "SELECT id, user_id, name, token_hash, created_at, last_used_at FROM api_tokens "
                "ORDER BY created_at, rowid"
            )
            return [TokenRecord(*r) for r in rows.fetchall()]

        return await self._read(op)

    async def revoke_token(self, token_id: str) -> bool:
        return await self._call(
            lambda: self._w().execute("DELETE FROM api_tokens WHERE id=?", (token_id,)).rowcount > 0
        )

    async def token_user(self, token_hash: str, now: str) -> UserRecord | None:
        def op(db: sqlite3.Connection) -> tuple[str, UserRecord | None] | None:
            row = db.execute(
                "SELECT id, user_id FROM api_tokens WHERE token_hash=?", (token_hash,)
            ).fetchone()
            return None if row is None else (row[0], self._user_where(db, "id=?", row[1]))

        found = await self._read(op)
        if found is None:
            return None
        token_id, user = found
        # Recording the last use is not worth a write per request.
        if self._token_touched.due(token_id):
            self._submit(
                lambda: self._w().execute(
                    "UPDATE api_tokens SET last_used_at=? WHERE id=?", (now, token_id)
                )
            )
        return user

    async def get_pref(self, user_id: str, key: str) -> str | None:
        def op(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT value FROM user_prefs WHERE user_id=? AND key=?", (user_id, key)
            ).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def set_pref(self, user_id: str, key: str, value: str | None) -> None:
        def op() -> None:
            db = self._w()
            if value is None:
                db.execute("DELETE FROM user_prefs WHERE user_id=? AND key=?", (user_id, key))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO user_prefs (user_id, key, value) VALUES (?,?,?)",
                    (user_id, key, value),
                )

        await self._call(op)

    # ------------------------------------------------------------ uploads

    def _upload_path(self, user_id: str, upload_id: str) -> Path:
        # Both ids are generated by the server (new_id / LOCAL_USER_ID); checked anyway.
        if not SESSION_ID_RE.match(user_id) or not SESSION_ID_RE.match(upload_id):
            raise ValueError("invalid upload path")
        return self.data_dir / "uploads" / user_id / upload_id

    async def save_upload(self, upload: UploadRecord) -> None:
        path = self._upload_path(upload.user_id, upload.id)
        # The bytes are written by a thread of their own (not the writer, which would hold up
        # every stream's events for a 10 MB file), under a temporary name renamed into place:
        # nothing ever reads a half-written upload.
        await asyncio.to_thread(_write_atomically, path, upload.data)
        await self._call(
            lambda: self._w().execute(
                "INSERT INTO uploads (id, user_id, filename, mime_type, size, created_at) "
                "VALUES (?,?,?,?,?,?)",
                (
                    upload.id,
                    upload.user_id,
                    upload.filename,
                    upload.mime_type,
                    upload.size,
                    upload.created_at,
                ),
            )
        )

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        def op(db: sqlite3.Connection) -> UploadRecord | None:
            row = db.execute(
                "SELECT id, user_id, filename, mime_type, size, created_at FROM uploads WHERE id=?",
                (upload_id,),
            ).fetchone()
            if row is None:
                return None
            upload = UploadRecord(*row)
            try:
                upload.data = self._upload_path(upload.user_id, upload.id).read_bytes()
            except (OSError, ValueError):
                return None
            return upload

        return await self._read(op)

    async def upload_usage(self, user_id: str) -> tuple[int, int]:
        def op(db: sqlite3.Connection) -> tuple[int, int]:
            size, count = db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM uploads WHERE user_id=?", (user_id,)
            ).fetchone()
            return int(size), int(count)

        return await self._read(op)

    async def _remove_uploads(self, where: str, args: tuple[Any, ...]) -> int:
        """Delete the upload rows matching `where` (and their links) in the writer, then their
        files: a row is gone before its file, so nothing reads a half-removed upload."""

        def op() -> list[tuple[str, str]]:
            db = self._w()
            rows = db.execute(f"SELECT id, user_id FROM uploads WHERE {where}", args).fetchall()
            db.executemany("DELETE FROM upload_refs WHERE upload_id=?", [(r[0],) for r in rows])
            db.executemany("DELETE FROM uploads WHERE id=?", [(r[0],) for r in rows])
            return rows

        rows = await self._call(op)
        paths = []
        for upload_id, user_id in rows:
            try:
                paths.append(self._upload_path(user_id, upload_id))
            except ValueError:
                continue
        if paths:
            await asyncio.to_thread(_unlink_all, paths)
        return len(rows)

    async def delete_upload(self, upload_id: str) -> bool:
        return await self._remove_uploads("id=?", (upload_id,)) > 0

    def link_uploads(self, session_id: str, upload_ids: list[str]) -> Written:
        rows = [(u, session_id) for u in dict.fromkeys(upload_ids)]
        return self._submit(
            lambda: self._w().executemany(
                "INSERT OR IGNORE INTO upload_refs (upload_id, session_id) VALUES (?,?)", rows
            )
        )

    async def delete_session_uploads(self, session_id: str) -> int:
        # The session's own links go first: what is then unreferenced among its uploads goes.
        ids = await self._call(
            lambda: [
                r[0]
                for r in self._w()
                .execute(
                    "DELETE FROM upload_refs WHERE session_id=? RETURNING upload_id", (session_id,)
                )
                .fetchall()
            ]
        )
        removed = 0
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            marks = ",".join("?" * len(part))
            removed += await self._remove_uploads(
                f"id IN ({marks}) AND {_UNREFERENCED}",
                tuple(part),
            )
        return removed

    async def prune_uploads(self, created_before: str) -> int:
        return await self._remove_uploads(
            f"created_at < ? AND {_UNREFERENCED}",
            (created_before,),
        )

    async def chat_usage(self, user_id: str, day: str) -> tuple[int, int]:
        def op(db: sqlite3.Connection) -> tuple[int, int]:
            row = db.execute(
                "SELECT bytes, files FROM chat_usage WHERE user_id=? AND day=?", (user_id, day)
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return await self._read(op)

    def add_chat_usage(self, user_id: str, day: str, size: int, files: int) -> Written:
        def op() -> None:
            db = self._w()
            db.execute("DELETE FROM chat_usage WHERE user_id=? AND day<?", (user_id, day))
            db.execute(
                "INSERT INTO chat_usage (user_id, day, bytes, files) VALUES (?,?,?,?) "
                "ON CONFLICT(user_id, day) DO UPDATE SET bytes=bytes+excluded.bytes, "
                "files=files+excluded.files",
                (user_id, day, size, files),
            )

        return self._submit(op)

    async def usage_totals(self, owner_id: str | None, since: str | None = None) -> UsageTotals:
        conds = ["t.status IN ('complete', 'stopped')"]
        args: list[Any] = []
        if owner_id is not None:
            conds.append("s.owner_id=?")
            args.append(owner_id)
        if since is not None:
            conds.append("t.ended_at>=?")
            args.append(since)

        def op(db: sqlite3.Connection) -> UsageTotals:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(t.tokens_in), 0), COALESCE(SUM(t.tokens_out), 0), "
                "COALESCE(SUM(t.cost_usd), 0), COALESCE(SUM(t.cost_usd IS NULL), 0), "
                "COUNT(DISTINCT t.session_id) "
                "FROM turns t JOIN sessions s ON s.id = t.session_id "
                f"WHERE {' AND '.join(conds)}",
                args,
            ).fetchone()
            return UsageTotals(
                int(row[0]), int(row[1]), int(row[2]), float(row[3]), int(row[4]), int(row[5])
            )

        return await self._read(op)

    async def list_logins(self, user_id: str | None = None) -> list[LoginRecord]:
        where = "expires_at>=?"
        args: list[Any] = [time.time()]
        if user_id is not None:
            where += " AND user_id=?"
            args.append(user_id)

        def op(db: sqlite3.Connection) -> list[LoginRecord]:
            rows = db.execute(
                "SELECT token_hash, user_id, created_at, expires_at FROM login_sessions "
                f"WHERE {where} ORDER BY COALESCE(created_at, 0) DESC, expires_at DESC",
                args,
            ).fetchall()
            return [LoginRecord(*r) for r in rows]

        return await self._read(op)

    async def get_session_file(self, session_id: str, file_id: str) -> FileRecord | None:
        def op(db: sqlite3.Connection) -> FileRecord | None:
            row = db.execute(
                "SELECT id, filename, mime_type, size, data, text FROM session_files "
                "WHERE session_id=? AND id=?",
                (session_id, file_id),
            ).fetchone()
            return FileRecord(*row) if row else None

        return await self._read(op)

    # ------------------------------------------------------------ memory notes

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

    # ------------------------------------------------------------ one session's log

    async def open_log(self, session_id: str) -> SessionLog:
        def op(db: sqlite3.Connection) -> SessionLog:
            lo, hi = db.execute(
                "SELECT MIN(seq), MAX(seq) FROM session_events WHERE session_id=?", (session_id,)
            ).fetchone()
            turns = db.execute(
                "SELECT id, client_message_id, status FROM turns WHERE session_id=?",
                (session_id,),
            ).fetchall()
            streaming = [
                StreamingMessage(mid, turn_id, content, json.loads(meta or "{}").get("startSeq"))
                for mid, turn_id, content, meta in db.execute(
                    "SELECT id, turn_id, content, meta FROM session_messages "
                    "WHERE session_id=? AND status='streaming' ORDER BY rowid",
                    (session_id,),
                )
            ]
            return SessionLog(
                last_seq=hi or 0,
                first_seq=lo if lo else (hi or 0) + 1,
                client_turns={cmid: tid for tid, cmid, _ in turns if cmid is not None},
                running_turns=[tid for tid, _, status in turns if status == "running"],
                streaming=streaming,
            )

        return await self._read(op)

    async def crashed_sessions(self) -> list[str]:
        return await self._read(
            lambda db: [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT session_id FROM turns WHERE status='running'"
                ).fetchall()
            ]
        )

    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]:
        return await self._read(lambda db: _messages(db, session_id, with_file_data))

    def add_message(self, session_id: str, message: MessageRecord) -> Written:
        row = (
            message.id,
            session_id,
            message.role,
            message.content,
            message.tool_calls,
            message.tool_result,
            message.token_count,
            message.created_at,
            message.turn_id,
            message.status,
            message.reasoning,
            json.dumps(message.meta),
        )
        files = [
            (f.id, session_id, message.id, f.filename, f.mime_type, f.size, f.data, f.text)
            for f in message.files
        ]

        def op() -> None:
            db = self._w()
            db.execute(
                "INSERT INTO session_messages (id, session_id, role, content, tool_calls, "
                "tool_result, token_count, created_at, turn_id, status, reasoning, meta) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            if files:
                db.executemany(
                    "INSERT INTO session_files (id, session_id, message_id, filename, "
                    "mime_type, size, data, text) VALUES (?,?,?,?,?,?,?,?)",
                    files,
                )

        return self._submit(op)

    def update_message(self, session_id: str, message_id: str, **fields: Any) -> Written:
        _check_fields(fields, _MESSAGE_FIELDS)
        if "meta" in fields:
            fields["meta"] = json.dumps(fields["meta"])
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [*fields.values(), message_id, session_id]
        return self._submit(
            lambda: self._w().execute(
                f"UPDATE session_messages SET {sets} WHERE id=? AND session_id=?", values
            )
        )

    def delete_messages(
        self, session_id: str, message_ids: list[str], forget_turns: list[str] | None = None
    ) -> Written:
        def op() -> None:
            db = self._w()
            ids = [(session_id, m) for m in message_ids]
            db.executemany("DELETE FROM session_files WHERE session_id=? AND message_id=?", ids)
            db.executemany("DELETE FROM session_messages WHERE session_id=? AND id=?", ids)
            db.executemany(
                "UPDATE turns SET client_message_id=NULL WHERE session_id=? AND id=?",
                [(session_id, t) for t in forget_turns or ()],
            )

        return self._submit(op)

    def append_events(self, session_id: str, events: list[EventRow]) -> Written:
        rows = [(session_id, seq, turn_id, frame) for seq, turn_id, frame in events]
        return self._submit(
            lambda: self._w().executemany(
                "INSERT INTO session_events (session_id, seq, turn_id, frame) VALUES (?,?,?,?)",
                rows,
            )
        )

    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]:
        def op(db: sqlite3.Connection) -> list[tuple[int, str]]:
            if turn_id is None:
                return db.execute(
                    "SELECT seq, frame FROM session_events WHERE session_id=? AND seq>? "
                    "ORDER BY seq",
                    (session_id, after_seq),
                ).fetchall()
            # A turn's events are one run of seqs from its first one (turns do not overlap):
            # a range scan of the primary key, no index on turn ids needed.
            start = db.execute(
                "SELECT start_seq FROM turns WHERE id=? AND session_id=?", (turn_id, session_id)
            ).fetchone()
            low = max(after_seq, (start[0] or 1) - 1) if start else after_seq
            return [
                (seq, frame)
                for seq, tid, frame in db.execute(
                    "SELECT seq, turn_id, frame FROM session_events WHERE session_id=? AND seq>? "
                    "ORDER BY seq",
                    (session_id, low),
                )
                if tid == turn_id
            ]

        return await self._read(op)

    async def turn_start_seq(self, session_id: str, turn_id: str) -> int | None:
        def op(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT start_seq FROM turns WHERE id=? AND session_id=?", (turn_id, session_id)
            ).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def session_activity(self, session_id: str) -> SessionActivity:
        def op(db: sqlite3.Connection) -> SessionActivity:
            messages, assistant, tool, errors = db.execute(
                "SELECT COUNT(*), TOTAL(role='assistant'), TOTAL(role='tool'), "
                "TOTAL(role='assistant' AND status='error') "
                "FROM session_messages WHERE session_id=?",
                (session_id,),
            ).fetchone()
            # The LIKE skips the parse of every other event (chunks are most of the log).
            rounds, llm_ms = db.execute(
                "SELECT TOTAL(json_extract(frame, '$.rounds')), "
                "TOTAL(json_extract(frame, '$.latency.llmMs')) FROM session_events "
                "WHERE session_id=? AND frame LIKE ? "
                "AND json_extract(frame, '$.type')='done' AND json_extract(frame, '$.rounds')>0",
                (session_id, '%"type":"done"%'),
            ).fetchone()
            return SessionActivity(
                messages, int(assistant), int(tool), int(errors), int(rounds), llm_ms
            )

        return await self._read(op)

    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> Written:
        _check_fields(fields, _TURN_FIELDS)
        cols = ", ".join(["id", "session_id", *fields])
        marks = ", ".join("?" * (len(fields) + 2))
        updates = ", ".join(f"{k}=excluded.{k}" for k in fields) or "id=id"
        values = [turn_id, session_id, *fields.values()]
        return self._submit(
            lambda: self._w().execute(
                f"INSERT INTO turns ({cols}) VALUES ({marks}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                values,
            )
        )

    def prune_events(self, session_id: str, below_seq: int) -> Written:
        return self._submit(
            lambda: self._w().execute(
                "DELETE FROM session_events WHERE session_id=? AND seq<?", (session_id, below_seq)
            )
        )

    async def export_session(self, session_id: str, path: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,)).fetchone() is None:
                return False
            write_session_file(
                path,
                lambda table, columns, order: db.execute(
                    f"SELECT {columns} FROM {table} WHERE session_id=? ORDER BY {order}",
                    (session_id,),
                ),
            )
            return True

        return await self._read(op)

    # ------------------------------------------------------------ the legacy layout

    def _import_legacy(self) -> None:
        """Move `sessions/<id>.db` files (the layout before one database held every session)
        into this database, each in one transaction, idempotently (a crash halfway through
        imports the rest at the next start); an imported file is moved to
        `sessions/imported/`, never deleted."""
        folder = self.data_dir / "sessions"
        if not folder.is_dir():
            return
        files = sorted(p for p in folder.glob("*.db") if SESSION_ID_RE.match(p.stem))
        if not files:
            return
        done = folder / "imported"
        done.mkdir(exist_ok=True)
        db = self._w()
        log.info("importing %d session databases into %s", len(files), self.path)
        for path in files:
            sid = path.stem
            db.execute("ATTACH DATABASE ? AS legacy", (str(path),))
            try:
                have = {
                    r[0]
                    for r in db.execute("SELECT name FROM legacy.sqlite_master WHERE type='table'")
                }
                if "session_messages" in have:
                    db.execute(
                        f"INSERT OR IGNORE INTO session_messages (session_id, {_MESSAGE_COLUMNS}) "
                        f"SELECT ?, {_MESSAGE_COLUMNS} FROM legacy.session_messages ORDER BY rowid",
                        (sid,),
                    )
                if "session_files" in have:
                    db.execute(
                        f"INSERT OR IGNORE INTO session_files (session_id, {_FILE_COLUMNS}) "
                        f"SELECT ?, {_FILE_COLUMNS} FROM legacy.session_files ORDER BY rowid",
                        (sid,),
                    )
                if "session_events" in have:
                    db.execute(
                        "INSERT OR IGNORE INTO session_events (session_id, seq, turn_id, frame) "
                        "SELECT ?, seq, turn_id, frame FROM legacy.session_events",
                        (sid,),
                    )
                if "turns" in have:
                    db.execute(
                        f"INSERT OR IGNORE INTO turns (session_id, {_TURN_COLUMNS}, start_seq) "
                        f"SELECT ?, {_TURN_COLUMNS}, (SELECT MIN(seq) FROM legacy.session_events "
                        "e WHERE e.turn_id = t.id) FROM legacy.turns t",
                        (sid,),
                    )
                db.commit()
            except sqlite3.Error:
                db.rollback()
                log.exception("could not import %s; it is left in place", path)
                continue
            finally:
                db.execute("DETACH DATABASE legacy")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{path}{suffix}")
                if src.exists():
                    src.replace(done / src.name)

    def _import_memory(self) -> None:
        """Move the notes of `memory.db` (where they were kept before this database held
        them) into this database, in one transaction, idempotently (see NOTE_IS_HERE); the
        file is then renamed `memory.db.imported` (`.imported.2`, … if taken), never deleted."""
        path = self.data_dir / "memory.db"
        if not path.is_file():
            return
        db = self._w()
        try:
            db.execute("ATTACH DATABASE ? AS legacy", (str(path),))
        except sqlite3.Error:
            log.exception("could not open %s to import its memory notes; it is left in place", path)
            return
        try:
            if db.execute(
                "SELECT 1 FROM legacy.sqlite_master WHERE type='table' AND name='notes'"
            ).fetchall():
                moved = sum(db.execute(sql).rowcount for sql in _MEMORY_DB_IMPORT)
                log.info("imported %d memory notes from %s", moved, path)
            db.commit()
        except sqlite3.Error:
            db.rollback()
            log.exception("could not import the memory notes of %s; it is left in place", path)
            return
        finally:
            db.execute("DETACH DATABASE legacy")
        done = path.with_name(f"{path.name}.imported")
        n = 1
        while done.exists():  # an earlier import's file (another machine's) is kept too
            n += 1
            done = path.with_name(f"{path.name}.imported.{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                src.replace(f"{done}{suffix}")


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


def _messages(db: sqlite3.Connection, session_id: str, with_data: bool) -> list[MessageRecord]:
    rows = db.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM session_messages WHERE session_id=? ORDER BY rowid",
        (session_id,),
    ).fetchall()
    data_col = "data" if with_data else "x''"
    files: dict[str, list[FileRecord]] = {}
    for mid, fid, name, mime, size, data, text in db.execute(
        f"SELECT message_id, id, filename, mime_type, size, {data_col}, text "
        "FROM session_files WHERE session_id=? ORDER BY rowid",
        (session_id,),
    ):
        files.setdefault(mid, []).append(FileRecord(fid, name, mime, size, data, text))
    return [
        MessageRecord(
            id=r[0],
            role=r[1],
            content=r[2],
            tool_calls=r[3],
            tool_result=r[4],
            token_count=r[5],
            created_at=r[6],
            turn_id=r[7],
            status=r[8],
            reasoning=r[9],
            meta=json.loads(r[10] or "{}"),
            files=files.get(r[0], []),
        )
        for r in rows
    ]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    return tuple(getattr(r, name) for name in _SESSION_FIELDS_ORDER)


def _session_record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(**dict(zip(_SESSION_FIELDS_ORDER, row, strict=True)))


def _user_record(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(
        id=row[0], name=row[1], admin=bool(row[2]), password_hash=row[3], created_at=row[4]
    )


def fts_query(query: str) -> str:
    """An FTS5 query matching any of the words of `query` (`query_words`), each quoted (a
    phrase of the tokens it holds, never syntax); "" when it has none."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in query_words(query))


# Importing notes kept elsewhere (rows `o` of id, scope, created_at, text, tags) into
# memory_notes, idempotently: a note that is here already (NOTE_IS_HERE: same scope, time, text
# and tags) is skipped; the others keep their id when it is free (NOTE_ID_IS_FREE), else get a
# new one (the notes of several installs are numbered alike). Each statement sees the table as
# it was before it. (store/sqlite_import.py does the same into PostgreSQL.)
NOTE_IS_HERE = (
    "EXISTS (SELECT 1 FROM memory_notes m WHERE m.scope = o.scope "
    "AND m.created_at = o.created_at AND m.text = o.text AND m.tags = o.tags)"
)
NOTE_ID_IS_FREE = "NOT EXISTS (SELECT 1 FROM memory_notes m WHERE m.id = o.id)"
_MEMORY_DB_NOTES = "(SELECT id, agent_id AS scope, created_at, text, tags FROM legacy.notes) o"
_MEMORY_DB_IMPORT = (
    "INSERT INTO memory_notes (id, scope, created_at, text, tags) "
    f"SELECT id, scope, created_at, text, tags FROM {_MEMORY_DB_NOTES} "
    f"WHERE NOT {NOTE_IS_HERE} AND {NOTE_ID_IS_FREE} ORDER BY id",
    "INSERT INTO memory_notes (scope, created_at, text, tags) "
    f"SELECT scope, created_at, text, tags FROM {_MEMORY_DB_NOTES} "
    f"WHERE NOT {NOTE_IS_HERE} ORDER BY id",
)


def _note(scope: str, row: Sequence[Any]) -> NoteRecord:
    """A note from (id, created_at, text, tags) as stored (tags joined with ", ")."""
    note_id, created_at, text, tags = row
    return NoteRecord(int(note_id), scope, created_at, text, tags.split(", ") if tags else [])


def _check_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns: {sorted(unknown)}")


# SQLite's primary result codes that mean the database cannot be used now (not a bad write).
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
}


def _unavailable(exc: BaseException) -> BaseException:
    """`StoreUnavailable` for a database that cannot be used (disk full, I/O error, locked),
    with the SQLite error as its cause; any other error as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or code & 0xFF not in _UNAVAILABLE_CODES:
        return exc
    failed = StoreUnavailable(f"the SQLite database cannot be used: {exc}")
    failed.__cause__ = exc
    return failed


def _run_write(fn: Callable[[], Any]) -> Any:
    value = fn()
    if isinstance(value, sqlite3.Cursor):
        # A cursor must never reach the event loop's thread: finalised there while the writer
        # thread uses the connection, it breaks both (SQLITE_MISUSE).
        value.close()
        value = None
    return value


def _resolve_all(results: Iterable[_Result]) -> None:
    for fut, value, exc in results:
        if fut.done():  # cancelled by an awaiting caller
            continue
        if exc is not None:
            fut.set_exception(exc)
            fut.exception()  # logged already; a caller that never awaits it loses nothing
        else:
            fut.set_result(value)
