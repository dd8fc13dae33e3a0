"""A session's turn count and figures, counted once: in memory, in the store, in
`GET /api/sessions/{id}/stats` and in the list rows (issue 14's flaky `test_stats`, which once
saw 3 turns for a session with two).

The count lives in two places: the live record (`SessionService.add_turn_totals` adds 1 in
memory) and the session row (the store's `turn_count=turn_count+1`). A turn is counted twice
when one copy already holds the other's increment and adds its own: a row written from the
in-memory record after the turn was counted there (that was the flake: `create_session` once
read the record when its queued INSERT ran, which a fast first turn had already counted), or a
record loaded from the row after its increment and counted again. The in-process test holds
the store's writer so that every write is behind the turns; the end-to-end one runs turns with
the session dropped and loaded again between them, and reads it live and stored.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx

from prismd.auth.service import LOCAL_PRINCIPAL
from prismd.sessions.bus import LocalBus
from prismd.sessions.service import SessionService
from prismd.store.base import MessageRecord, Store, Written
from prismd.store.sqlite import SqliteStore

from .conftest import PrismdServer, of_type, openai_env
from .test_store import new_store  # noqa: F401 - a fixture: both stores
from .waiting import wait_for


class HeldStore(SqliteStore):
    """A SQLite store whose writer can be held: writes queued meanwhile wait behind it (as
    behind a slow disk), in order."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._gate: threading.Event | None = None
        self._held: Written | None = None

    def hold(self) -> None:
        gate = self._gate = threading.Event()
        self._held = self._submit(lambda: gate.wait(30))

    async def release(self) -> None:
        assert self._gate is not None and self._held is not None
        self._gate.set()
        await self._held


def test_a_turn_is_counted_once_when_the_store_is_behind(tmp_path: Path) -> None:
    async def main() -> None:
        store = HeldStore(tmp_path)
        await store.open()
        sessions = SessionService(store, LocalBus())
        turns = 4
        store.hold()  # the new session's row is written after its first turn was counted
        live = sessions.create("assistant", owner_id=LOCAL_PRINCIPAL.id)
        sid = live.id
        for n in range(1, turns + 1):
            if n > 1:
                store.hold()
            turn = await sessions.begin_turn(live, f"cm-{n}")
            sessions.publish(live, turn.id, {"type": "start"})
            for role in ("user", "assistant"):
                message = MessageRecord(f"m{n}{role}", role, "text", "t", turn_id=turn.id)
                sessions.add_message(live, message)
                live.history.append(message)
            sessions.add_turn_totals(live, 10, 5, 0.25, f"2026-01-0{n}T00:00:00Z")
            done = {"type": "done", "rounds": 1, "latency": {"llmMs": 10.0 * n}}
            sessions.publish(live, turn.id, done)
            sessions.save_turn(live, turn.id, status="complete")
            sessions.end_turn(live, turn)  # nobody bound: dropped while its writes wait
            assert sessions.live(sid) is None
            assert live.record.turn_count == n  # in memory, before anything was written
            # Loaded again while its writes wait: the load waits for the last of them.
            reload = asyncio.ensure_future(sessions.get(sid))
            await store.release()
            again = await reload
            assert again is not None and again is not live
            stored = await store.get_session(sid)
            assert stored is not None
            assert again.record.turn_count == stored.turn_count == n
            assert again.record.tokens_in == stored.tokens_in == 10 * n
            assert again.record.cost_usd == stored.cost_usd == 0.25 * n
            live = again
        rows, total = await store.list_sessions(10, 0)
        assert total == 1 and rows[0].turn_count == turns
        counts = await store.session_activity(sid)
        assert (counts.messages, counts.assistant, counts.tool, counts.errors) == (
            2 * turns,
            turns,
            0,
            0,
        )
        assert counts.rounds == turns and counts.llm_ms == 10.0 * sum(range(1, turns + 1))
        await store.close()

    asyncio.run(main())


def test_session_activity_counts_in_the_store(new_store) -> None:  # noqa: F811
    """Tool results, errors, and only `done` events with rounds count; an unknown session
    counts zeros (both stores)."""

    async def main() -> None:
        store = new_store()
        await store.open()
        sessions = SessionService(store, LocalBus())
        live = sessions.create("assistant")
        turn = await sessions.begin_turn(live, None)
        for i, (role, status) in enumerate(
            [("user", "complete"), ("assistant", "complete"), ("tool", "complete")]
            + [("assistant", "error"), ("assistant", "stopped")]
        ):
            sessions.add_message(live, MessageRecord(f"m{i}", role, "x", "t", status=status))
        sessions.publish(live, turn.id, {"type": "chunk", "delta": '"type":"done","rounds":9'})
        sessions.publish(live, turn.id, {"type": "done", "rounds": 2, "latency": {"llmMs": 30}})
        sessions.publish(live, turn.id, {"type": "done", "rounds": 0, "latency": {"llmMs": 99}})
        sessions.end_turn(live, turn)
        await store.flush()
        counts = await store.session_activity(live.id)
        assert (counts.messages, counts.assistant, counts.tool, counts.errors) == (5, 3, 1, 1)
        assert (counts.rounds, counts.llm_ms) == (2, 30.0)
        # The default of the interface (a store that does not aggregate) counts the same.
        assert await Store.session_activity(store, live.id) == counts
        empty = await store.session_activity("sess_unknown")
        assert (empty.messages, empty.assistant, empty.rounds, empty.llm_ms) == (0, 0, 0, 0.0)
        assert await Store.session_activity(store, "sess_unknown") == empty
        await store.close()

    asyncio.run(main())


def test_stats_and_rows_count_each_turn_once(make_server: Any, fake_openai: Any) -> None:
    """Turns with the session dropped from memory and loaded again between them (by the next
    chat, by a route that loads it), and read live (a client bound) and stored: the stats, the
    list rows and the session row always say how many turns ran."""
    srv: PrismdServer = make_server(openai_env(fake_openai))
    http = httpx.Client(base_url=srv.url, timeout=15)

    def live_sessions() -> int:
        return int(http.get("/api/health").json()["liveSessions"])

    def check(sid: str, ran: int, done: list[dict[str, Any]]) -> None:
        stats = http.get(f"/api/sessions/{sid}/stats").json()
        row = next(r for r in http.get("/api/sessions?limit=500").json() if r["id"] == sid)
        one = http.get(f"/api/sessions/{sid}").json()
        enriched = next(r for r in http.get("/api/sessions/enriched").json() if r["id"] == sid)
        assert stats["turns"] == row["turn_count"] == one["turn_count"] == ran
        assert enriched["turn_count"] == ran
        assert stats["messages"] == 2 * ran and stats["llm_calls"] == enriched["llm_calls"] == ran
        tokens_in = sum(d["tokensIn"] for d in done)
        assert stats["tokens_in"] == row["tokens_in"] == one["tokens_in"] == tokens_in
        assert stats["tokens_out"] == row["tokens_out"] == sum(d["tokensOut"] for d in done)

    try:
        done: list[dict[str, Any]] = []
        sid = None
        ran = 0
        for n in range(1, 6):
            with srv.client() as c:
                frames = c.turn(message=f"turn {n}", **({"sessionId": sid} if sid else {}))
                sid = frames[0]["sessionId"]
                done.append(of_type(frames, "done")[0])
                ran += 1
                check(sid, ran, done)  # live: a client is bound
                if n % 2 == 0:  # a second turn on the same connection
                    done.append(of_type(c.turn(message=f"again {n}", sessionId=sid), "done")[0])
                    ran += 1
                    check(sid, ran, done)
            wait_for(lambda: live_sessions() == 0, "the session to be dropped from memory")
            check(sid, ran, done)  # stored
            # A route that loads the session (and drops it after): loaded from the row.
            renamed = http.patch(f"/api/sessions/{sid}", json={"name": f"after {ran}"})
            assert renamed.status_code == 200, renamed.text
            wait_for(lambda: live_sessions() == 0, "the session to be dropped again")
            check(sid, ran, done)
        srv.restart()  # and from the database alone
        check(sid, ran, done)
    finally:
        http.close()
