"""The store's methods for uploads' lifecycle, daily chat budgets, usage totals, login sessions
and session files (issue 15), in-process, each test against both implementations (SQLite, and
PostgreSQL on a throwaway cluster, as tests/test_store.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from prismd.auth import Principal
from prismd.config import UploadsSettings
from prismd.protocol import ErrorCode, ProtocolError
from prismd.server.uploads import BUDGET_REFRESH_S, DailyBudget, utc_day
from prismd.store.base import (
    FileRecord,
    MessageRecord,
    SessionRecord,
    Store,
    UploadRecord,
    UserRecord,
)
from prismd.store.postgres import PostgresStore
from prismd.store.sqlite import SqliteStore

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


async def _open(new_store: Callable[[], Store]) -> Store:
    store = new_store()
    await store.open()
    return store


def _upload_file(store: Store, user: str, upload_id: str) -> Path | None:
    """Where SQLite keeps an upload's bytes (PostgreSQL keeps them in the row)."""
    if isinstance(store, SqliteStore):
        return store.data_dir / "uploads" / user / upload_id
    return None


def _upload(upload_id: str, user: str, size: int, created: str) -> UploadRecord:
    return UploadRecord(
        upload_id, user, f"{upload_id}.txt", "text/plain", size, created, b"x" * size
    )


def test_upload_links_quota_figures_and_session_deletion(new_store):
    async def main() -> None:
        store = await _open(new_store)
        for sid in ("s1", "s2"):
            await store.create_session(SessionRecord(sid, "a", started_at="t", owner_id="bob"))
        await store.save_upload(_upload("u_shared", "bob", 10, "2030-01-01T00:00:00.000Z"))
        await store.save_upload(_upload("u_only1", "bob", 20, "2030-01-01T00:00:00.000Z"))
        await store.save_upload(_upload("u_carol", "carol", 5, "2030-01-01T00:00:00.000Z"))
        assert await store.upload_usage("bob") == (30, 2)
        assert await store.upload_usage("carol") == (5, 1)
        assert await store.upload_usage("nobody") == (0, 0)
        store.link_uploads("s1", ["u_shared", "u_only1", "u_only1"])  # twice: harmless
        await store.link_uploads("s2", ["u_shared"])
        # s1 goes: its own upload with it, the one s2 sent too stays.
        await store.delete_session("s1")
        assert await store.delete_session_uploads("s1") == 1
        assert await store.get_upload("u_only1") is None
        gone = _upload_file(store, "bob", "u_only1")
        assert gone is None or not gone.exists()
        assert (await store.get_upload("u_shared")).data == b"x" * 10
        assert await store.upload_usage("bob") == (10, 1)
        await store.delete_session("s2")
        assert await store.delete_session_uploads("s2") == 1
        assert await store.upload_usage("bob") == (0, 0)
        assert await store.delete_session_uploads("s2") == 0  # nothing left to do
        assert await store.delete_upload("u_carol") is True
        assert await store.delete_upload("u_carol") is False
        gone = _upload_file(store, "carol", "u_carol")
        assert gone is None or not gone.exists()
        await store.close()

    run(main())


def test_prune_removes_only_old_uploads_no_session_refers_to(new_store):
    async def main() -> None:
        store = await _open(new_store)
        await store.create_session(SessionRecord("s1", "a", started_at="t", owner_id="bob"))
        await store.create_session(SessionRecord("gone", "a", started_at="t", owner_id="bob"))
        old, new = "2020-01-01T00:00:00.000Z", "2030-01-01T00:00:00.000Z"
        await store.save_upload(_upload("u_old_unused", "bob", 1, old))
        await store.save_upload(_upload("u_old_used", "bob", 1, old))
        await store.save_upload(_upload("u_new_unused", "bob", 1, new))
        await store.save_upload(_upload("u_old_of_deleted", "bob", 1, old))
        await store.link_uploads("s1", ["u_old_used"])
        await store.link_uploads("gone", ["u_old_of_deleted"])
        # A session deleted without cleaning its links frees its uploads all the same.
        await store.delete_session("gone")
        assert await store.prune_uploads("2025-01-01T00:00:00.000Z") == 2
        assert await store.get_upload("u_old_unused") is None
        assert await store.get_upload("u_old_of_deleted") is None
        assert await store.get_upload("u_old_used") is not None
        assert await store.get_upload("u_new_unused") is not None
        assert await store.prune_uploads("2025-01-01T00:00:00.000Z") == 0
        await store.close()

    run(main())


def test_daily_chat_totals_per_user_and_day(new_store):
    async def main() -> None:
        store = await _open(new_store)
        assert await store.chat_usage("bob", "2030-05-01") == (0, 0)
        store.add_chat_usage("bob", "2030-05-01", 600, 1)
        await store.add_chat_usage("bob", "2030-05-01", 400, 2)
        await store.add_chat_usage("carol", "2030-05-01", 7, 0)
        assert await store.chat_usage("bob", "2030-05-01") == (1000, 3)
        assert await store.chat_usage("carol", "2030-05-01") == (7, 0)
        # A new day starts at zero (and the old ones of that user may go).
        await store.add_chat_usage("bob", "2030-05-02", 5, 1)
        assert await store.chat_usage("bob", "2030-05-02") == (5, 1)
        assert await store.chat_usage("bob", "2030-05-01") == (0, 0)
        assert await store.chat_usage("carol", "2030-05-01") == (7, 0)
        await store.close()

    run(main())


def test_the_daily_budget_never_counts_past_its_limit(new_store):
    """Chats of one user checked at once: exactly as many pass as fit, counted while their
    writes are still queued; another user's budget is their own."""

    async def main() -> None:
        store = await _open(new_store)
        limits = UploadsSettings(chat_bytes_per_day=1000, chat_files_per_day=0)
        core = SimpleNamespace(settings=SimpleNamespace(uploads=limits), store=store)
        budget = DailyBudget()
        bob, carol = (Principal(u, u, False, "token") for u in ("bob", "carol"))

        async def charge(user: Principal) -> bool:
            try:
                await budget.charge(core, user, 100, 1)  # type: ignore[arg-type]
            except ProtocolError as exc:
                assert exc.code == ErrorCode.RATE_LIMITED and "1000 bytes" in exc.message
                return False
            return True

        results = await asyncio.gather(*(charge(bob) for _ in range(25)))
        assert sum(results) == 10
        assert await charge(carol)
        await store.flush()
        day = utc_day()
        assert await store.chat_usage("bob", day) == (1000, 10)
        assert await budget.used(store, "bob", day) == (1000, 10)  # nothing counted twice
        assert not await charge(bob)
        await store.close()

    run(main())


def test_the_daily_budget_reads_the_store_once_per_refresh(new_store):
    """A user's chats sent at once do not each wait for a store read (they queued behind one
    another on the user's lock: 500 chats, 500 reads); another process's counts are seen once
    the last read is BUDGET_REFRESH_S old; a read that fails is not trusted."""

    async def main() -> None:
        store = await _open(new_store)
        limits = UploadsSettings(chat_bytes_per_day=1000, chat_files_per_day=0)
        core = SimpleNamespace(settings=SimpleNamespace(uploads=limits), store=store)
        reads: list[str] = []
        real_read = store.chat_usage

        async def counted_read(user_id: str, day: str) -> tuple[int, int]:
            reads.append(user_id)
            return await real_read(user_id, day)

        store.chat_usage = counted_read  # type: ignore[method-assign]
        clock = [0.0]
        here, there = (DailyBudget(clock=lambda: clock[0]) for _ in range(2))  # two processes
        bob = Principal("bob", "bob", False, "token")

        async def charge(budget: DailyBudget) -> bool:
            try:
                await budget.charge(core, bob, 100, 0)  # type: ignore[arg-type]
            except ProtocolError:
                return False
            return True

        assert sum(await asyncio.gather(*(charge(here) for _ in range(6)))) == 6
        assert reads == ["bob"]  # one read for six chats
        await store.flush()
        assert await charge(there) and await charge(there)  # it read the 600 bytes: 800
        assert reads == ["bob", "bob"]
        await store.flush()
        # `here` still goes by its read and its own counts (600: `there`'s chats unseen)...
        assert await charge(here)
        assert reads == ["bob", "bob"]
        await store.flush()
        # ...but once its read is old, it reads again and sees `there`'s chats: 900 used.
        clock[0] += BUDGET_REFRESH_S
        assert await charge(here)  # 1000
        assert not await charge(here)
        assert reads == ["bob", "bob", "bob"]
        await store.flush()
        assert await store.chat_usage("bob", utc_day()) == (1000, 0)
        # A failed read refuses nothing silently and is not kept as the user's totals.
        clock[0] += BUDGET_REFRESH_S

        async def broken(user_id: str, day: str) -> tuple[int, int]:
            raise RuntimeError("store down")

        store.chat_usage = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await here.charge(core, bob, 1, 0)  # type: ignore[arg-type]
        store.chat_usage = counted_read  # type: ignore[method-assign]
        assert not await charge(here)  # read again: 1000 used
        await store.close()

    run(main())


def test_usage_totals_sum_the_stored_turns(new_store):
    async def main() -> None:
        store = await _open(new_store)
        await store.create_session(SessionRecord("b1", "a", started_at="t", owner_id="bob"))
        await store.create_session(SessionRecord("b2", "a", started_at="t", owner_id="bob"))
        await store.create_session(SessionRecord("c1", "a", started_at="t", owner_id="carol"))
        turns = [
            ("b1", "t1", "complete", 10, 5, 0.01, "2030-01-01T00:00:00.000Z"),
            ("b1", "t2", "stopped", 20, 2, 0.02, "2030-02-01T00:00:00.000Z"),
            ("b2", "t3", "complete", 7, 3, None, "2030-02-02T00:00:00.000Z"),  # no price
            ("b2", "t4", "error", 0, 0, None, "2030-02-03T00:00:00.000Z"),  # spent nothing
            ("b2", "t7", "error", 4, 1, 0.005, "2030-02-04T00:00:00.000Z"),  # failed, after a call
            ("b2", "t5", "running", 0, 0, None, None),
            ("c1", "t6", "complete", 100, 50, 1.0, "2030-02-01T00:00:00.000Z"),
        ]
        for sid, tid, status, tin, tout, cost, ended in turns:
            store.save_turn(
                sid,
                tid,
                status=status,
                tokens_in=tin,
                tokens_out=tout,
                cost_usd=cost,
                ended_at=ended,
            )
        await store.flush()
        bob = await store.usage_totals("bob")
        assert (bob.turns, bob.tokens_in, bob.tokens_out, bob.sessions) == (4, 41, 11, 2)
        assert abs(bob.cost_usd - 0.035) < 1e-9 and bob.unpriced_turns == 1
        assert bob.to_json()["costKnown"] is False and bob.to_json()["totalTokens"] == 52
        recent = await store.usage_totals("bob", since="2030-01-15T00:00:00.000Z")
        assert (recent.turns, recent.tokens_in, recent.sessions) == (3, 31, 2)
        everyone = await store.usage_totals(None)
        assert (everyone.turns, everyone.tokens_in, everyone.sessions) == (5, 141, 3)
        nobody = await store.usage_totals("nobody")
        assert (nobody.turns, nobody.cost_usd, nobody.to_json()["costKnown"]) == (0, 0.0, True)
        await store.close()

    run(main())


def test_login_sessions_are_listed_without_the_expired_ones(new_store):
    async def main() -> None:
        store = await _open(new_store)
        for uid in ("bob", "carol"):
            await store.create_user(UserRecord(uid, uid, created_at="t"))
        now = time.time()
        await store.create_login("h_bob_1", "bob", now + 3600)
        await store.create_login("h_carol", "carol", now + 3600)
        await store.create_login("h_bob_old", "bob", now - 1)  # expired
        await store.create_login("h_bob_2", "bob", now + 7200)
        bob = await store.list_logins("bob")
        assert [x.token_hash for x in bob] == ["h_bob_2", "h_bob_1"]  # newest first
        assert all(x.user_id == "bob" and now - 60 < x.created_at <= time.time() for x in bob)
        assert {x.token_hash for x in await store.list_logins()} == {
            "h_bob_1",
            "h_bob_2",
            "h_carol",
        }
        await store.set_password("bob", "new-hash")  # ends bob's logins
        assert await store.list_logins("bob") == []
        await store.close()

    run(main())


def test_one_session_file_is_read_with_its_data(new_store):
    async def main() -> None:
        store = await _open(new_store)
        await store.create_session(SessionRecord("s1", "a", started_at="t"))
        png = FileRecord("file_1", "dot.png", "image/png", 4, b"\x89PNG")
        message = MessageRecord("m1", "user", "look", "t", files=[png])
        await store.add_message("s1", message)
        found = await store.get_session_file("s1", "file_1")
        assert found is not None and (found.filename, found.data) == ("dot.png", b"\x89PNG")
        assert await store.get_session_file("other", "file_1") is None
        assert await store.get_session_file("s1", "nope") is None
        await store.close()

    run(main())
