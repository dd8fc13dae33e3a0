"""The SQLite store on its own: one database for every session, batched writes, readers apart,
the import of the per-session layout that came before, and the standalone export."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

from prismd.store.base import MessageRecord, SessionRecord
from prismd.store.sqlite import LEGACY_SESSION_SCHEMA, SqliteStore


def run(coro):
    return asyncio.run(coro)


def test_many_sessions_write_and_read_at_once(tmp_path):
    """Appends of hundreds of sessions share commits while readers read: every write
    succeeds, every log reads back whole. (A cursor that reached the event loop's thread once
    broke the writer's connection under exactly this load.)"""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        sids = [f"s{i}" for i in range(300)]
        for sid in sids:
            assert await store.create_session(SessionRecord(sid, "a", started_at="t")) is None

        async def write(sid: str) -> None:
            for seq in range(1, 21):
                frame = json.dumps({"seq": seq})
                store.update_message(sid, "nothing", content="x" * seq)
                assert await store.append_events(sid, [(seq, "turn", frame)]) is None
                await asyncio.sleep(random.random() * 0.002)

        async def read() -> None:
            for _ in range(300):
                await store.read_events(random.choice(sids), 0)

        await asyncio.gather(*(write(sid) for sid in sids), read(), read())
        for sid in random.sample(sids, 20):
            assert [seq for seq, _ in await store.read_events(sid, 0)] == list(range(1, 21))
        await store.close()

    run(main())


def test_legacy_session_files_are_imported_once(tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    core = sqlite3.connect(tmp_path / "prismd.db")
    core.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', agent_id "
        "TEXT NOT NULL, channel TEXT NOT NULL DEFAULT 'web', status TEXT NOT NULL DEFAULT "
        "'active', turn_count INTEGER NOT NULL DEFAULT 0, started_at TEXT NOT NULL, last_turn_at "
        "TEXT, closed_at TEXT, parent_session_id TEXT, tokens_in INTEGER NOT NULL DEFAULT 0, "
        "tokens_out INTEGER NOT NULL DEFAULT 0, cost_usd REAL);"
        "INSERT INTO sessions (id, agent_id, started_at, turn_count) VALUES ('old', 'a', 't', 1);"
    )
    core.commit()
    core.close()
    legacy = sqlite3.connect(sessions / "old.db")
    legacy.executescript(LEGACY_SESSION_SCHEMA)
    legacy.execute(
        "INSERT INTO session_messages (id, role, content, created_at, turn_id) "
        "VALUES ('m1', 'user', 'hello', 't', 'turn1')"
    )
    legacy.execute(
        "INSERT INTO session_messages (id, role, content, created_at, turn_id) "
        "VALUES ('m2', 'assistant', 'hi there', 't', 'turn1')"
    )
    legacy.executemany(
        "INSERT INTO session_events (seq, turn_id, frame) VALUES (?, 'turn1', ?)",
        [(1, '{"type":"start"}'), (2, '{"type":"chunk","delta":"hi there"}')],
    )
    legacy.execute(
        "INSERT INTO turns (id, client_message_id, status) VALUES ('turn1', 'cm1', 'complete')"
    )
    legacy.commit()
    legacy.close()

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        messages = await store.load_messages("old")
        assert [(m.role, m.content) for m in messages] == [
            ("user", "hello"),
            ("assistant", "hi there"),
        ]
        state = await store.open_log("old")
        assert (state.first_seq, state.last_seq) == (1, 2)
        assert state.client_turns == {"cm1": "turn1"}
        assert [seq for seq, _ in await store.read_events("old", 0, "turn1")] == [1, 2]
        await store.close()

    run(main())
    assert not (sessions / "old.db").exists() and (sessions / "imported" / "old.db").exists()
    run(main())  # a second start imports nothing twice


def test_export_writes_the_per_session_layout(tmp_path):
    async def main() -> Path:
        store = SqliteStore(tmp_path / "data")
        await store.open()
        store.create_session(SessionRecord("s1", "a", started_at="t"))
        store.add_message("s1", MessageRecord("m1", "user", "hello", "t", turn_id="t1"))
        store.append_events("s1", [(1, "t1", '{"type":"start"}')])
        await store.save_turn("s1", "t1", status="complete", start_seq=1)
        out = tmp_path / "s1.db"
        assert await store.export_session("s1", str(out)) is True
        assert await store.export_session("nope", str(tmp_path / "nope.db")) is False
        await store.close()
        return out

    out = run(main())
    db = sqlite3.connect(out)
    assert db.execute("SELECT role, content FROM session_messages").fetchall() == [
        ("user", "hello")
    ]
    assert db.execute("SELECT seq, frame FROM session_events").fetchall() == [
        (1, '{"type":"start"}')
    ]
    assert db.execute("SELECT id, status FROM turns").fetchall() == [("t1", "complete")]
