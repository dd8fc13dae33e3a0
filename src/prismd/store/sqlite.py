"""SQLite store: a core database plus one database per session, written by one thread.

Every operation is queued to a single worker thread that owns all connections. The worker
drains whatever is queued, runs it, and commits each touched database once per batch: under
load many small writes (stream events) share one commit, and the event loop never waits on
disk. Reads go through the same queue, so they see every write queued before them.

Durability: WAL with synchronous=NORMAL. A committed batch survives a process crash (kill -9);
an OS crash or power loss may lose the last batches, never corrupt the file. Batches are
committed as soon as they are drained, so at most the writes of one batch (a few milliseconds
of a busy server) are in flight at any moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..protocol import SESSION_ID_RE, ErrorCode, dumps, error_frame
from .base import (
    LOCAL_USER_ID,
    FileRecord,
    MessageRecord,
    SessionLog,
    SessionRecord,
    Store,
    TokenRecord,
    UploadRecord,
    UserRecord,
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
"""
# Columns added after the first release: (table, column, definition).
CORE_MIGRATIONS = (("sessions", "owner_id", f"TEXT NOT NULL DEFAULT '{LOCAL_USER_ID}'"),)
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

SESSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS session_messages (
  id TEXT PRIMARY KEY,
  role TEXT NOT NULL,
  content TEXT NOT NULL DEFAULT '',
  tool_calls TEXT,
  tool_result TEXT,
  token_count INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  turn_id TEXT,
  status TEXT NOT NULL DEFAULT 'complete',
  reasoning TEXT,
  meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS session_files (
  id TEXT PRIMARY KEY,
  message_id TEXT NOT NULL,
  filename TEXT NOT NULL,
  mime_type TEXT NOT NULL,
  size INTEGER NOT NULL,
  data BLOB NOT NULL,
  text TEXT
);
CREATE TABLE IF NOT EXISTS session_events (
  seq INTEGER PRIMARY KEY,
  turn_id TEXT,
  frame TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_events_turn ON session_events(turn_id);
CREATE TABLE IF NOT EXISTS turns (
  id TEXT PRIMARY KEY,
  client_message_id TEXT UNIQUE,
  status TEXT NOT NULL DEFAULT 'running',
  stop_reason TEXT,
  started_at TEXT,
  ended_at TEXT,
  provider TEXT,
  model TEXT,
  tokens_in INTEGER NOT NULL DEFAULT 0,
  tokens_out INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL
);
"""

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
}
IDLE_CLOSE_S = 30.0
_STOP = object()
_EVENT = object()  # marks a queued stream event (see _run)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class SqliteStore(Store):
    def __init__(self, data_dir: Path, max_open_sessions: int = 512) -> None:
        self.data_dir = data_dir
        self.sessions_dir = data_dir / "sessions"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._core: sqlite3.Connection | None = None
        self._open: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._used: dict[str, float] = {}  # session id -> last use (monotonic)
        self._idle_checked = time.monotonic()
        self._max_open = max_open_sessions
        self._dirty: set[sqlite3.Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._template = data_dir / "session-template.db"
        # Called on the event loop with {session id: highest seq} once events are committed.
        self.on_events_durable: Callable[[dict[str, int]], None] | None = None

    # ------------------------------------------------------------ worker machinery

    async def open(self) -> None:
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="prismd-store", daemon=True)
        self._thread.start()
        await self._call(self._open_core)

    def _open_core(self) -> None:
        self._core = _connect(self.data_dir / "prismd.db")
        self._core.executescript(CORE_SCHEMA)
        for table, column, definition in CORE_MIGRATIONS:
            have = {r[1] for r in self._core.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._core.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        agent_key = [r[1] for r in self._core.execute("PRAGMA table_info(agents)") if r[5]]
        if agent_key == ["id"]:
            have = {r[1] for r in self._core.execute("PRAGMA table_info(agents)")}
            owner = "owner_id" if "owner_id" in have else "NULL"
            self._core.commit()
            self._core.executescript(AGENTS_PER_USER.format(owner=owner))
        self._core.execute("CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner_id)")
        self._core.commit()
        self._template = self.data_dir / "session-template.db"
        tmp = self._template.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        template = sqlite3.connect(tmp)
        template.execute("PRAGMA journal_mode=WAL")
        template.executescript(SESSION_SCHEMA)
        template.commit()
        template.close()  # the last close checkpoints: the file alone is the whole database
        tmp.replace(self._template)
        # A session left `streaming` by a crash is repaired lazily when it is opened.

    async def close(self) -> None:
        if self._thread is None:
            return
        await self.flush()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=IDLE_CLOSE_S / 2)]
            except queue.Empty:
                self._close_idle()
                continue
            while len(batch) < 4096:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            stop = False
            events: dict[str, list[tuple[int, str | None, str]]] = {}
            written: dict[str, int] = {}  # session id -> highest event seq in this batch
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                if item[0] is _EVENT:
                    # Stream events are the bulk of all writes: gather them per session and
                    # insert them with one executemany, keeping their order against other ops.
                    events.setdefault(item[1], []).append(item[2])
                    written[item[1]] = item[2][0]
                    continue
                if events:
                    self._insert_events(events)
                fn, fut = item
                try:
                    value = fn()
                except Exception as exc:  # noqa: BLE001 - reported to the caller or logged
                    if fut is None:
                        log.exception("store write failed")
                    results.append((fut, None, exc))
                else:
                    results.append((fut, value, None))
            if events:
                self._insert_events(events)
            self._commit()
            if time.monotonic() - self._idle_checked > IDLE_CLOSE_S / 2:
                self._close_idle()
            for fut, value, error in results:
                if fut is not None:
                    fut.get_loop().call_soon_threadsafe(_resolve, fut, value, error)
            if written and self.on_events_durable is not None and self._loop is not None:
                # Also after a failed insert: the events were logged as failed, and a stream
                # must not stall because its log could not be written.
                self._loop.call_soon_threadsafe(self.on_events_durable, written)
            if stop:
                self._close_all()
                return

    def _insert_events(self, events: dict[str, list[tuple[int, str | None, str]]]) -> None:
        for session_id, rows in events.items():
            try:
                self._db(session_id).executemany(
                    "INSERT INTO session_events (seq, turn_id, frame) VALUES (?,?,?)", rows
                )
            except sqlite3.Error:
                log.exception("store: event insert failed for %s", session_id)
        events.clear()

    def _commit(self) -> None:
        for conn in self._dirty:
            try:
                conn.commit()
            except sqlite3.Error:
                log.exception("store commit failed")
        self._dirty.clear()

    def _close_all(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()
        if self._core is not None:
            self._core.close()
            self._core = None

    def _submit(self, fn: Callable[[], Any]) -> None:
        self._queue.put((fn, None))

    async def _call(self, fn: Callable[[], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, fut))
        return await fut

    async def flush(self) -> None:
        await self._call(lambda: None)

    def _core_db(self) -> sqlite3.Connection:
        assert self._core is not None, "store is not open"
        self._dirty.add(self._core)
        return self._core

    def _path(self, session_id: str) -> Path:
        # Defence in depth: nothing reaches a file path unchecked.
        if not SESSION_ID_RE.match(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self.sessions_dir / f"{session_id}.db"

    def _db(self, session_id: str) -> sqlite3.Connection:
        conn = self._open.get(session_id)
        if conn is None:
            path = self._path(session_id)
            if not path.exists():
                # Copying a ready-made empty database is about twice as fast as creating the
                # schema (fewer writes and syncs), and new sessions come in bursts.
                shutil.copyfile(self._template, path)
            conn = _connect(path)
            # Up to 512 session databases stay open: SQLite's default page cache (2 MB each)
            # would let them hold 1 GB; a session's working set is small.
            conn.execute("PRAGMA cache_size=-256")
            conn.executescript(SESSION_SCHEMA)
            self._open[session_id] = conn
            while len(self._open) > self._max_open:
                self._close_oldest()
        else:
            self._open.move_to_end(session_id)
        self._used[session_id] = time.monotonic()
        self._dirty.add(conn)
        return conn

    def _close_oldest(self) -> None:
        session_id, conn = self._open.popitem(last=False)
        self._used.pop(session_id, None)
        if conn in self._dirty:
            conn.commit()
            self._dirty.discard(conn)
        conn.close()

    def _close_idle(self) -> None:
        """Session databases unused for IDLE_CLOSE_S are closed: an idle server returns to a
        handful of file descriptors however many sessions it has seen."""
        self._idle_checked = time.monotonic()
        cutoff = self._idle_checked - IDLE_CLOSE_S
        while self._open:
            oldest = next(iter(self._open))
            if self._used.get(oldest, 0) > cutoff:
                break
            self._close_oldest()

    # ------------------------------------------------------------ sessions

    def create_session(self, record: SessionRecord) -> None:
        def op() -> None:
            self._core_db().execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({_SESSION_MARKS})",
                _session_row(record),
            )
            self._db(record.id)

        self._submit(op)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def op() -> SessionRecord | None:
            row = (
                self._core_db()
                .execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=?", (session_id,))
                .fetchone()
            )
            return _session_record(row) if row else None

        return await self._call(op)

    async def list_sessions(
        self,
        limit: int,
        offset: int,
        agent_id: str | None = None,
        *,
        owner_id: str | None = None,
        query: str | None = None,
        statuses: tuple[str, ...] | None = None,
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

        def op() -> tuple[list[SessionRecord], int]:
            db = self._core_db()
            total = db.execute(f"SELECT COUNT(*) FROM sessions {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions {where} "
                "ORDER BY COALESCE(last_turn_at, started_at) DESC, rowid DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [_session_record(r) for r in rows], total

        return await self._call(op)

    def update_session(self, session_id: str, **fields: Any) -> None:
        _check_fields(fields, _SESSION_FIELDS)
        sets = ", ".join(f"{k}=?" for k in fields)
        self._submit(
            lambda: self._core_db().execute(
                f"UPDATE sessions SET {sets} WHERE id=?", [*fields.values(), session_id]
            )
        )

    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> None:
        self._submit(
            lambda: self._core_db().execute(
                "UPDATE sessions SET turn_count=turn_count+1, last_turn_at=?, "
                "tokens_in=tokens_in+?, tokens_out=tokens_out+?, "
                "cost_usd=CASE WHEN ? IS NULL THEN cost_usd ELSE COALESCE(cost_usd,0)+? END "
                "WHERE id=?",
                (at, tokens_in, tokens_out, cost_usd, cost_usd, session_id),
            )
        )

    async def delete_session(self, session_id: str) -> bool:
        def op() -> bool:
            conn = self._open.pop(session_id, None)
            self._used.pop(session_id, None)
            if conn is not None:
                self._dirty.discard(conn)
                conn.close()
            path = self._path(session_id)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            cur = self._core_db().execute("DELETE FROM sessions WHERE id=?", (session_id,))
            return cur.rowcount > 0

        return await self._call(op)

    async def sync_agents(self, agents: list[dict[str, Any]]) -> None:
        def op() -> None:
            db = self._core_db()
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
        def op() -> list[dict[str, Any]]:
            cur = self._core_db().execute(
                "SELECT id, name, description, provider, model, system_prompt, temperature, "
                "tools, owner_id FROM agents WHERE source='user' ORDER BY rowid"
            )
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            for row in rows:
                row["tools"] = json.loads(row["tools"] or "[]")
            return rows

        return await self._call(op)

    async def save_agent(self, row: dict[str, Any], owner_id: str) -> None:
        def op() -> None:
            self._core_db().execute(
                "INSERT OR REPLACE INTO agents (id, name, description, provider, model, "
                "system_prompt, temperature, tools, builtin, source, owner_id) "
                "VALUES (:id,:name,:description,:provider,:model,:system_prompt,:temperature,"
                ":tools,0,'user',:owner_id)",
                {**row, "tools": json.dumps(row.get("tools", [])), "owner_id": owner_id},
            )

        await self._call(op)

    async def delete_agent(self, agent_id: str, owner_id: str) -> bool:
        def op() -> bool:
            cur = self._core_db().execute(
                "DELETE FROM agents WHERE id=? AND owner_id=? AND source='user'",
                (agent_id, owner_id),
            )
            return cur.rowcount > 0

        return await self._call(op)

    # ------------------------------------------------------------ users and credentials

    _USER_COLUMNS = "id, name, admin, password_hash, created_at"

    async def data_version(self) -> int:
        """SQLite's `PRAGMA data_version` on the server's own core connection: it changes only
        when another connection (another process) commits, never for the server's writes."""

        def op() -> int:
            assert self._core is not None, "store is not open"
            return int(self._core.execute("PRAGMA data_version").fetchone()[0])

        return await self._call(op)

    async def count_users(self) -> int:
        return await self._call(
            lambda: int(self._core_db().execute("SELECT COUNT(*) FROM users").fetchone()[0])
        )

    async def create_user(self, user: UserRecord) -> None:
        def op() -> None:
            self._core_db().execute(
                "INSERT INTO users (id, name, admin, password_hash, created_at) VALUES (?,?,?,?,?)",
                (user.id, user.name, int(user.admin), user.password_hash, user.created_at),
            )

        await self._call(op)

    def _user_where(self, where: str, *args: Any) -> UserRecord | None:
        row = (
            self._core_db()
            .execute(f"SELECT {self._USER_COLUMNS} FROM users WHERE {where}", args)
            .fetchone()
        )
        return _user_record(row) if row else None

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._call(lambda: self._user_where("id=?", user_id))

    async def get_user_by_name(self, name: str) -> UserRecord | None:
        return await self._call(lambda: self._user_where("name=?", name))

    async def list_users(self) -> list[UserRecord]:
        def op() -> list[UserRecord]:
            rows = self._core_db().execute(
                f"SELECT {self._USER_COLUMNS} FROM users ORDER BY created_at, rowid"
            )
            return [_user_record(r) for r in rows.fetchall()]

        return await self._call(op)

    async def delete_user(self, user_id: str) -> bool:
        def op() -> bool:
            db = self._core_db()
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM api_tokens WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM user_prefs WHERE user_id=?", (user_id,))
            return db.execute("DELETE FROM users WHERE id=?", (user_id,)).rowcount > 0

        return await self._call(op)

    async def set_password(self, user_id: str, password_hash: str) -> None:
        def op() -> None:
            db = self._core_db()
            db.execute("UPDATE users SET password_hash=? WHERE id=?", (password_hash, user_id))
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))

        await self._call(op)

    async def create_login(self, token_hash: str, user_id: str, expires_at: float) -> None:
        def op() -> None:
            db = self._core_db()
            db.execute("DELETE FROM login_sessions WHERE expires_at<?", (time.time(),))
            db.execute(
                "INSERT INTO login_sessions (token_hash, user_id, expires_at) VALUES (?,?,?)",
                (token_hash, user_id, expires_at),
            )

        await self._call(op)

    async def login_user(self, token_hash: str, now: float) -> UserRecord | None:
        def op() -> UserRecord | None:
            db = self._core_db()
            row = db.execute(
                "SELECT user_id, expires_at FROM login_sessions WHERE token_hash=?", (token_hash,)
            ).fetchone()
            if row is None:
                return None
            if row[1] < now:
                db.execute("DELETE FROM login_sessions WHERE token_hash=?", (token_hash,))
                return None
            return self._user_where("id=?", row[0])

        return await self._call(op)

    async def delete_login(self, token_hash: str) -> None:
        await self._call(
            lambda: self._core_db().execute(
                "DELETE FROM login_sessions WHERE token_hash=?", (token_hash,)
            )
        )

    async def create_token(self, token: TokenRecord) -> None:
        def op() -> None:
            self._core_db().execute(
                "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) "
                "VALUES (?,?,?,?,?)",
                (token.id, token.user_id, token.name, token.token_hash, token.created_at),
            )

        await self._call(op)

    async def list_tokens(self) -> list[TokenRecord]:
        def op() -> list[TokenRecord]:
            rows = self._core_db().execute(
                "SELECT id, user_id, name, token_hash, created_at, last_used_at FROM api_tokens "
                "ORDER BY created_at, rowid"
            )
            return [TokenRecord(*r) for r in rows.fetchall()]

        return await self._call(op)

    async def revoke_token(self, token_id: str) -> bool:
        return await self._call(
            lambda: (
                self._core_db().execute("DELETE FROM api_tokens WHERE id=?", (token_id,)).rowcount
                > 0
            )
        )

    async def token_user(self, token_hash: str, now: str) -> UserRecord | None:
        def op() -> UserRecord | None:
            db = self._core_db()
            row = db.execute(
                "SELECT id, user_id FROM api_tokens WHERE token_hash=?", (token_hash,)
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE api_tokens SET last_used_at=? WHERE id=?", (now, row[0]))
            return self._user_where("id=?", row[1])

        return await self._call(op)

    async def get_pref(self, user_id: str, key: str) -> str | None:
        def op() -> str | None:
            row = (
                self._core_db()
                .execute("SELECT value FROM user_prefs WHERE user_id=? AND key=?", (user_id, key))
                .fetchone()
            )
            return row[0] if row else None

        return await self._call(op)

    async def set_pref(self, user_id: str, key: str, value: str | None) -> None:
        def op() -> None:
            db = self._core_db()
            if value is None:
                db.execute("DELETE FROM user_prefs WHERE user_id=? AND key=?", (user_id, key))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO user_prefs (user_id, key, value) VALUES (?,?,?)",
                    (user_id, key, value),
                )

        await self._call(op)

    def _upload_path(self, user_id: str, upload_id: str) -> Path:
        # Both ids are generated by the server (new_id / LOCAL_USER_ID); checked anyway.
        if not SESSION_ID_RE.match(user_id) or not SESSION_ID_RE.match(upload_id):
            raise ValueError("invalid upload path")
        return self.data_dir / "uploads" / user_id / upload_id

    async def save_upload(self, upload: UploadRecord) -> None:
        def op() -> None:
            path = self._upload_path(upload.user_id, upload.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(upload.data)
            self._core_db().execute(
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

        await self._call(op)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        def op() -> UploadRecord | None:
            row = (
                self._core_db()
                .execute(
                    "SELECT id, user_id, filename, mime_type, size, created_at FROM uploads "
                    "WHERE id=?",
                    (upload_id,),
                )
                .fetchone()
            )
            if row is None:
                return None
            upload = UploadRecord(*row)
            try:
                upload.data = self._upload_path(upload.user_id, upload.id).read_bytes()
            except (OSError, ValueError):
                return None
            return upload

        return await self._call(op)

    # ------------------------------------------------------------ one session

    async def open_log(self, session_id: str) -> SessionLog:
        def op() -> SessionLog:
            db = self._db(session_id)
            lo, hi = db.execute("SELECT MIN(seq), MAX(seq) FROM session_events").fetchone()
            turns = dict(
                db.execute(
                    "SELECT client_message_id, id FROM turns WHERE client_message_id IS NOT NULL"
                ).fetchall()
            )
            last = _repair_after_crash(db, session_id, hi or 0)
            return SessionLog(last_seq=last, first_seq=lo if lo else 1, client_turns=turns)

        return await self._call(op)

    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]:
        def op() -> list[MessageRecord]:
            db = self._db(session_id)
            rows = db.execute(
                "SELECT id, role, content, created_at, turn_id, status, token_count, tool_calls, "
                "tool_result, reasoning, meta FROM session_messages ORDER BY rowid"
            ).fetchall()
            data_col = "data" if with_file_data else "x''"
            files: dict[str, list[FileRecord]] = {}
            for mid, fid, name, mime, size, data, text in db.execute(
                f"SELECT message_id, id, filename, mime_type, size, {data_col}, text "
                "FROM session_files ORDER BY rowid"
            ):
                files.setdefault(mid, []).append(FileRecord(fid, name, mime, size, data, text))
            return [
                MessageRecord(
                    id=r[0],
                    role=r[1],
                    content=r[2],
                    created_at=r[3],
                    turn_id=r[4],
                    status=r[5],
                    token_count=r[6],
                    tool_calls=r[7],
                    tool_result=r[8],
                    reasoning=r[9],
                    meta=json.loads(r[10] or "{}"),
                    files=files.get(r[0], []),
                )
                for r in rows
            ]

        return await self._call(op)

    def add_message(self, session_id: str, message: MessageRecord) -> None:
        def op() -> None:
            db = self._db(session_id)
            db.execute(
                "INSERT INTO session_messages (id, role, content, tool_calls, tool_result, "
                "token_count, created_at, turn_id, status, reasoning, meta) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    message.id,
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
                ),
            )
            db.executemany(
                "INSERT INTO session_files (id, message_id, filename, mime_type, size, data, text)"
                " VALUES (?,?,?,?,?,?,?)",
                [
                    (f.id, message.id, f.filename, f.mime_type, f.size, f.data, f.text)
                    for f in message.files
                ],
            )

        self._submit(op)

    def update_message(self, session_id: str, message_id: str, **fields: Any) -> None:
        _check_fields(fields, _MESSAGE_FIELDS)
        if "meta" in fields:
            fields["meta"] = json.dumps(fields["meta"])
        sets = ", ".join(f"{k}=?" for k in fields)
        self._submit(
            lambda: self._db(session_id).execute(
                f"UPDATE session_messages SET {sets} WHERE id=?", [*fields.values(), message_id]
            )
        )

    def delete_messages(
        self, session_id: str, message_ids: list[str], forget_turns: list[str] | None = None
    ) -> None:
        def op() -> None:
            db = self._db(session_id)
            ids = [(m,) for m in message_ids]
            db.executemany("DELETE FROM session_files WHERE message_id=?", ids)
            db.executemany("DELETE FROM session_messages WHERE id=?", ids)
            db.executemany(
                "UPDATE turns SET client_message_id=NULL WHERE id=?",
                [(t,) for t in forget_turns or ()],
            )

        self._submit(op)

    def append_event(self, session_id: str, seq: int, turn_id: str | None, frame: str) -> None:
        self._queue.put((_EVENT, session_id, (seq, turn_id, frame)))

    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]:
        def op() -> list[tuple[int, str]]:
            db = self._db(session_id)
            if turn_id is not None:
                cur = db.execute(
                    "SELECT seq, frame FROM session_events WHERE turn_id=? AND seq>? ORDER BY seq",
                    (turn_id, after_seq),
                )
            else:
                cur = db.execute(
                    "SELECT seq, frame FROM session_events WHERE seq>? ORDER BY seq", (after_seq,)
                )
            return cur.fetchall()

        return await self._call(op)

    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> None:
        _check_fields(fields, _TURN_FIELDS)
        cols = ", ".join(["id", *fields])
        marks = ", ".join("?" * (len(fields) + 1))
        updates = ", ".join(f"{k}=excluded.{k}" for k in fields) or "id=id"
        self._submit(
            lambda: self._db(session_id).execute(
                f"INSERT INTO turns ({cols}) VALUES ({marks}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                [turn_id, *fields.values()],
            )
        )

    def prune_events(self, session_id: str, below_seq: int) -> None:
        self._submit(
            lambda: self._db(session_id).execute(
                "DELETE FROM session_events WHERE seq<?", (below_seq,)
            )
        )


CRASH_MESSAGE = (
    "prismd stopped during this turn (a crash or a forced restart); the answer is kept as far "
    "as it had streamed"
)


def _repair_after_crash(db: sqlite3.Connection, session_id: str, last_seq: int) -> int:
    """A turn still `running` when its session is opened was cut off by a crash. Its answer
    is rebuilt from the logged chunks (every chunk a client saw was logged first), marked
    `interrupted`, and the turn is closed in the event log with an `error` event, so a client
    that resumes it stops waiting. Returns the new last seq."""
    crashed = [r[0] for r in db.execute("SELECT id FROM turns WHERE status='running'")]
    streaming = db.execute(
        "SELECT id, turn_id, content, meta FROM session_messages WHERE status='streaming'"
    ).fetchall()
    for message_id, turn_id, content, meta in streaming:
        start = json.loads(meta or "{}").get("startSeq")
        if start is not None:
            frames = db.execute(
                "SELECT frame FROM session_events WHERE turn_id=? AND seq>? ORDER BY seq",
                (turn_id, start),
            )
            logged = "".join(
                event.get("delta", "")
                for (frame,) in frames
                if (event := json.loads(frame)).get("type") == "chunk"
            )
            if len(logged) >= len(content):
                content = logged
        db.execute(
            "UPDATE session_messages SET status='interrupted', content=? WHERE id=?",
            (content, message_id),
        )
    for turn_id in crashed:
        last_seq += 1
        frame = error_frame(ErrorCode.INTERNAL, CRASH_MESSAGE)
        frame.update(sessionId=session_id, turnId=turn_id, seq=last_seq)
        db.execute(
            "INSERT INTO session_events (seq, turn_id, frame) VALUES (?,?,?)",
            (last_seq, turn_id, dumps(frame)),
        )
    db.execute("UPDATE turns SET status='interrupted', stop_reason='error' WHERE status='running'")
    return last_seq


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    return tuple(getattr(r, name) for name in _SESSION_FIELDS_ORDER)


def _session_record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(**dict(zip(_SESSION_FIELDS_ORDER, row, strict=True)))


def _user_record(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(
        id=row[0], name=row[1], admin=bool(row[2]), password_hash=row[3], created_at=row[4]
    )


def _check_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns: {sorted(unknown)}")


def _resolve(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
