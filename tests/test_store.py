"""The store on its own, each test against both implementations (SQLite, and PostgreSQL on a
throwaway cluster): batched writes resolved in order after their commit, a bad write failing
alone, readers apart, every kind of record, the standalone export; and SQLite's import of the
per-session layout that came before.

Store-specific behaviour lives beside this: tests/test_postgres.py (migrations, leases, a
server that goes away, `prismd db import`)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prismd.store.base import (
    FileRecord,
    MessageRecord,
    SessionRecord,
    Store,
    StoreUnavailable,
    TokenRecord,
    UploadRecord,
    UserRecord,
    query_words,
)
from prismd.store.postgres import PostgresStore
from prismd.store.sqlite import LEGACY_SESSION_SCHEMA, SqliteStore

from .services import reset_pg_database


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Builds an unopened store on an empty database (open it inside the test's loop)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "data")
    url = request.getfixturevalue("pg_module_url")
    reset_pg_database(request.getfixturevalue("postgres"), url)
    return lambda: PostgresStore(url)


def test_many_sessions_write_and_read_at_once(new_store):
    """Appends of hundreds of sessions share commits while readers read: every write
    succeeds, every log reads back whole. (A cursor that reached the event loop's thread once
    broke the writer's connection under exactly this load.)"""

    async def main() -> None:
        store = new_store()
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


def test_writes_resolve_in_queue_order_and_a_bad_one_fails_alone(new_store):
    """Writes queued together share a batch; each resolves after its commit, in the order
    they were queued; one that breaks a constraint fails alone (the others are durable)."""

    async def main() -> None:
        store = new_store()
        await store.open()
        await store.create_session(SessionRecord("s1", "a", started_at="t"))
        resolved: list[int] = []
        writes = [
            store.append_events("s1", [(1, "t1", '{"n":1}'), (2, "t1", '{"n":2}')]),
            store.append_events("s1", [(3, "t1", '{"n":3}')]),
            store.append_events("s1", [(2, "t1", '{"again":2}')]),  # seq 2 is taken
            store.append_events("s1", [(4, "t1", '{"n":4}')]),
            store.update_session("s1", name="renamed"),
            store.save_turn("s1", "t1", status="complete", start_seq=1),
        ]
        for i, write in enumerate(writes):
            write.add_done_callback(lambda _w, i=i: resolved.append(i))
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert resolved == list(range(len(writes)))
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert failed == [2]
        assert not isinstance(outcomes[2], StoreUnavailable)  # a bad write, not a bad store
        assert [o for i, o in enumerate(outcomes) if i != 2] == [None] * 5
        events = await store.read_events("s1", 0)
        assert events == [(1, '{"n":1}'), (2, '{"n":2}'), (3, '{"n":3}'), (4, '{"n":4}')]
        assert [seq for seq, _ in await store.read_events("s1", 1, "t1")] == [2, 3, 4]
        record = await store.get_session("s1")
        assert record is not None and record.name == "renamed"

        # The same with appends alone (a batch the PostgreSQL store writes without BEGIN).
        appends = [
            store.append_events("s1", [(5, "t1", "5")]),
            store.append_events("s1", [(6, "t1", "6"), (4, "t1", "taken")]),
            store.append_events("s1", [(7, "t1", "7")]),
        ]
        outcomes = await asyncio.gather(*appends, return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], Exception)
        assert [seq for seq, _ in await store.read_events("s1", 4)] == [5, 7]  # not 6 either
        await store.close()

    run(main())


def test_sessions_listed_filtered_updated_and_deleted(new_store):
    async def main() -> None:
        store = new_store()
        await store.open()
        rows = [
            SessionRecord("s1", "a", name="Alpha plan", started_at="2026-01-01"),
            SessionRecord("s2", "b", name="50% off_sale", started_at="2026-01-02", owner_id="u2"),
            SessionRecord("s3", "a", name="alpha BETA", started_at="2026-01-03"),
            SessionRecord("s4", "a", name="same time", started_at="2026-01-03"),
        ]
        for record in rows:
            store.create_session(record)
        store.update_session("s3", status="archived", closed_at="2026-01-04")
        await store.add_turn_totals("s1", 10, 20, 0.5, "2026-01-05")
        await store.add_turn_totals("s1", 1, 2, None, "2026-01-06")

        async def ids(**kw: Any) -> list[str]:
            records, total = await store.list_sessions(kw.pop("limit", 50), 0, **kw)
            assert total >= len(records)
            return [r.id for r in records]

        # Newest activity first; equal times: the one created last first.
        assert await ids() == ["s1", "s4", "s3", "s2"]
        assert await ids(agent_id="b") == ["s2"]
        assert await ids(owner_id="u2") == ["s2"]
        assert await ids(owner_id="local") == ["s1", "s4", "s3"]
        assert await ids(query="ALPHA") == ["s1", "s3"]  # case-insensitive
        assert await ids(query="50%") == ["s2"]
        assert await ids(query="%") == ["s2"]  # a literal %, not a wildcard
        assert await ids(query="f_s") == ["s2"]  # a literal _
        assert await ids(query="e_p") == []
        assert await ids(statuses=("active",)) == ["s1", "s4", "s2"]
        assert await ids(statuses=("archived", "closed")) == ["s3"]
        page, total = await store.list_sessions(2, 1)
        assert [r.id for r in page] == ["s4", "s3"] and total == 4
        assert await ids(order="started") == ["s4", "s3", "s2", "s1"]

        s1 = await store.get_session("s1")
        assert s1 is not None
        assert (s1.turn_count, s1.tokens_in, s1.tokens_out) == (2, 11, 22)
        assert s1.cost_usd == pytest.approx(0.5)
        assert s1.last_turn_at == "2026-01-06"
        s3 = await store.get_session("s3")
        assert s3 is not None and (s3.status, s3.closed_at) == ("archived", "2026-01-04")
        assert s3.to_json()["ownerId"] == "local"
        assert await store.get_session("nope") is None

        store.add_message("s1", MessageRecord("m1", "user", "hi", "t"))
        store.append_events("s1", [(1, None, "{}")])
        await store.save_turn("s1", "t1", status="complete")
        assert await store.delete_session("s1") is True
        assert await store.delete_session("s1") is False
        assert await store.get_session("s1") is None
        assert await store.load_messages("s1") == []
        assert await store.read_events("s1", 0) == []
        await store.close()

    run(main())


def test_messages_files_turns_and_the_log(new_store):
    async def main() -> None:
        store = new_store()
        await store.open()
        store.create_session(SessionRecord("s1", "a", started_at="t"))
        pdf = FileRecord("f1", "a.pdf", "application/pdf", 3, b"\x00\x01\x02", text="text")
        store.add_message("s1", MessageRecord("m1", "user", "hello", "t1", "turn1", files=[pdf]))
        store.save_turn("s1", "turn1", client_message_id="c1", status="complete", start_seq=1)
        store.append_events("s1", [(1, "turn1", "a"), (2, "turn1", "b")])
        store.add_message(
            "s1",
            MessageRecord("m2", "assistant", "hi", "t2", "turn1", meta={"k": [1]}, reasoning="r"),
        )
        store.save_turn("s1", "turn2", client_message_id="c2", status="running", start_seq=3)
        store.append_events("s1", [(3, "turn2", "c"), (4, None, "d"), (5, "turn2", "e")])
        store.add_message(
            "s1",
            MessageRecord(
                "m3", "assistant", "par", "t3", "turn2", "streaming", meta={"startSeq": 2}
            ),
        )
        await store.update_message("s1", "m2", content="hi there", meta={"k": [2]})

        messages = await store.load_messages("s1", with_file_data=True)
        assert [(m.id, m.role, m.content, m.status) for m in messages] == [
            ("m1", "user", "hello", "complete"),
            ("m2", "assistant", "hi there", "complete"),
            ("m3", "assistant", "par", "streaming"),
        ]
        assert messages[1].meta == {"k": [2]} and messages[1].reasoning == "r"
        assert messages[0].files[0].data == b"\x00\x01\x02"
        assert messages[0].files[0].text == "text"
        light = await store.load_messages("s1")
        assert light[0].files[0].data == b"" and light[0].files[0].size == 3
        assert light[0].to_json()["files"] == [pdf.meta()]

        state = await store.open_log("s1")
        assert (state.first_seq, state.last_seq) == (1, 5)
        assert state.client_turns == {"c1": "turn1", "c2": "turn2"}
        assert state.running_turns == ["turn2"]
        assert [(m.id, m.turn_id, m.content, m.start_seq) for m in state.streaming] == [
            ("m3", "turn2", "par", 2)
        ]
        assert await store.crashed_sessions() == ["s1"]
        assert await store.read_events("s1", 0, "turn2") == [(3, "c"), (5, "e")]
        assert await store.read_events("s1", 3, "turn2") == [(5, "e")]
        assert await store.turn_start_seq("s1", "turn2") == 3
        assert await store.turn_start_seq("s1", "nope") is None

        # Retry: the last exchange goes, its clientMessageId is released.
        await store.delete_messages("s1", ["m2", "m3"], forget_turns=["turn2"])
        assert [m.id for m in await store.load_messages("s1")] == ["m1"]
        assert (await store.open_log("s1")).client_turns == {"c1": "turn1"}
        await store.save_turn("s1", "turn2", status="interrupted", stop_reason="error")
        assert await store.crashed_sessions() == []

        await store.prune_events("s1", 3)
        state = await store.open_log("s1")
        assert (state.first_seq, state.last_seq) == (3, 5)
        await store.prune_events("s1", 6)
        state = await store.open_log("s1")
        assert (state.first_seq, state.last_seq) == (1, 0)
        assert (await store.open_log("unknown")).last_seq == 0
        await store.close()

    run(main())


def test_users_logins_tokens_and_preferences(new_store):
    async def main() -> None:
        store = new_store()
        await store.open()
        assert await store.count_users() == 0
        await store.create_user(UserRecord("u1", "alice", True, "h1", "2026-01-01"))
        await store.create_user(UserRecord("u2", "bob", False, "h2", "2026-01-01"))
        with pytest.raises(Exception) as taken:
            await store.create_user(UserRecord("u3", "alice", False, "h3", "2026-01-02"))
        assert not isinstance(taken.value, StoreUnavailable)
        assert await store.count_users() == 2
        assert [u.name for u in await store.list_users()] == ["alice", "bob"]
        alice = await store.get_user("u1")
        assert alice == UserRecord("u1", "alice", True, "h1", "2026-01-01")
        assert await store.get_user_by_name("bob") == UserRecord(
            "u2", "bob", False, "h2", "2026-01-01"
        )
        assert await store.get_user("nope") is None

        await store.create_login("live", "u1", expires_at=2e9)
        await store.create_login("old", "u1", expires_at=1.0)
        assert (await store.login_user("live", now=1.5e9)) == alice
        assert await store.login_user("old", now=1.5e9) is None
        assert await store.login_user("nope", now=1.5e9) is None
        await store.delete_login("live")
        assert await store.login_user("live", now=1.5e9) is None
        await store.create_login("again", "u1", expires_at=2e9)
        await store.set_password("u1", "h1b")  # ends alice's logins
        assert await store.login_user("again", now=1.5e9) is None
        assert (await store.get_user("u1")).password_hash == "h1b"  # type: ignore[union-attr]

        await store.create_token(TokenRecord("k1", "u2", "ci", "hash1", "2026-01-01"))
        await store.create_token(TokenRecord("k2", "u2", "", "hash2", "2026-01-02"))
        bob = await store.token_user("hash1", "2026-02-01")
        assert bob is not None and bob.name == "bob"
        assert await store.token_user("nope", "2026-02-01") is None
        await store.flush()  # the last use is written behind the lookup
        tokens = await store.list_tokens()
        assert [(t.id, t.last_used_at) for t in tokens] == [("k1", "2026-02-01"), ("k2", None)]
        assert await store.revoke_token("k2") is True
        assert await store.revoke_token("k2") is False

        assert await store.get_pref("u2", "default_agent") is None
        await store.set_pref("u2", "default_agent", "a")
        await store.set_pref("u2", "default_agent", "b")
        assert await store.get_pref("u2", "default_agent") == "b"
        await store.set_pref("u2", "default_agent", None)
        assert await store.get_pref("u2", "default_agent") is None

        await store.set_pref("u2", "theme", "dark")
        await store.create_login("bobs", "u2", expires_at=2e9)
        assert await store.delete_user("u2") is True
        assert await store.delete_user("u2") is False
        assert await store.token_user("hash1", "2026-02-02") is None
        assert await store.login_user("bobs", now=1.5e9) is None
        assert await store.get_pref("u2", "theme") is None
        assert await store.count_users() == 1
        await store.close()

    run(main())


def test_another_process_changing_credentials_moves_the_data_version(new_store):
    """What a server watches to check its open sockets again when the CLI (or another
    server) removed a user, changed a password, logged out or revoked a token."""

    async def main() -> None:
        server, cli = new_store(), new_store()  # two processes' stores on one database
        await server.open()
        await cli.open()
        await cli.create_user(UserRecord("u1", "alice", True, "h", "t"))
        await cli.create_token(TokenRecord("k1", "u1", "", "hash", "t"))
        await cli.create_login("login", "u1", expires_at=2e9)
        for change in (
            lambda: cli.delete_login("login"),
            lambda: cli.revoke_token("k1"),
            lambda: cli.set_password("u1", "h2"),
            lambda: cli.create_user(UserRecord("u2", "bob", False, "h", "t")),
            lambda: cli.delete_user("u2"),
        ):
            before = await server.data_version()
            await change()
            assert await server.data_version() != before
        await cli.close()
        await server.close()

    run(main())


def test_agents_and_uploads(new_store):
    async def main() -> None:
        store = new_store()
        await store.open()
        agent = {
            "id": "helper",
            "name": "Helper",
            "description": "d",
            "provider": "openai",
            "model": "m",
            "system_prompt": "be brief",
            "temperature": 0.3,
            "tools": ["file_*"],
        }
        await store.sync_agents([{**agent, "id": "assistant", "builtin": 1}])
        await store.save_agent(agent, "u1")
        await store.save_agent({**agent, "id": "other", "tools": [], "temperature": None}, "u2")
        custom = await store.list_custom_agents()
        assert [(a["id"], a["owner_id"], a["tools"]) for a in custom] == [
            ("helper", "u1", ["file_*"]),
            ("other", "u2", []),
        ]
        assert custom[0]["temperature"] == pytest.approx(0.3)
        await store.save_agent({**agent, "name": "Helper 2"}, "u1")
        await store.save_agent({**agent, "name": "Bob's helper"}, "u2")  # ids are per user
        names = {(a["owner_id"], a["id"]): a["name"] for a in await store.list_custom_agents()}
        assert names == {
            ("u1", "helper"): "Helper 2",
            ("u2", "other"): "Helper",
            ("u2", "helper"): "Bob's helper",
        }
        assert await store.delete_agent("assistant", "") is False  # from the config
        assert await store.delete_agent("other", "u1") is False  # not u1's
        assert await store.delete_agent("other", "u2") is True
        await store.sync_agents([])  # the config's agents are replaced, users' kept
        kept = [(a["owner_id"], a["id"]) for a in await store.list_custom_agents()]
        assert sorted(kept) == [("u1", "helper"), ("u2", "helper")]

        data = bytes(range(256)) * 64
        upload = UploadRecord(
            "upl1", "u1", "a.bin", "application/octet-stream", len(data), "t", data
        )
        await store.save_upload(upload)
        assert await store.get_upload("upl1") == upload
        assert await store.get_upload("upl2") is None
        await store.close()

    run(main())


def test_export_writes_the_per_session_layout(new_store, tmp_path):
    async def main() -> Path:
        store = new_store()
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


def make_legacy_install(data_dir: Path) -> None:
    """A data directory in the layout before one database held every session: a core
    database without owners, and `sessions/old.db` with one turn."""
    sessions = data_dir / "sessions"
    sessions.mkdir(parents=True)
    core = sqlite3.connect(data_dir / "prismd.db")
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


async def check_legacy_session(store: Store) -> None:
    """The session of make_legacy_install, as a store holds it once imported."""
    messages = await store.load_messages("old")
    assert [(m.role, m.content) for m in messages] == [
        ("user", "hello"),
        ("assistant", "hi there"),
    ]
    state = await store.open_log("old")
    assert (state.first_seq, state.last_seq) == (1, 2)
    assert state.client_turns == {"cm1": "turn1"}
    assert [seq for seq, _ in await store.read_events("old", 0, "turn1")] == [1, 2]


def test_legacy_session_files_are_imported_once(tmp_path):
    make_legacy_install(tmp_path)
    sessions = tmp_path / "sessions"

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        await check_legacy_session(store)
        await store.close()

    run(main())
    assert not (sessions / "old.db").exists() and (sessions / "imported" / "old.db").exists()
    run(main())  # a second start imports nothing twice


def test_a_locked_sqlite_database_fails_writes_as_unavailable(tmp_path):
    """Another process holding the database's write lock past the busy timeout: the write
    fails with StoreUnavailable (not a hang), the next one after the lock is gone works."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        await store.create_session(SessionRecord("s1", "a", started_at="t"))
        other = sqlite3.connect(tmp_path / "prismd.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await asyncio.wait_for(store.append_events("s1", [(1, None, "a")]), 60)
        finally:
            other.execute("ROLLBACK")
            other.close()
        await store.append_events("s1", [(1, None, "b")])
        assert await store.read_events("s1", 0) == [(1, "b")]
        await store.close()

    run(main())


# ---------------------------------------------------------------- memory notes


def test_notes_are_found_by_their_words_and_only_in_their_scope(new_store):
    """A search finds the notes of its scope holding any of its words (text or tags), the
    better match first; no words: the newest. Another agent, or the same agent for another
    user, sees none of them."""

    async def main() -> None:
        store = new_store()
        await store.open()
        tea = await store.add_note("agent-a", "The user's favourite tea is genmaicha.", ["prefs"])
        deadline = await store.add_note("agent-a", "Project deadline is March 3rd.", [])
        coffee = await store.add_note(
            "agent-a", "The user dislikes coffee; prefers tea.", ["likes", "drinks"]
        )
        assert tea < deadline < coffee

        async def ids(scope: str, query: str, limit: int = 10) -> list[int]:
            return [n.id for n in await store.search_notes(scope, query, limit)]

        found = await store.search_notes("agent-a", "what TEA does the user like?", 10)
        assert {n.id for n in found} == {tea, coffee}
        note = next(n for n in found if n.id == tea)
        assert (note.scope, note.text, note.tags) == (
            "agent-a",
            "The user's favourite tea is genmaicha.",
            ["prefs"],
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", note.created_at)
        assert await ids("agent-a", "genmaicha tea") == [tea, coffee]  # both words first
        assert await ids("agent-a", "drinks") == [coffee]  # tags are searched
        assert (await store.search_notes("agent-a", "drinks", 1))[0].tags == ["likes", "drinks"]
        assert await ids("agent-a", "deadline", 1) == [deadline]
        assert await ids("agent-a", "zebra") == []
        assert len(await ids("agent-a", "the user", 1)) == 1  # the limit
        # No words: the newest notes.
        assert await ids("agent-a", "", 2) == [coffee, deadline]
        assert await ids("agent-a", " ?! ") == [coffee, deadline, tea]

        for scope in ("agent-b", "alice/agent-a", "bob/agent-a", "agent-%", "AGENT-A", "agent"):
            assert await ids(scope, "tea") == [] and await ids(scope, "") == []
        alices = await store.add_note("alice/agent-a", "alice likes tea", [])
        bobs = await store.add_note("bob/agent-a", "bob likes tea", [])
        assert await ids("alice/agent-a", "tea likes bob alice") == [alices]
        assert await ids("bob/agent-a", "") == [bobs]
        assert alices not in await ids("agent-a", "alice likes tea")
        await store.close()

    run(main())


# (note text, tags, a query that finds it, a query that does not): the same on both stores,
# tokens as FTS5's unicode61 (remove_diacritics 2) makes them.
TOKENS = [
    ("Un café à Genève", [], "CAFE geneve", "caf"),
    ("naïve coöperation", [], "naive", "naïv"),
    ("Übermaß", [], "ubermaß", "ubermass"),
    ("mail user@example.com now", [], "example", "exampl"),
    ("the foo_bar function", [], "foo_bar", "bar_foo"),
    ("the foo-bar function", [], "Foo.Bar", "foobar"),
    ("Ωμέγα", [], "ωμέγα", "ωμεγα"),  # diacritics are removed from Latin letters only
    ("ΣΟΦΟΣ", [], "σοφος", "σοφο"),
    ("日本語のテキスト", [], "日本語のテキスト", "日本"),
    ("it's here", [], "it", "its"),
    ("ends with alpha", ["beta"], "alpha beta", "alpha_beta"),  # no phrase spans text and tags
]


def test_notes_are_tokenized_alike_on_both_stores(new_store):
    async def main() -> None:
        store = new_store()
        await store.open()
        ids = [await store.add_note("s", text, tags) for text, tags, _, _ in TOKENS]
        for note_id, (text, _, finds, misses) in zip(ids, TOKENS, strict=True):
            assert note_id in [n.id for n in await store.search_notes("s", finds, 50)], text
            assert note_id not in [n.id for n in await store.search_notes("s", misses, 50)], text
        await store.close()

    run(main())


HOSTILE_QUERIES = [
    "",
    "\x00 '\"*",
    '"',
    "*",
    "NEAR(",
    "NEAR(tea coffee)",
    "-",
    "tea -coffee",
    'tea" OR "x',
    "AND OR NOT",
    "col:tea",
    "text:tea",
    "{text tags}: tea",
    "^tea",
    "tea*",
    "(",
    ")",
    "'",
    "''",
    "tea' | 'x",
    "tea & !coffee",
    "!tea",
    "tea | coffee",
    "tea <-> coffee",
    "tea <2> coffee",
    "tea:*",
    "tea:A",
    "tea:*A & x:B",
    "\\",
    "tea\\",
    "\\'tea",
    "%_",
    "\x00tea\x00",
    "\ud800tea",
    "_",
    "__ tea_",
    "🤖",
    "x" * 3000,  # longer than a PostgreSQL lexeme may be
    "tea " + "x" * 3000,
    "tea_" + "x" * 3000,
    "a_" * 2000,
    " ".join(f"w{i}" for i in range(40)) + " tea",  # tea past the 32 words searched
    "tea " * 1000,
]


def test_hostile_queries_find_notes_or_nothing_never_an_error(new_store):
    """No query text is read as search syntax (FTS5's or tsquery's): each query finds the tea
    note exactly when "tea" is one of its words (query_words), and never fails."""

    async def main() -> None:
        store = new_store()
        await store.open()
        tea = await store.add_note("s", "Remember the tea ceremony.", ["tea"])
        other = await store.add_note("s", "Coffee x:B near 'A' \\ of (NEAR) * AND OR NOT", [])
        for query in HOSTILE_QUERIES:
            found = [n.id for n in await store.search_notes("s", query, 10)]
            words = [w.lower() for w in query_words(query)]
            if not words:  # the newest notes
                assert found == [other, tea], query
            else:
                assert (tea in found) == ("tea" in words or "tea_" in words), query[:60]
        await store.close()

    run(main())


def make_memory_db(path: Path, notes: list[tuple[int, str, str, str, str]]) -> None:
    """`memory.db` as the memory tools kept it before the store held the notes (WAL mode, an
    FTS5 index kept by triggers): notes (id, agent_id (the scope), created_at, text, tags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        """
        CREATE TABLE notes (id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL,
          created_at TEXT NOT NULL, text TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '');
        CREATE INDEX notes_agent ON notes(agent_id, id);
        CREATE VIRTUAL TABLE notes_fts USING fts5(text, tags, content='notes',
          content_rowid='id', tokenize='unicode61 remove_diacritics 2');
        CREATE TRIGGER notes_ai AFTER INSERT ON notes BEGIN
          INSERT INTO notes_fts(rowid, text, tags) VALUES (new.id, new.text, new.tags);
        END;
        """
    )
    db.executemany("INSERT INTO notes VALUES (?,?,?,?,?)", notes)
    db.close()


OLD_NOTES = [
    (1, "agent-a", "2025-01-02T03:04:05Z", "The user's favourite tea is genmaicha.", "prefs"),
    (2, "alice/agent-a", "2025-01-03T00:00:00Z", "Alice prefers green tea.", ""),
    (7, "agent-a", "2025-01-04T00:00:00Z", "Project deadline is March 3rd.", "work, dates"),
]
# Another machine's memory.db: its notes are numbered like the first's.
OTHER_NOTES = [
    (1, "agent-a", "2025-02-01T00:00:00Z", "The office wifi is called prism.", ""),
    (2, "alice/agent-a", "2025-01-03T00:00:00Z", "Alice prefers green tea.", ""),  # the same
]


def test_an_old_memory_db_is_imported_once_and_kept_renamed(tmp_path):
    data = tmp_path / "data"
    make_memory_db(data / "memory.db", OLD_NOTES)

    async def notes(store: Store, scope: str) -> list[tuple[int, str, str, list[str]]]:
        return [
            (n.id, n.created_at, n.text, n.tags) for n in await store.search_notes(scope, "", 50)
        ]

    async def first() -> None:
        store = SqliteStore(data)
        await store.open()
        assert await notes(store, "agent-a") == [
            (7, "2025-01-04T00:00:00Z", "Project deadline is March 3rd.", ["work", "dates"]),
            (1, "2025-01-02T03:04:05Z", "The user's favourite tea is genmaicha.", ["prefs"]),
        ]
        assert [n.id for n in await store.search_notes("alice/agent-a", "tea", 5)] == [2]
        assert [n.id for n in await store.search_notes("agent-a", "dates", 5)] == [7]
        assert await store.add_note("agent-a", "A new note.", []) == 8  # after the imported
        await store.close()

    run(first())
    assert not (data / "memory.db").exists() and (data / "memory.db.imported").is_file()
    assert not (data / "memory.db-wal").exists()

    # The same file again (a start cut off before the rename), and another machine's: nothing
    # is imported twice; a note whose number is taken gets a new one.
    (data / "memory.db.imported").replace(data / "memory.db")
    run(_open_close(SqliteStore(data)))
    make_memory_db(data / "memory.db", OTHER_NOTES)

    async def second() -> None:
        store = SqliteStore(data)
        await store.open()
        assert [(n.id, n.text) for n in await store.search_notes("agent-a", "", 50)] == [
            (9, "The office wifi is called prism."),
            (8, "A new note."),
            (7, "Project deadline is March 3rd."),
            (1, "The user's favourite tea is genmaicha."),
        ]
        assert [n.id for n in await store.search_notes("alice/agent-a", "", 5)] == [2]
        assert [n.id for n in await store.search_notes("agent-a", "wifi", 5)] == [9]
        await store.close()

    run(second())
    assert not (data / "memory.db").exists()
    assert (data / "memory.db.imported").is_file() and (data / "memory.db.imported.2").is_file()


async def _open_close(store: Store) -> None:
    await store.open()
    await store.close()
