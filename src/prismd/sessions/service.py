"""The sessions service: the one place that resolves, authorises, changes and writes a session.

The WebSocket handler, REST, voice and the turn runner call its commands; none of them touches
a session's state or its stored rows directly. What it owns, per session:

- loading: a session is live (in memory) while a connection is bound to it or a turn runs, and
  dropped when neither is true; its stored rows are the durable copy. A crashed turn found on
  load is repaired first (sessions/repair.py);
- the turn lock (one turn at a time, taken without an await, so atomically) and the
  clientMessageIds of its turns (idempotent send);
- the event log: `publish` numbers events (`seq`), logs them, and delivers them to the session's
  subscribers only once the store says they are durable (write-ahead delivery: what a client
  saw survives a crash). A failed write is never delivered: the turn ends, its clients get an
  `error` (`store_unavailable`), and the session is reloaded from what is durable;
- coalescing: while a session's previous append is still being written, consecutive `chunk`
  deltas of a turn merge into one event (the same text, fewer events, frames and rows; `seq`
  still grows by one per event); at low load every piece goes out at once.

Everything here runs on the event loop: a check-and-set without an `await` between is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..protocol import (
    ChunkEvent,
    ErrorCode,
    ProtocolError,
    ServerEvent,
    check_session_id,
    dumps,
    error_frame,
)
from ..store.base import (
    LOCAL_USER_ID,
    EventRow,
    MessageRecord,
    SessionRecord,
    Store,
    UploadRecord,
    Written,
)
from .bus import EventBus, Subscriber
from .coordination import LocalCoordination, TurnAlreadyRan
from .ids import new_id, now_iso
from .repair import repair

log = logging.getLogger("prismd.sessions")
REPLAY_STEP = 500  # frames a replay queues before it waits for the client to read


class Caller(Protocol):
    """Who asks (auth.Principal)."""

    @property
    def id(self) -> str: ...

    @property
    def admin(self) -> bool: ...

    def owns(self, owner_id: str | None) -> bool: ...


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


@dataclass(eq=False, slots=True)
class _OpenChunk:
    """A `chunk` not numbered yet: more deltas of its turn may still join it."""

    turn_id: str | None
    deltas: list[str]


@dataclass(eq=False)
class LiveSession:
    record: SessionRecord
    last_seq: int
    first_seq: int
    client_turns: dict[str, str]
    history: list[MessageRecord]
    turn: Turn | None = None
    # Appends not yet durable, oldest first: (their write, their rows).
    pending: deque[tuple[Written, list[EventRow]]] = field(default_factory=deque)
    open_chunk: _OpenChunk | None = None
    last_write: Written | None = None  # the newest write of this session's rows
    gone: bool = False  # deleted, or dropped after a failed write: deliver nothing more

    @property
    def id(self) -> str:
        return self.record.id


class SessionService:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        max_events: int = 50_000,
        coordination: LocalCoordination | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.max_events = max_events
        # One process, or many (sessions/coordination.py).
        self.coordination = coordination or LocalCoordination()
        self._live: dict[str, LiveSession] = {}
        self._loading: dict[str, asyncio.Future[LiveSession | None]] = {}
        # The last write of sessions dropped from memory, until it is durable: a reload waits
        # for it (reads see only what is durable).
        self._settling: dict[str, Written] = {}
        # Called with every published event (metrics); must not raise or block.
        self.observers: list[Callable[[LiveSession, ServerEvent], None]] = []
        if hasattr(bus, "on_detached"):  # another process deleted a session
            bus.on_detached = self._deleted_elsewhere

    # ------------------------------------------------------------ loading

    def live(self, session_id: str) -> LiveSession | None:
        return self._live.get(session_id)

    def live_count(self) -> int:
        return len(self._live)

    def running_turns(self) -> list[Turn]:
        return [s.turn for s in self._live.values() if s.turn is not None]

    async def get(self, session_id: str) -> LiveSession | None:
        """The live session, loading it from the store if it exists; None if unknown."""
        live = self._live.get(session_id)
        if live is not None:
            return live
        pending = self._loading.get(session_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task is not None and task.cancelling()):
                    return await self.get(session_id)  # its loader was cancelled, not this
                raise
        fut: asyncio.Future[LiveSession | None] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = fut
        try:
            live = await self._load(session_id)
            if live is not None:
                self._live[session_id] = live
            fut.set_result(live)
            return live
        except asyncio.CancelledError:
            fut.cancel()  # the waiters load it themselves
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved for waiters that never come
            raise
        finally:
            del self._loading[session_id]

    async def _settled_read(self, session_id: str) -> None:
        """Before reading a session that is not live from the store: wait for the last write
        it had when it was dropped from memory (reads see only what is durable)."""
        settling = self._settling.get(session_id)
        if settling is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(settling)

    async def _load(self, session_id: str) -> LiveSession | None:
        await self._settled_read(session_id)
        record = await self.store.get_session(session_id)
        if record is None:
            return None
        log_state = await self.store.open_log(session_id)
        if (log_state.running_turns or log_state.streaming) and not self.coordination.distributed:
            # One process: a turn still `running` was cut off (start repaired those already;
            # this is a second line). With several, another process may be running it: the
            # reaper ends it if that process died (sessions/coordination.py).
            await repair(self.store, session_id, log_state)
        history = await self.store.load_messages(session_id, with_file_data=True)
        return LiveSession(
            record, log_state.last_seq, log_state.first_seq, log_state.client_turns, history
        )

    async def start(self) -> int:
        """At start: repair every session a crash cut off (before anyone reads it), when this
        is the only process; then start coordinating. Returns how many were repaired."""
        crashed = [] if self.coordination.distributed else await self.store.crashed_sessions()
        for session_id in crashed:
            state = await self.store.open_log(session_id)
            await repair(self.store, session_id, state)
        if crashed:
            log.info("repaired %d session(s) cut off by a crash", len(crashed))
        await self.coordination.start(self)
        return len(crashed)

    async def shutdown(self) -> None:
        """At exit: what was written is delivered (the last events of a turn that finished
        while the process drained reach the session's connections on other processes)."""
        writes = [live.last_write for live in self._live.values() if live.last_write is not None]
        writes += self._settling.values()  # sessions dropped from memory, writes pending
        if writes:
            await asyncio.wait([asyncio.shield(w) for w in writes], timeout=5)
        await asyncio.sleep(0)  # the deliveries scheduled by those writes
        await self.coordination.close()

    async def take_over(self, session_id: str) -> None:
        """The process running this session's turn died (its lease expired and this process
        holds it now): end the turn in the log and tell the session's connections."""
        state = await self.store.open_log(session_id)
        if not state.running_turns:
            return
        rows = await repair(self.store, session_id, state)
        live = self._live.get(session_id)
        if live is not None:
            live.last_seq = max(live.last_seq, state.last_seq)
        for seq, _turn_id, frame in rows:
            self.bus.publish(session_id, seq, frame)
        log.warning("session %s: its process died mid-turn; the turn was ended", session_id)

    async def reload(self, live: LiveSession) -> None:
        """Read a session's state afresh from the store (another process may have run turns
        in it since it was loaded here)."""
        await self.durable(live)
        state = await self.store.open_log(live.id)
        record = await self.store.get_session(live.id)
        if record is not None:
            live.record = record
        # Turns elsewhere move the seq; a retry or a deleted message elsewhere writes no event
        # but changes the count.
        if state.last_seq != live.last_seq or state.messages != len(live.history):
            live.history = await self.store.load_messages(live.id, with_file_data=True)
        live.last_seq, live.first_seq = state.last_seq, state.first_seq
        live.client_turns = state.client_turns

    def create(
        self, agent_id: str, session_id: str | None = None, owner_id: str = LOCAL_USER_ID
    ) -> LiveSession:
        """A new session, live at once; its row is written in the background."""
        record = SessionRecord(
            id=session_id or new_id("sess"),
            agent_id=agent_id,
            started_at=now_iso(),
            owner_id=owner_id,
        )
        live = LiveSession(record, last_seq=0, first_seq=1, client_turns={}, history=[])
        self._track(live, self.store.create_session(record))
        self._live[record.id] = live
        return live

    async def _created_here(self, live: LiveSession) -> LiveSession:
        """Another process may have created a session of the same (client-chosen) id at the
        same time: the stored row decides whose it is."""
        await self.durable(live)
        stored = await self.store.get_session(live.id)
        if stored is None or stored.owner_id == live.record.owner_id:
            return live
        if self._live.get(live.id) is live:
            del self._live[live.id]
        again = await self.get(live.id)
        return again if again is not None else live

    def maybe_evict(self, live: LiveSession) -> None:
        if live.turn is None and self.bus.subscribers(live.id) == 0:
            if self._live.get(live.id) is live:
                del self._live[live.id]
                self._settle(live)

    def _settle(self, live: LiveSession) -> None:
        last = live.last_write
        if last is not None and not last.done():
            self._settling[live.id] = last
            last.add_done_callback(lambda _f: self._settled(live.id, last))

    def _settled(self, session_id: str, write: Written) -> None:
        if self._settling.get(session_id) is write:
            del self._settling[session_id]

    def _track(self, live: LiveSession, write: Written) -> Written:
        live.last_write = write
        return write

    # ------------------------------------------------------------ who may do what

    async def for_chat(
        self, caller: Caller, session_id: str | None, bound: LiveSession | None, agent_id: str
    ) -> LiveSession:
        """The session a `chat` runs in: the named one (created if unknown, made active
        again if closed or archived), else the bound one, else a new one. Another user's
        session is answered exactly like an unknown id and is not taken over."""
        if session_id is None:
            return bound if bound is not None else self.create(agent_id, owner_id=caller.id)
        sid = check_session_id(session_id)
        if bound is not None and bound.id == sid:
            live = bound
        else:
            found = await self.get(sid)
            # `get` awaited: a racing caller may have created it meanwhile. From here on
            # there is no await, so the check and the creation are atomic (in this process).
            existing = found or self._live.get(sid)
            if existing is None:
                live = self.create(agent_id, sid, caller.id)
                if self.coordination.distributed:
                    live = await self._created_here(live)
            else:
                live = existing
            if not caller.owns(live.record.owner_id):
                self.maybe_evict(live)
                raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, f'Session "{sid}" not found')
        self.activate(live)
        return live

    async def for_resume(
        self, caller: Caller, session_id: str, last_seq: int | None
    ) -> LiveSession:
        """The session a `resume` binds to; `resume_gap` when `last_seq` is outside the
        held log."""
        sid = check_session_id(session_id)
        live = await self.get(sid)
        if live is not None and not caller.owns(live.record.owner_id):
            self.maybe_evict(live)
            live = None
        if live is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, f'Session "{sid}" not found')
        await self.coordination.refresh(live)
        if last_seq is not None and (last_seq < live.first_seq - 1 or last_seq > live.last_seq):
            self.maybe_evict(live)
            raise ProtocolError(
                ErrorCode.RESUME_GAP,
                f"Cannot replay after seq {last_seq}: the server holds seq {live.first_seq} to "
                f"{live.last_seq}; reload the history over REST",
                {"field": "lastSeq", "reason": "outside the held event log"},
            )
        return live

    async def find(self, caller: Caller, session_id: str) -> SessionRecord | None:
        """The caller's session (the live copy if loaded), without loading it; None when it
        does not exist or is another user's."""
        check_session_id(session_id)
        live = self._live.get(session_id)
        if live is None:
            await self._settled_read(session_id)
        record = live.record if live is not None else await self.store.get_session(session_id)
        if record is None or not caller.owns(record.owner_id):
            return None
        return record

    @contextlib.asynccontextmanager
    async def loaded(self, caller: Caller, session_id: str) -> AsyncIterator[LiveSession | None]:
        """The caller's session, loaded for the block (dropped after it if nobody holds it)."""
        live = None
        if await self.find(caller, session_id) is not None:
            live = await self.get(session_id)
        try:
            yield live
        finally:
            if live is not None:
                self.maybe_evict(live)

    async def position(self, record: SessionRecord) -> dict[str, Any]:
        """lastSeq, firstSeq and turnRunning of a session, live or stored."""
        live = self._live.get(record.id)
        if live is not None:
            return {
                "lastSeq": live.last_seq,
                "firstSeq": live.first_seq,
                "turnRunning": live.turn is not None,
            }
        await self._settled_read(record.id)
        state = await self.store.open_log(record.id)
        return {"lastSeq": state.last_seq, "firstSeq": state.first_seq, "turnRunning": False}

    # ------------------------------------------------------------ changes

    def activate(self, live: LiveSession) -> None:
        """Resuming a closed or archived session makes it active again."""
        if live.record.status != "active":
            live.record.status = "active"
            live.record.closed_at = None
            self._track(live, self.store.update_session(live.id, status="active", closed_at=None))

    async def set_status(self, live: LiveSession, status: str) -> None:
        """active, closed (a chat or resume opens it again) or archived (hidden from
        listings); returns once durable."""
        if status == "active":
            self.activate(live)
        else:
            self.close(live, status)
        await self.durable(live)

    async def rename(self, live: LiveSession, name: str) -> None:
        live.record.name = name.strip()
        self._track(live, self.store.update_session(live.id, name=live.record.name))
        await self.durable(live)

    def set_agent(self, live: LiveSession, agent_id: str) -> None:
        if live.record.agent_id != agent_id:
            live.record.agent_id = agent_id
            self._track(live, self.store.update_session(live.id, agent_id=agent_id))

    def close(self, live: LiveSession, status: str = "closed") -> None:
        live.record.status = status
        closed_at = live.record.closed_at = now_iso()
        self._track(live, self.store.update_session(live.id, status=status, closed_at=closed_at))

    async def durable(self, live: LiveSession) -> None:
        """Wait until every write of the session so far is durable."""
        if live.last_write is not None:
            # Shielded: a waiter that is cancelled must not cancel the write (the service
            # would take a cancelled write for a failed one).
            await asyncio.shield(live.last_write)

    async def delete(self, session_id: str) -> bool:
        live = self._live.pop(session_id, None)
        if live is not None:
            live.gone = True
            if live.turn is not None and live.turn.task is not None:
                live.turn.task.cancel()
                with contextlib.suppress(BaseException):
                    await live.turn.task
            with contextlib.suppress(Exception):
                await self.durable(live)
        # Ids can be chosen by clients, so one may be reused by a new session (another user's,
        # even): nothing of the deleted one may reach it, neither its bound connections nor
        # its frames still waiting for the store.
        self.bus.detach_all(session_id)
        return await self.store.delete_session(session_id)

    def _deleted_elsewhere(self, session_id: str, reason: str) -> None:
        """Another process deleted the session: drop it here too, and end a turn of it."""
        live = self._live.pop(session_id, None)
        if live is not None:
            live.gone = True
            if live.turn is not None and live.turn.task is not None:
                live.turn.task.cancel()

    def _check_idle(self, live: LiveSession) -> None:
        if live.turn is not None:
            raise ProtocolError(
                ErrorCode.TURN_IN_PROGRESS, "A turn is in progress in this session: stop it first"
            )

    @contextlib.asynccontextmanager
    async def _editing(self, live: LiveSession) -> AsyncIterator[None]:
        """A change to the history (retry, a deleted message): no turn runs meanwhile, here
        (the turn lock is held for it) or on another process (the session's lease is, and
        the history is read afresh first: another process may have changed it)."""
        self._check_idle(live)
        edit = Turn(id=new_id("edit"), client_message_id=None)
        live.turn = edit
        try:
            await self.coordination.claim(live)
            yield
        finally:
            if live.turn is edit:
                live.turn = None
                self.coordination.released(live)

    async def drop_last_exchange(self, live: LiveSession) -> MessageRecord | None:
        """Retry: drop the last user message and everything after it (the model no longer
        sees them; their clientMessageIds are released so a resend runs anew). Returns the
        dropped user message, None when there is none."""
        async with self._editing(live):
            history = live.history
            last_user = next(
                (i for i in range(len(history) - 1, -1, -1) if history[i].role == "user"), None
            )
            if last_user is None:
                return None
            dropped = history[last_user:]
            del history[last_user:]
            turns = {m.turn_id for m in dropped if m.turn_id}
            for client_id in [k for k, v in live.client_turns.items() if v in turns]:
                del live.client_turns[client_id]
            self._track(
                live, self.store.delete_messages(live.id, [m.id for m in dropped], sorted(turns))
            )
            await self.durable(live)
        return dropped[0]

    async def delete_message(self, live: LiveSession, message_id: str) -> bool:
        async with self._editing(live):
            index = next((i for i, m in enumerate(live.history) if m.id == message_id), None)
            if index is None:
                return False
            del live.history[index]
            self._track(live, self.store.delete_messages(live.id, [message_id]))
            await self.durable(live)
        return True

    async def reupload(self, caller: Caller, message: MessageRecord) -> list[dict[str, Any]]:
        """A dropped message's files, stored again as the caller's uploads (to resend)."""
        files = []
        for f in message.files:
            upload = UploadRecord(
                new_id("upl"), caller.id, f.filename, f.mime_type, f.size, now_iso(), f.data
            )
            await self.store.save_upload(upload)
            files.append(upload.meta())
        return files

    async def messages(self, session_id: str) -> list[MessageRecord]:
        """The stored messages (the live history if loaded: it is what the model sees)."""
        live = self._live.get(session_id)
        if live is not None:
            await self.durable(live)
        else:
            await self._settled_read(session_id)
        return await self.store.load_messages(session_id)

    # ------------------------------------------------------------ turns

    async def begin_turn(self, live: LiveSession, client_message_id: str | None) -> Turn:
        """Take the session's turn lock: here atomically (no await before it is set), then
        across processes (the lease). Raises turn_in_progress, or TurnAlreadyRan when the
        clientMessageId ran before (possibly on another process)."""
        if live.turn is not None:
            raise ProtocolError(
                ErrorCode.TURN_IN_PROGRESS, "A turn is already in progress — wait for it to finish"
            )
        turn = Turn(id=new_id("turn"), client_message_id=client_message_id)
        live.turn = turn
        try:
            await self.coordination.claim(live)
            ran = self.turn_for(live, client_message_id)
            if ran is not None:
                raise TurnAlreadyRan(ran)
        except BaseException:
            if live.turn is turn:
                live.turn = None
                self.coordination.released(live)
            self.maybe_evict(live)
            raise
        if client_message_id:
            live.client_turns[client_message_id] = turn.id
        self.seal(live)
        self._track(
            live,
            self.store.save_turn(
                live.id,
                turn.id,
                client_message_id=client_message_id,
                status="running",
                started_at=now_iso(),
                start_seq=live.last_seq + 1,
            ),
        )
        return turn

    def end_turn(self, live: LiveSession, turn: Turn) -> None:
        if live.turn is turn:
            live.turn = None
            self.coordination.released(live)
        self.seal(live)
        if live.last_seq - live.first_seq + 1 > self.max_events:
            live.first_seq = live.last_seq - self.max_events + 1
            self._track(live, self.store.prune_events(live.id, live.first_seq))
        self.maybe_evict(live)

    async def ran_before(
        self, caller: Caller, session_id: str | None, client_message_id: str | None
    ) -> tuple[LiveSession, str] | None:
        """A resend: the caller's session and the turn that `client_message_id` already ran
        as in it, if any (checked before a chat is charged or anything is stored)."""
        if not session_id or not client_message_id:
            return None
        live = await self.get(check_session_id(session_id))
        if live is None or not caller.owns(live.record.owner_id):
            return None
        turn_id = self.turn_for(live, client_message_id)
        return (live, turn_id) if turn_id is not None else None

    def turn_for(self, live: LiveSession, client_message_id: str | None) -> str | None:
        """The turn a clientMessageId already ran as (idempotent send), if any."""
        return live.client_turns.get(client_message_id) if client_message_id else None

    def stop(self, live: LiveSession, keep_spoken: bool = False) -> bool:
        """Stop the running turn; `keep_spoken`: a barge-in, whose stored answer is the part
        that was spoken. False when nothing was running."""
        turn = live.turn
        if turn is None or turn.stop_requested or turn.task is None:
            return False
        turn.stop_requested = True
        turn.keep_spoken = keep_spoken
        self.publish(live, turn.id, {"type": "stopped"})
        if turn.consumer is not None:
            turn.consumer.cancel()
        return True

    def stop_all_of(self, owner_id: str) -> int:
        """Stop the running turns of one user's sessions (the user was removed)."""
        mine = [live for live in self._live.values() if live.record.owner_id == owner_id]
        return sum(self.stop(live) for live in mine)

    async def request_stop(self, live: LiveSession, keep_spoken: bool = False) -> bool:
        """`stop` from any connection: here, or sent to the process running the turn."""
        if self.stop(live, keep_spoken):
            return True
        if live.turn is None and self.coordination.distributed:
            command = {"type": "stop", "keepSpoken": keep_spoken}
            return await self.coordination.command(live.id, command)
        return False

    async def request_approval(self, live: LiveSession, request_id: str, approved: bool) -> bool:
        """An approval answer from any connection: here, or sent to the turn's process."""
        if self.answer_approval(live, request_id, approved):
            return True
        if live.turn is None and self.coordination.distributed:
            command = {"type": "approval", "requestId": request_id, "approved": approved}
            return await self.coordination.command(live.id, command)
        return False

    async def connected(self, live: LiveSession) -> bool:
        """Is a connection bound to the session, on any process (someone to ask)?"""
        return await self.coordination.connected(live)

    async def running_turn(self, live: LiveSession) -> str | None:
        """The id of the turn running in the session, on any process."""
        return await self.coordination.running_turn(live)

    def abandon(self, live: LiveSession) -> None:
        """This process lost the session's lease mid-turn (cut off from the store for longer
        than the lease): it must write and deliver nothing more of it."""
        self._forget(live)
        self.bus.detach_all(live.id, "store_failed", everywhere=False)

    def _forget(self, live: LiveSession) -> None:
        """Write and deliver nothing more of this copy of the session, end its turn, and load
        it again from the store the next time it is used."""
        live.gone = True
        live.pending.clear()
        live.open_chunk = None
        if self._live.get(live.id) is live:
            del self._live[live.id]
        if live.turn is not None and live.turn.task is not None:
            live.turn.task.cancel()

    def answer_approval(self, live: LiveSession, request_id: str, approved: bool) -> bool:
        turn = live.turn
        waiter = turn.approvals.get(request_id) if turn is not None else None
        if turn is None or waiter is None or waiter.done():
            return False
        waiter.set_result(approved)
        self.publish(
            live,
            turn.id,
            {"type": "approval_resolved", "requestId": request_id, "approved": approved},
        )
        return True

    # The turn runner's writes: through here, so that the session knows its last write.

    def add_message(self, live: LiveSession, message: MessageRecord) -> None:
        self._track(live, self.store.add_message(live.id, message))

    def update_message(self, live: LiveSession, message_id: str, **fields: Any) -> None:
        self._track(live, self.store.update_message(live.id, message_id, **fields))

    def save_turn(self, live: LiveSession, turn_id: str, **fields: Any) -> None:
        self._track(live, self.store.save_turn(live.id, turn_id, **fields))

    def add_turn_totals(
        self, live: LiveSession, tokens_in: int, tokens_out: int, cost: float | None, at: str
    ) -> None:
        record = live.record
        record.turn_count += 1
        record.last_turn_at = at
        record.tokens_in += tokens_in
        record.tokens_out += tokens_out
        if cost is not None:
            record.cost_usd = (record.cost_usd or 0.0) + cost
        self._track(live, self.store.add_turn_totals(live.id, tokens_in, tokens_out, cost, at))

    # ------------------------------------------------------------ events

    def publish(self, live: LiveSession, turn_id: str | None, event: ServerEvent) -> None:
        """Number, log and (once durable) fan out one session event."""
        if live.gone:
            return
        open_chunk = live.open_chunk
        if event["type"] == "chunk":
            if open_chunk is not None:
                if open_chunk.turn_id == turn_id:
                    open_chunk.deltas.append(event["delta"])
                    return
                self.seal(live)
            if live.pending:
                # The previous append is still being written: hold this one open, so that
                # the deltas that follow meanwhile join it.
                live.open_chunk = _OpenChunk(turn_id, [event["delta"]])
                return
            self._append(live, [(turn_id, event)])
        elif open_chunk is not None:
            live.open_chunk = None
            chunk: ChunkEvent = {"type": "chunk", "delta": "".join(open_chunk.deltas)}
            self._append(live, [(open_chunk.turn_id, chunk), (turn_id, event)])
        else:
            self._append(live, [(turn_id, event)])

    def seal(self, live: LiveSession) -> int:
        """Number the open chunk, if any; returns the session's last seq."""
        open_chunk = live.open_chunk
        if open_chunk is not None:
            live.open_chunk = None
            sealed: ChunkEvent = {"type": "chunk", "delta": "".join(open_chunk.deltas)}
            self._append(live, [(open_chunk.turn_id, sealed)])
        return live.last_seq

    def _append(self, live: LiveSession, events: list[tuple[str | None, ServerEvent]]) -> None:
        rows: list[EventRow] = []
        sid = live.id
        for turn_id, event in events:
            live.last_seq += 1
            seq = live.last_seq
            event["sessionId"] = sid
            if turn_id is not None:
                event["turnId"] = turn_id
            event["seq"] = seq
            rows.append((seq, turn_id, dumps(event)))
            for observe in self.observers:
                observe(live, event)
        write = self._track(live, self.store.append_events(sid, rows))
        live.pending.append((write, rows))
        write.add_done_callback(lambda _w: self._written(live))

    def _written(self, live: LiveSession) -> None:
        """Deliver the frames whose appends are durable, in order (a store resolves its writes
        in the order they were queued)."""
        pending = live.pending
        while pending and pending[0][0].done():
            write, rows = pending.popleft()
            if live.gone:
                continue
            if write.cancelled() or write.exception() is not None:
                self._write_failed(live)
                return
            publish = self.bus.publish
            for seq, _turn_id, frame in rows:
                publish(live.id, seq, frame)
        if not pending and live.open_chunk is not None and not live.gone:
            self.seal(live)

    def _write_failed(self, live: LiveSession) -> None:
        """An append failed: nothing more of it, or after it, may reach a client (it would
        show events a crash takes back). The turn ends, its clients are told, and the session
        is reloaded from what is durable the next time it is used."""
        log.error("session %s: an event could not be logged; ending its turn", live.id)
        self._forget(live)
        frame = error_frame(
            ErrorCode.STORE_UNAVAILABLE,
            "The session could not be saved (the store failed); the turn was ended. "
            "Resume the session to continue from what was saved.",
            sessionId=live.id,
        )
        self.bus.publish(live.id, 0, dumps(frame))
        self.bus.detach_all(live.id, "store_failed", everywhere=False)

    # ------------------------------------------------------------ subscribers and replay

    def subscribe(self, live: LiveSession, target: Subscriber) -> None:
        self.bus.subscribe(live.id, target)

    def unsubscribe(self, live: LiveSession, target: Subscriber) -> None:
        self.bus.unsubscribe(live.id, target)
        self.maybe_evict(live)

    def relay(self, live: LiveSession, frame: ServerEvent, exclude: Subscriber) -> None:
        """A frame for the session's other connections that is not a logged event
        (`voice_state`)."""
        self.bus.publish(live.id, 0, dumps(frame), exclude=exclude)

    async def replay(
        self, live: LiveSession, target: ReplayTarget, after_seq: int, turn_id: str | None = None
    ) -> int:
        """Send the logged events after `after_seq` (of one turn, if given), then go live with
        no gap and no duplicate. The target must already be subscribed: an event durable
        before the read is in it, one durable after is held and released after it."""
        await self.coordination.ready(live)
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
        self.bus.position(live.id, sent)
        return sent
