"""The SQLite store's layout: its tables, their migrations (columns added since the
first release, agents keyed per user), and the import at start of older layouts, each once:
`sessions/<id>.db` (a database per session) and `memory.db` (the agents' notes).
`SqliteSchema._open_db` brings a database to the current layout.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from ...protocol import SESSION_ID_RE
from ..base import LOCAL_USER_ID
from ..common import _FILE_COLUMNS, _MESSAGE_COLUMNS, _TURN_COLUMNS
from .core import SqliteCore, _connect

log = logging.getLogger("prismd.store")

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


class SqliteSchema(SqliteCore):
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
