"""The sessions service in-process, on a real SQLite store whose appends become durable when
the test says so: write-ahead delivery, coalescing under load, failed writes, reloads.

These run in milliseconds; the end-to-end tests (real server, real sockets) cover the same
promises over the wire.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prismd.auth.service import LOCAL_PRINCIPAL
from prismd.protocol import ErrorCode, ProtocolError
from prismd.sessions.bus import LocalBus
from prismd.sessions.coordination import DistributedCoordination
from prismd.sessions.service import SessionService
from prismd.store.base import EventRow, Written
from prismd.store.sqlite import SqliteStore


class GatedStore(SqliteStore):
    """Appends are written at once, but reported durable only when `release` says so (as a
    store that is behind would)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.gates: deque[tuple[Written, Written]] = deque()
        self.fail_next = False

    def append_events(self, session_id: str, events: list[EventRow]) -> Written:
        real = super().append_events(session_id, events)
        gated: Written = asyncio.get_running_loop().create_future()
        self.gates.append((real, gated))
        return gated

    async def release(self) -> None:
        real, gated = self.gates.popleft()
        await real
        if self.fail_next:
            self.fail_next = False
            gated.set_exception(OSError("disk full"))
        else:
            gated.set_result(None)
        await asyncio.sleep(0)  # let the service's callbacks run

    async def release_all(self) -> None:
        while self.gates:
            await self.release()


class Tab:
    """A subscriber that records what it was sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.gone: list[str] = []

    def deliver(self, seq: int, frame: str) -> None:
        self.frames.append(json.loads(frame))

    def session_gone(self, session_id: str, reason: str) -> None:
        self.gone.append(reason)

    def chunks(self) -> list[str]:
        return [f["delta"] for f in self.frames if f["type"] == "chunk"]


async def _service(tmp: Path) -> tuple[GatedStore, SessionService]:
    store = GatedStore(tmp)
    await store.open()
    return store, SessionService(store, LocalBus())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_each_piece_is_its_own_event_when_the_store_keeps_up(tmp_path):
    async def main() -> None:
        store, sessions = await _service(tmp_path)
        live = sessions.create("assistant")
        tab = Tab()
        sessions.subscribe(live, tab)
        turn = await sessions.begin_turn(live, None)
        for piece in ("a", "b", "c"):
            sessions.publish(live, turn.id, {"type": "chunk", "delta": piece})
            assert tab.chunks()[-1:] != [piece]  # not delivered before it is durable
            await store.release()
            assert tab.chunks()[-1] == piece
        assert [f["seq"] for f in tab.frames] == [1, 2, 3]
        await store.close()

    run(main())


def test_pieces_merge_while_the_previous_append_is_written(tmp_path):
    async def main() -> None:
        store, sessions = await _service(tmp_path)
        live = sessions.create("assistant")
        tab = Tab()
        sessions.subscribe(live, tab)
        turn = await sessions.begin_turn(live, None)
        sessions.publish(live, turn.id, {"type": "chunk", "delta": "a"})
        for piece in ("b", "c", "d"):  # all while "a" is being written
            sessions.publish(live, turn.id, {"type": "chunk", "delta": piece})
        assert len(store.gates) == 1
        await store.release()  # "a" is durable: "bcd" goes as one event
        assert tab.chunks() == ["a"] and len(store.gates) == 1
        sessions.publish(live, turn.id, {"type": "done"})
        await store.release_all()
        assert tab.chunks() == ["a", "bcd"]
        assert [(f["type"], f["seq"]) for f in tab.frames] == [
            ("chunk", 1),
            ("chunk", 2),
            ("done", 3),
        ]
        stored = await store.read_events(live.id, 0)
        assert [json.loads(frame) for _, frame in stored] == tab.frames
        await store.close()

    run(main())


def test_a_failed_append_is_never_delivered_and_ends_the_turn(tmp_path):
    async def main() -> None:
        store, sessions = await _service(tmp_path)
        live = sessions.create("assistant")
        tab = Tab()
        sessions.subscribe(live, tab)
        turn = await sessions.begin_turn(live, None)
        turn.task = asyncio.create_task(asyncio.sleep(60))
        sessions.publish(live, turn.id, {"type": "chunk", "delta": "saved"})
        await store.release()
        sessions.publish(live, turn.id, {"type": "chunk", "delta": "lost"})
        store.fail_next = True
        await store.release()
        sessions.publish(live, turn.id, {"type": "chunk", "delta": "after"})
        await store.release_all()
        assert tab.chunks() == ["saved"]
        assert tab.frames[-1]["type"] == "error" and tab.frames[-1]["code"] == "store_unavailable"
        assert "seq" not in tab.frames[-1]
        assert tab.gone == ["store_failed"]
        await asyncio.sleep(0)
        assert turn.task.cancelled()
        assert sessions.live(live.id) is None  # reloaded from what is durable when next used
        await store.close()

    run(main())


def test_a_reload_waits_for_the_last_write(tmp_path):
    """A session dropped from memory while its writes are queued is read back whole."""

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        sessions = SessionService(store, LocalBus())
        live = sessions.create("assistant")
        turn = await sessions.begin_turn(live, "cm-1")
        sessions.publish(live, turn.id, {"type": "start"})
        sessions.add_turn_totals(live, 3, 4, None, "2026-01-01T00:00:00Z")
        sessions.save_turn(live, turn.id, status="complete")
        sessions.end_turn(live, turn)  # nobody bound: dropped from memory at once
        assert sessions.live(live.id) is None
        again = await sessions.get(live.id)
        assert again is not None and again.record.turn_count == 1
        assert again.last_seq == 1 and again.client_turns == {"cm-1": turn.id}
        await store.close()

    run(main())


def test_other_users_sessions_are_not_found(tmp_path):
    from prismd.auth.service import Principal
    from prismd.protocol import ProtocolError

    async def main() -> None:
        store = SqliteStore(tmp_path)
        await store.open()
        sessions = SessionService(store, LocalBus())
        alice = Principal("u_alice", "alice", False, "token")
        bob = Principal("u_bob", "bob", False, "token")
        live = await sessions.for_chat(alice, "shared-id", None, "assistant")
        with pytest.raises(ProtocolError) as err:
            await sessions.for_chat(bob, "shared-id", None, "assistant")
        assert err.value.code == "session_not_found"
        assert await sessions.find(bob, live.id) is None
        assert await sessions.find(LOCAL_PRINCIPAL, live.id) is not None  # an admin
        await store.close()

    run(main())


# Each step: publish a piece, or let the oldest queued append become durable.
steps = st.lists(st.one_of(st.text(min_size=1, max_size=5), st.just(None)), max_size=40)


@given(steps=steps)
def test_coalescing_keeps_the_text_and_the_numbering(steps):
    """For every split of the model's text and every timing of the store, the client gets the
    same text, in order, with seq growing by one per event, and the log holds exactly what it
    was sent."""

    async def main(tmp: Path) -> None:
        store, sessions = await _service(tmp)
        live = sessions.create("assistant")
        tab = Tab()
        sessions.subscribe(live, tab)
        turn = await sessions.begin_turn(live, None)
        sessions.publish(live, turn.id, {"type": "start"})
        sent = []
        for step in steps:
            if step is None:
                if store.gates:
                    await store.release()
            else:
                sent.append(step)
                sessions.publish(live, turn.id, {"type": "chunk", "delta": step})
        sessions.publish(live, turn.id, {"type": "done"})
        await store.release_all()
        assert "".join(tab.chunks()) == "".join(sent)
        assert [f["seq"] for f in tab.frames] == list(range(1, len(tab.frames) + 1))
        assert tab.frames[0]["type"] == "start" and tab.frames[-1]["type"] == "done"
        stored = await store.read_events(live.id, 0)
        assert [json.loads(frame) for _, frame in stored] == tab.frames
        await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        run(main(Path(tmp)))


class _Leases:
    """PostgresStore's lease methods over a GatedStore: every acquire after `busy` refusals
    succeeds; `running` is what running_turn answers."""

    def __init__(self, store: GatedStore, busy: int = 0, running: str | None = None) -> None:
        self.store = store
        self.released_when_pending: list[int] = []
        self.busy = busy
        self.running = running
        self.attempts = 0

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        self.attempts += 1
        return self.attempts > self.busy

    async def running_turn(self, session_id: str) -> str | None:
        return self.running

    async def release_lease(self, session_id: str, owner: str) -> None:
        self.released_when_pending.append(len(self.store.gates))

    def keep_leases(self, *args: Any) -> Any:
        return lambda: None

    async def expired_turns(self) -> list[str]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class _SilentBus(LocalBus):
    def listen(self, channel: str, handler: Any) -> None:
        pass

    def unlisten(self, channel: str) -> None:
        pass


def test_a_chat_waits_for_a_lease_on_its_way_back_not_for_a_running_turn(tmp_path):
    """Several processes: a lease held while no turn runs in the store is being given up (a
    turn that just ended on another process, whose client sends the next chat here at once;
    a retry there). The chat waits for it instead of answering turn_in_progress; a lease
    held by a running turn is refused at once."""

    async def begin(leases: _Leases) -> Any:
        bus = _SilentBus()
        sessions = SessionService(leases.store, bus)
        sessions.coordination = DistributedCoordination(leases, bus, "me")  # type: ignore[arg-type]
        await sessions.coordination.start(sessions)
        live = sessions.create("assistant")
        try:
            return await sessions.begin_turn(live, None)
        finally:
            await sessions.coordination.close()

    async def main() -> None:
        store = GatedStore(tmp_path)
        await store.open()
        await store.release_all()
        releasing = _Leases(store, busy=3)
        assert (await begin(releasing)).id and releasing.attempts == 4
        running = _Leases(store, busy=3, running="t_elsewhere")
        with pytest.raises(ProtocolError) as refused:
            await begin(running)
        assert refused.value.code == ErrorCode.TURN_IN_PROGRESS and running.attempts == 1
        await store.close()

    run(main())


def test_a_lease_is_released_only_once_the_turns_writes_are_durable(tmp_path):
    """Several processes: a turn still `running` in the store with no lease is taken for a dead
    process's and repaired. So the lease is given up after the turn's last writes are durable,
    never before (a bench with 300 streams once repaired finished turns this way)."""

    async def main() -> None:
        store = GatedStore(tmp_path)
        await store.open()
        leases = _Leases(store)
        bus = _SilentBus()
        sessions = SessionService(store, bus)
        sessions.coordination = DistributedCoordination(leases, bus, "me")  # type: ignore[arg-type]
        await sessions.coordination.start(sessions)
        live = sessions.create("assistant")
        turn = await sessions.begin_turn(live, None)
        sessions.publish(live, turn.id, {"type": "done"})  # its append waits at the gate
        sessions.end_turn(live, turn)
        for _ in range(5):
            await asyncio.sleep(0)
        assert leases.released_when_pending == []  # not while the append is pending
        await store.release_all()
        for _ in range(5):
            await asyncio.sleep(0)
        assert leases.released_when_pending == [0]
        await sessions.coordination.close()
        await store.close()

    run(main())


def test_a_cancelled_load_does_not_cancel_the_others_waiting_for_it(tmp_path):
    """Two callers ask for a session not in memory; the first (which loads it) is cancelled,
    say its connection closed: the second still gets the session, not a CancelledError."""

    class SlowStore(SqliteStore):
        gate: asyncio.Event

        async def get_session(self, session_id: str) -> Any:
            await self.gate.wait()
            return await super().get_session(session_id)

    async def main() -> None:
        store = SlowStore(tmp_path)
        store.gate = asyncio.Event()
        store.gate.set()
        await store.open()
        sessions = SessionService(store, LocalBus())
        await sessions.start()
        live = sessions.create("assistant", "s_slow", LOCAL_PRINCIPAL.id)
        await sessions.durable(live)
        sessions.maybe_evict(live)
        assert sessions.live("s_slow") is None
        store.gate.clear()
        loader = asyncio.create_task(sessions.get("s_slow"))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(sessions.get("s_slow"))
        await asyncio.sleep(0)
        loader.cancel()
        await asyncio.sleep(0)
        store.gate.set()
        found = await waiter
        assert found is not None and found.id == "s_slow" and loader.cancelled()
        await store.close()

    asyncio.run(main())
