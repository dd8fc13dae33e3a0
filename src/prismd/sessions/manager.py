"""Live sessions: loading, the one-turn-at-a-time lock, the seq-numbered event log, replay.

A session is loaded into memory while a connection is bound to it or a turn runs, and dropped
when neither is true; its database is the durable copy. Everything here runs on the event loop,
so a check-and-set without an `await` in between is atomic.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from ..protocol import ErrorCode, ProtocolError, dumps
from ..store.base import LOCAL_USER_ID, MessageRecord, SessionRecord, Store
from .bus import EventBus, Subscriber

REPLAY_STEP = 500  # frames a replay queues before it waits for the client to read


def new_id(prefix: str) -> str:
    """Random, collision-free ids (128 bits), never derived from the clock."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReplayTarget(Subscriber, Protocol):
    def hold(self) -> None:
        """Buffer live frames until `release` (a replay is being read)."""

    def push(self, frame: str) -> None:
        """Send a frame now, bypassing the hold buffer."""

    def release(self, after_seq: int) -> None:
        """Send the held frames with seq > after_seq and go live."""

    async def drain(self, below: int) -> None:
        """Wait until fewer than `below` frames are waiting to be sent."""


@dataclass(eq=False)
class Turn:
    id: str
    client_message_id: str | None
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    consumer: asyncio.Task[Any] | None = None  # the turn's work; `stop` cancels it
    stop_requested: bool = False
    # Stopped by the user speaking over the spoken reply: what they heard is what is kept.
    keep_spoken: bool = False
    approvals: dict[str, asyncio.Future[bool]] = field(default_factory=dict)


@dataclass(eq=False)
class LiveSession:
    record: SessionRecord
    last_seq: int
    first_seq: int
    client_turns: dict[str, str]
    history: list[MessageRecord]
    turn: Turn | None = None

    @property
    def id(self) -> str:
        return self.record.id


class SessionManager:
    def __init__(self, store: Store, bus: EventBus, max_events: int = 50_000) -> None:
        self.store = store
        self.bus = bus
        self.max_events = max_events
        self._live: dict[str, LiveSession] = {}
        self._loading: dict[str, asyncio.Future[LiveSession | None]] = {}
        # Published frames waiting for their event to be durable: session id -> (seq, frame)
        self._undelivered: dict[str, deque[tuple[int, str]]] = {}
        store.on_events_durable = self._deliver
        # Called with every published event (metrics); must not raise or block.
        self.observers: list[Callable[[LiveSession, dict[str, Any]], None]] = []

    # ------------------------------------------------------------ loading

    def live(self, session_id: str) -> LiveSession | None:
        return self._live.get(session_id)

    def running_turns(self) -> list[Turn]:
        return [s.turn for s in self._live.values() if s.turn is not None]

    async def get(self, session_id: str) -> LiveSession | None:
        """The live session, loading it from the store if it exists; None if unknown."""
        live = self._live.get(session_id)
        if live is not None:
            return live
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[LiveSession | None] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = fut
        try:
            live = await self._load(session_id)
            if live is not None:
                self._live[session_id] = live
            fut.set_result(live)
            return live
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved for waiters that never come
            raise
        finally:
            del self._loading[session_id]

    async def _load(self, session_id: str) -> LiveSession | None:
        record = await self.store.get_session(session_id)
        if record is None:
            return None
        log = await self.store.open_log(session_id)
        history = await self.store.load_messages(session_id, with_file_data=True)
        return LiveSession(record, log.last_seq, log.first_seq, log.client_turns, history)

    def create(
        self, agent_id: str, session_id: str | None = None, owner_id: str = LOCAL_USER_ID
    ) -> LiveSession:
        """A new session, live at once; its rows and database are written in the background."""
        record = SessionRecord(
            id=session_id or new_id("sess"),
            agent_id=agent_id,
            started_at=now_iso(),
            owner_id=owner_id,
        )
        self.store.create_session(record)
        live = LiveSession(record, last_seq=0, first_seq=1, client_turns={}, history=[])
        self._live[record.id] = live
        return live

    async def get_or_create(
        self, session_id: str, agent_id: str, owner_id: str = LOCAL_USER_ID
    ) -> LiveSession:
        live = await self.get(session_id)
        if live is not None:
            return live
        # `get` awaited: a racing caller may have created it meanwhile. From here on there is
        # no await, so the check and the creation are atomic.
        return self._live.get(session_id) or self.create(agent_id, session_id, owner_id)

    def activate(self, live: LiveSession) -> None:
        """Resuming a closed or archived session makes it active again."""
        if live.record.status != "active":
            live.record.status = "active"
            live.record.closed_at = None
            self.store.update_session(live.id, status="active", closed_at=None)

    def close(self, live: LiveSession) -> None:
        live.record.status = "closed"
        live.record.closed_at = now_iso()
        self.store.update_session(live.id, status="closed", closed_at=live.record.closed_at)

    def maybe_evict(self, live: LiveSession) -> None:
        if live.turn is None and self.bus.subscribers(live.id) == 0:
            if self._live.get(live.id) is live:
                del self._live[live.id]

    async def delete(self, session_id: str) -> bool:
        live = self._live.pop(session_id, None)
        if live is not None and live.turn is not None and live.turn.task is not None:
            live.turn.task.cancel()
            try:
                await live.turn.task
            except BaseException:  # noqa: BLE001 - the turn is being thrown away
                pass
        # Ids can be chosen by clients, so one may be reused by a new session (another user's,
        # even): nothing of the deleted one may reach it, neither its bound connections nor
        # its frames still waiting for the store.
        self.bus.detach_all(session_id)
        self._undelivered.pop(session_id, None)
        return await self.store.delete_session(session_id)

    # ------------------------------------------------------------ turns

    def begin_turn(self, live: LiveSession, client_message_id: str | None) -> Turn:
        """Take the session's turn lock, atomically (no await here)."""
        if live.turn is not None:
            raise ProtocolError(
                ErrorCode.TURN_IN_PROGRESS, "A turn is already in progress — wait for it to finish"
            )
        turn = Turn(id=new_id("turn"), client_message_id=client_message_id)
        live.turn = turn
        if client_message_id:
            live.client_turns[client_message_id] = turn.id
        self.store.save_turn(
            live.id,
            turn.id,
            client_message_id=client_message_id,
            status="running",
            started_at=now_iso(),
        )
        return turn

    def end_turn(self, live: LiveSession, turn: Turn) -> None:
        if live.turn is turn:
            live.turn = None
        if live.last_seq - live.first_seq + 1 > self.max_events:
            live.first_seq = live.last_seq - self.max_events + 1
            self.store.prune_events(live.id, live.first_seq)
        self.maybe_evict(live)

    # ------------------------------------------------------------ events

    def publish(self, live: LiveSession, turn_id: str | None, event: dict[str, Any]) -> int:
        """Number, log and fan out one session event. Returns its seq."""
        live.last_seq += 1
        seq = live.last_seq
        event["sessionId"] = live.id
        if turn_id is not None:
            event["turnId"] = turn_id
        event["seq"] = seq
        frame = dumps(event)
        self.store.append_event(live.id, seq, turn_id, frame)
        for observe in self.observers:
            observe(live, event)
        queue = self._undelivered.get(live.id)
        if queue is None:
            queue = self._undelivered[live.id] = deque()
        queue.append((seq, frame))
        return seq

    def _deliver(self, durable: dict[str, int]) -> None:
        """Fan out the frames whose events the store has committed (write-ahead: what a
        client has seen survives a crash, so `seq` never goes back after a restart)."""
        for session_id, upto in durable.items():
            queue = self._undelivered.get(session_id)
            while queue and queue[0][0] <= upto:
                seq, frame = queue.popleft()
                self.bus.publish(session_id, seq, frame)
            if not queue:
                self._undelivered.pop(session_id, None)

    def subscribe(self, live: LiveSession, target: Subscriber) -> None:
        self.bus.subscribe(live.id, target)

    def unsubscribe(self, live: LiveSession, target: Subscriber) -> None:
        self.bus.unsubscribe(live.id, target)
        self.maybe_evict(live)

    async def replay(
        self, live: LiveSession, target: ReplayTarget, after_seq: int, turn_id: str | None = None
    ) -> int:
        """Send the logged events after `after_seq` (of one turn, if given), then go live with
        no gap and no duplicate. The target must already be subscribed."""
        target.hold()
        sent = after_seq
        try:
            for i, (seq, frame) in enumerate(
                await self.store.read_events(live.id, after_seq, turn_id), 1
            ):
                target.push(frame)
                sent = seq
                if i % REPLAY_STEP == 0:
                    # A long replay goes at the client's pace, not all into its send queue.
                    await target.drain(REPLAY_STEP)
        finally:
            target.release(max(sent, after_seq))
        return sent
