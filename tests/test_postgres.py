"""What only the PostgreSQL store does, against a real server (tests/services.py): migrations
under a lock, leases decided by the database's clock, a server that stops, restarts or stops
answering, `prismd db import`, and prismd serving on it. The Store interface itself is tested on
both stores in tests/test_store.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psutil
import pytest

from prismd.agent.agents import row
from prismd.config import BUILTIN_AGENT, AgentSettings, ConfigError, load_settings
from prismd.server.config_api import effective
from prismd.store import make_store
from prismd.store.base import (
    FileRecord,
    MessageRecord,
    SessionRecord,
    StoreUnavailable,
    TokenRecord,
    UploadRecord,
    UserRecord,
)
from prismd.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore
from prismd.store.sqlite import SqliteStore
from prismd.testing.fake_models import Reply
from prismd.testing.postgres_server import PostgresServer

from .conftest import ROOT, openai_env
from .test_store import (
    OLD_NOTES,
    OTHER_NOTES,
    check_legacy_session,
    make_legacy_install,
    make_memory_db,
)
from .waiting import until

HANG_GUARD_S = 30  # an await that takes this long has hung: the test fails, it does not wait


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def within(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, HANG_GUARD_S)


def prismd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRISMD_")}
    return subprocess.run(
        [sys.executable, "-m", "prismd", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


# ---------------------------------------------------------------- migrations


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()


def test_stores_opening_at_once_on_an_empty_database_migrate_it_once(make_pg_database):
    url = make_pg_database()

    async def main() -> None:
        stores = [PostgresStore(url) for _ in range(4)]
        await within(asyncio.gather(*(s.open() for s in stores)))
        assert await _versions(url) == [v for v, _, _ in MIGRATIONS]
        # Every one of them works on the schema.
        for i, store in enumerate(stores):
            await store.create_session(SessionRecord(f"s{i}", "a", started_at="t"))
        records, total = await stores[0].list_sessions(10, 0)
        assert total == 4
        await asyncio.gather(*(s.close() for s in stores))

    run(main())


def test_two_processes_migrating_at_once_and_an_older_schema(make_pg_database, tmp_path):
    url = make_pg_database()
    env = {"PRISMD_HOME": str(tmp_path), "PRISMD_DATABASE_URL": url}
    cmd = [sys.executable, "-m", "prismd", "db", "migrate"]
    procs = [
        subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out, _ in outs:
        assert out.decode().strip().endswith(f"schema version {SCHEMA_VERSION}")
    assert run(_versions(url)) == [v for v, _, _ in MIGRATIONS]

    # A database left at version 1 gets the rest at the next start.
    older = make_pg_database()

    async def at_version_1() -> None:
        conn = await asyncpg.connect(older)
        try:
            await conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            await conn.execute(MIGRATIONS[0][2])
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'core')")
            await conn.execute(
                "INSERT INTO sessions (id, agent_id, started_at) VALUES ('s', 'a', 't')"
            )
        finally:
            await conn.close()
        store = PostgresStore(older)
        await store.open()
        assert await _versions(older) == [v for v, _, _ in MIGRATIONS]
        assert await store.acquire_lease("s", "me", 30) is True  # the lease columns are there
        await store.close()

    run(at_version_1())
    done = prismd("db", "migrate", env={**env, "PRISMD_DATABASE_URL": older})
    assert done.returncode == 0 and f"schema version {SCHEMA_VERSION}" in done.stdout


# ---------------------------------------------------------------- leases


@pytest.fixture
def pg_url(postgres: PostgresServer, pg_module_url: str) -> str:
    from .services import reset_pg_database

    reset_pg_database(postgres, pg_module_url)
    return pg_module_url


def test_a_lease_has_one_owner_and_expires_by_the_database_clock(pg_url, monkeypatch):
    async def main() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        for sid in ("s1", "s2", "s3"):
            store.create_session(SessionRecord(sid, "a", started_at="t"))
        await store.flush()
        real_time = time.time
        # A's clock is an hour behind, B's an hour ahead: neither decides anything.
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
        assert await store.acquire_lease("s1", "A", 30) is True
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        assert await store.acquire_lease("s1", "B", 30) is False
        monkeypatch.setattr(time, "time", real_time)
        assert await store.acquire_lease("s1", "A", 30) is True  # its own: extended
        assert await store.acquire_lease("nope", "A", 30) is False  # no such session

        assert await store.acquire_lease("s2", "A", 30) is True
        assert await store.acquire_lease("s3", "B", 30) is True
        held = await store.renew_leases(["s1", "s2", "s3", "nope"], "A", 30)
        assert sorted(held) == ["s1", "s2"]
        assert await store.renew_leases([], "A", 30) == []

        # A stops renewing s1 (a short last renewal): it expires by the database's clock and
        # B takes it; A has lost it for good.
        assert await store.renew_leases(["s1"], "A", 0.2) == ["s1"]
        await until(
            lambda: store.acquire_lease("s1", "B", 30), "B takes the expired lease", HANG_GUARD_S
        )
        assert await store.renew_leases(["s1", "s2"], "A", 30) == ["s2"]
        assert await store.acquire_lease("s1", "A", 30) is False

        await store.release_lease("s1", "A")  # not A's: nothing happens
        assert await store.acquire_lease("s1", "A", 30) is False
        await store.release_lease("s1", "B")
        assert await store.acquire_lease("s1", "A", 30) is True
        await store.close()

    run(main())


def test_running_turns_without_a_live_lease_are_the_crashed_ones(pg_url):
    async def main() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        store.create_session(SessionRecord("s1", "a", started_at="t"))
        store.create_session(SessionRecord("s2", "a", started_at="t"))
        store.save_turn("s1", "t1", status="running")
        await store.save_turn("s2", "t2", status="complete")
        assert await store.expired_turns() == ["s1"]  # no lease was ever taken
        assert await store.running_turn("s1") == "t1"
        assert await store.running_turn("s2") is None
        assert await store.acquire_lease("s1", "A", 30) is True
        assert await store.expired_turns() == []  # a live process runs it
        assert await store.crashed_sessions() == []  # so a starting process leaves it alone
        assert await store.renew_leases(["s1"], "A", 0.1) == ["s1"]
        await until(
            lambda: _contains(store.expired_turns(), "s1"), "the lease expires", HANG_GUARD_S
        )
        assert await store.crashed_sessions() == ["s1"]
        await store.save_turn("s1", "t1", status="interrupted")
        assert await store.expired_turns() == []
        await store.close()

    run(main())


async def _contains(aw: Awaitable[list[str]], item: str) -> bool:
    return item in await aw


# ---------------------------------------------------------------- a server that goes away


def test_a_stopped_server_fails_fast_and_the_store_recovers(postgres, pg_url):
    async def main() -> None:
        store = PostgresStore(pg_url, timeout_s=2)
        await store.open()
        await store.create_session(SessionRecord("s1", "a", started_at="t"))
        await store.append_events("s1", [(1, None, "one")])
        await store.save_upload(UploadRecord("u1", "local", "f", "text/plain", 1, "t", b"x"))
        assert await store.read_events("s1", 0) == [(1, "one")]

        postgres.stop()
        try:
            write = store.append_events("s1", [(2, None, "two")])
            with pytest.raises(StoreUnavailable) as failed:
                await within(write)
            assert str(failed.value).startswith(f"PostgreSQL at 127.0.0.1:{postgres.port}/")
            for read in (
                store.read_events("s1", 0),
                store.get_session("s1"),
                store.get_upload("u1"),
                store.acquire_lease("s1", "A", 30),
                store.renew_leases(["s1"], "A", 30),
                store.expired_turns(),
                store.open_log("s1"),
            ):
                with pytest.raises(StoreUnavailable):
                    await within(read)
            with pytest.raises(StoreUnavailable):
                await within(store.flush())
        finally:
            postgres.start()
        # Back: new connections, nothing to do by hand. The failed write was not applied.
        await within(store.append_events("s1", [(2, None, "two again")]))
        assert await within(store.read_events("s1", 0)) == [(1, "one"), (2, "two again")]

        # A restart while the store is idle: its connections are stale, the next uses work.
        postgres.stop()
        postgres.start()
        assert (await within(store.get_upload("u1"))).data == b"x"  # type: ignore[union-attr]
        await within(store.append_events("s1", [(3, None, "three")]))
        assert await within(store.acquire_lease("s1", "A", 30)) is True
        await store.close()

    run(main())


@pytest.fixture
def frozen(postgres: PostgresServer) -> Iterator[Callable[[], None]]:
    """`freeze()` stops every process of the cluster (SIGSTOP): connections stay open and
    nothing answers, as across a network partition. They go on at the end."""
    stopped: list[psutil.Process] = []

    def freeze() -> None:
        main = psutil.Process(postgres.postmaster_pid())
        for proc in [main, *main.children(recursive=True)]:
            proc.send_signal(signal.SIGSTOP)
            stopped.append(proc)

    yield freeze
    for proc in stopped:
        proc.send_signal(signal.SIGCONT)


def test_a_server_that_stops_answering_fails_fast(pg_url, frozen):
    async def main() -> None:
        store = PostgresStore(pg_url, timeout_s=1)
        await store.open()
        await store.create_session(SessionRecord("s1", "a", started_at="t"))
        assert await store.read_events("s1", 0) == []
        frozen()
        with pytest.raises(StoreUnavailable):
            await within(store.append_events("s1", [(1, None, "one")]))
        with pytest.raises(StoreUnavailable):
            await within(store.read_events("s1", 0))
        with pytest.raises(StoreUnavailable):
            await within(store.acquire_lease("s1", "A", 30))
        await within(store.close())

    run(main())


def test_a_server_that_never_answers_fails_open_and_migrate_fast(tmp_path):
    """A port that accepts connections and says nothing (a black hole)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"postgresql://prismd:secret@127.0.0.1:{listener.getsockname()[1]}/prismd"
    try:
        with pytest.raises(StoreUnavailable) as failed:
            run(within(PostgresStore(url, timeout_s=1).open()))
        assert "secret" not in str(failed.value)
        config = tmp_path / "config.toml"
        config.write_text(f'[store]\nurl = "{url}"\ntimeout_s = 1\n')
        done = prismd("--config", str(config), "db", "migrate", env={"PRISMD_HOME": str(tmp_path)})
        assert done.returncode == 1 and "cannot connect: no answer within 1 s" in done.stderr
        assert "secret" not in done.stderr and "Traceback" not in done.stderr
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_database_that_does_not_exist_is_reported(postgres):
    with pytest.raises(StoreUnavailable, match='database "nope" does not exist'):
        run(within(PostgresStore(postgres.url("nope"), timeout_s=2).open()))


# ---------------------------------------------------------------- prismd db import


def _counts(stdout: str) -> dict[str, int]:
    counts = {}
    for line in stdout.splitlines():
        kind, _, number = line.rpartition("  ")
        if number.strip().isdigit() and kind.strip():
            counts[kind.strip()] = int(number)
    return counts


def test_db_import_moves_an_embedded_install_once(tmp_path, make_pg_database):
    data = tmp_path / "data"
    make_legacy_install(data)  # one session still in the older per-session layout
    make_memory_db(data / "memory.db", OLD_NOTES)  # notes where the memory tools kept them
    blob = bytes(range(256)) * 100

    async def fill() -> None:
        store = SqliteStore(data)
        await store.open()
        await store.create_user(UserRecord("u1", "alice", True, "hash", "2026-01-01"))
        await store.create_user(UserRecord("u2", "bob", False, "hash2", "2026-01-02"))
        await store.create_token(TokenRecord("k1", "u2", "ci", "tokenhash", "2026-01-02"))
        await store.create_login("loginhash", "u1", expires_at=2e9)
        await store.set_pref("u1", "default_agent", "helper")
        await store.sync_agents([row(BUILTIN_AGENT) | {"builtin": 1}])
        await store.save_agent(row(AgentSettings(id="helper", name="Helper")), "u1")
        await store.save_upload(UploadRecord("upl1", "u1", "b.bin", "x/y", len(blob), "t", blob))
        store.create_session(SessionRecord("new", "a", name="New", started_at="t2", owner_id="u1"))
        pdf = FileRecord("f1", "a.pdf", "application/pdf", len(blob), blob, text="pdf text")
        store.add_message("new", MessageRecord("m9", "user", "see file", "t", "tn", files=[pdf]))
        store.save_turn("new", "tn", client_message_id="c9", status="complete", start_seq=1)
        await store.append_events("new", [(1, "tn", "x"), (2, "tn", "y"), (3, "tn", "z")])
        await store.add_note("u1/helper", "Alice's build runs on Fridays.", ["ci"])
        await store.close()

    run(fill())
    url = make_pg_database()
    env = {"PRISMD_HOME": str(tmp_path), "PRISMD_DATABASE_URL": url}
    first = prismd("db", "import", "--from-sqlite", str(data), env=env)
    assert first.returncode == 0, first.stderr
    assert _counts(first.stdout) == {
        "users": 2,
        "API tokens": 1,
        "login sessions": 1,
        "preferences": 1,
        "agents": 1,  # the config's agents are written by each start, not moved
        "sessions": 2,
        "messages": 3,
        "files": 1,
        "turns": 2,
        "events": 5,
        "uploads": 1,
        "memory notes": 4,
    }

    async def check() -> None:
        store = PostgresStore(url)
        await store.open()
        await check_legacy_session(store)
        record = await store.get_session("new")
        assert record is not None and (record.name, record.owner_id) == ("New", "u1")
        [message] = await store.load_messages("new", with_file_data=True)
        assert message.files[0].data == blob and message.files[0].text == "pdf text"
        assert (await store.open_log("new")).client_turns == {"c9": "tn"}
        assert [u.name for u in await store.list_users()] == ["alice", "bob"]
        assert (await store.get_user("u1")).admin is True  # type: ignore[union-attr]
        assert (await store.token_user("tokenhash", "now")).name == "bob"  # type: ignore[union-attr]
        assert (await store.login_user("loginhash", 1.5e9)).name == "alice"  # type: ignore[union-attr]
        assert await store.get_pref("u1", "default_agent") == "helper"
        assert [(a["id"], a["owner_id"]) for a in await store.list_custom_agents()] == [
            ("helper", "u1")
        ]
        upload = await store.get_upload("upl1")
        assert upload is not None and upload.data == blob and upload.filename == "b.bin"
        # The notes keep their numbers, dates and scopes, and are searched here.
        notes = await store.search_notes("agent-a", "", 10)
        assert [(n.id, n.created_at, n.tags) for n in notes] == [
            (7, "2025-01-04T00:00:00Z", ["work", "dates"]),
            (1, "2025-01-02T03:04:05Z", ["prefs"]),
        ]
        assert [n.id for n in await store.search_notes("agent-a", "GENMAICHA", 10)] == [1]
        assert [n.text for n in await store.search_notes("u1/helper", "fridays ci", 10)] == [
            "Alice's build runs on Fridays."
        ]
        assert [n.id for n in await store.search_notes("alice/agent-a", "tea", 10)] == [2]
        assert await store.add_note("agent-a", "Noted after the move.", []) == 9  # ids go on
        # Something lost after a run cut off halfway: the next run moves just that.
        conn = await asyncpg.connect(url)
        await conn.execute("DELETE FROM session_events WHERE session_id='new' AND seq=3")
        await conn.close()
        await store.close()

    run(check())
    listed = prismd("sessions", "list", "--json", env=env)  # the CLI's store follows the URL
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["id"] for s in json.loads(listed.stdout)) == ["new", "old"]
    again = prismd("db", "import", "--from-sqlite", str(data), env=env)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in _counts(again.stdout).items() if v} == {"events": 1}
    last = prismd("db", "import", "--from-sqlite", str(data), env=env)
    assert set(_counts(last.stdout).values()) == {0}
    assert "nothing moved" in last.stdout

    nothing = prismd("db", "import", "--from-sqlite", str(tmp_path / "nope"), env=env)
    assert nothing.returncode == 1 and "no prismd data" in nothing.stderr
    unset = prismd("db", "import", "--from-sqlite", str(data), env={"PRISMD_HOME": str(tmp_path)})
    assert unset.returncode == 2 and "PRISMD_DATABASE_URL" in unset.stderr


def test_db_import_moves_the_notes_of_several_machines_into_one_database(
    tmp_path, make_pg_database
):
    """Each machine of a deployment kept its own memory.db: importing each one's data
    directory moves every note; numbers already taken are given anew, a note already there
    (the same on two machines, or a second run) is not moved twice."""
    url = make_pg_database()
    env = {"PRISMD_HOME": str(tmp_path), "PRISMD_DATABASE_URL": url}
    machines = {"m1": OLD_NOTES, "m2": OTHER_NOTES}
    for name, notes in machines.items():
        make_memory_db(tmp_path / name / "memory.db", notes)  # no prismd.db: notes only
    moved = [
        _counts(prismd("db", "import", "--from-sqlite", str(tmp_path / name), env=env).stdout)
        for name in machines
    ]
    assert [m["memory notes"] for m in moved] == [3, 1]
    again = prismd("db", "import", "--from-sqlite", str(tmp_path / "m2"), env=env)
    assert again.returncode == 0 and _counts(again.stdout)["memory notes"] == 0
    assert (tmp_path / "m2" / "memory.db.imported").is_file()

    async def check() -> None:
        store = PostgresStore(url)
        await store.open()
        assert [(n.id, n.text) for n in await store.search_notes("agent-a", "", 10)] == [
            (8, "The office wifi is called prism."),  # its number 1 was taken
            (7, "Project deadline is March 3rd."),
            (1, "The user's favourite tea is genmaicha."),
        ]
        assert [n.id for n in await store.search_notes("alice/agent-a", "", 10)] == [2]
        assert [n.id for n in await store.search_notes("agent-a", "wifi", 10)] == [8]
        assert await store.add_note("agent-a", "next", []) == 9
        await store.close()

    run(check())


def test_a_machine_with_notes_not_yet_moved_is_told_how(tmp_path, caplog):
    settings = load_settings(
        env={"PRISMD_HOME": str(tmp_path), "PRISMD_DATABASE_URL": "postgresql://x@127.0.0.1/db"}
    )
    make_store(settings)
    assert "memory notes" not in caplog.text
    make_memory_db(settings.data_dir / "memory.db", OLD_NOTES)
    make_store(settings)
    assert f"prismd db import --from-sqlite {settings.data_dir}" in caplog.text


# ---------------------------------------------------------------- configuration, a whole server


def test_the_database_url_is_configured_and_masked(tmp_path):
    url = "postgresql://prismd:s3cret@db.internal:5432/prismd"
    settings = load_settings(env={"PRISMD_HOME": str(tmp_path), "PRISMD_DATABASE_URL": url})
    assert settings.store.url == url
    assert isinstance(make_store(settings), PostgresStore)
    shown = json.dumps(effective(settings))
    assert "s3cret" not in shown and "db.internal:5432/prismd" in shown
    assert isinstance(make_store(load_settings(env={"PRISMD_HOME": str(tmp_path)})), SqliteStore)
    (tmp_path / "config.toml").write_text('[store]\nurl = "mysql://x@y/z"\n')
    with pytest.raises(ConfigError, match="store.url"):
        load_settings(env={"PRISMD_HOME": str(tmp_path)})


def test_prismd_serves_from_postgresql_across_a_restart(make_server, make_pg_database, fake_openai):
    """core.py builds the PostgreSQL store when the URL is set: a turn, a restart, then the
    history, seq, replay and idempotent send all come from the database."""
    srv = make_server({**openai_env(fake_openai), "PRISMD_DATABASE_URL": make_pg_database()})
    fake_openai.script(Reply(text=["remembered ", "this"]), match="first")
    with srv.client() as c:
        first = c.turn(message="first", clientMessageId="c1")
    sid, last = first[0]["sessionId"], first[-1]["seq"]
    srv.restart()
    assert not (srv.data_dir / "prismd.db").exists()  # nothing went to SQLite
    fake_openai.script(Reply(text=["again"]), match="second")
    with srv.client() as c:
        c.send(type="resume", sessionId=sid, lastSeq=last)
        assert c.recv()["lastSeq"] == last
        second = c.turn(message="second", sessionId=sid)
    assert second[0]["seq"] == last + 1  # seq survives the restart
    messages = srv.get(f"/api/sessions/{sid}/messages").json()
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "first"),
        ("assistant", "remembered this"),
        ("user", "second"),
        ("assistant", "again"),
    ]
    with srv.client() as c:  # the first clientMessageId again: replayed, not run again
        requests = len(fake_openai.requests)
        c.send(type="chat", message="first", clientMessageId="c1", sessionId=sid)
        again = c.until("context_usage")
    assert len(fake_openai.requests) == requests
    assert again[1:] == first[1:]
