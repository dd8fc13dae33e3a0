"""Who runs a session's turn, and how commands reach it: in one process, or across many.

One process (the embedded default): the turn lock is the live session's `turn`, and `stop` and
approvals are calls. Many processes (PostgreSQL + Redis): a session's turn runs in exactly one
process at a time, the holder of the session's lease in PostgreSQL. The lease is taken when a
turn starts (a `chat` on any other process gets `turn_in_progress`; two chats at once on two
processes start exactly one turn), renewed while the turn runs, and released when it ends. The
holder is the only process that numbers and logs the session's events, so there is one `seq`
per session. `stop` and approval answers that arrive at another process travel to the holder
over Redis (`prismd:c:<session id>`, which only the holder listens to). When a process dies
mid-turn its lease expires (LEASE_S); the other processes notice within REAP_S, one of them
takes the lease, ends the turn in the log as interrupted (sessions/repair.py) and publishes that
to the session's connections wherever they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from ..protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from ..store.base import Store
    from .redis_bus import RedisBus
    from .service import LiveSession, SessionService

log = logging.getLogger("prismd.coordination")

LEASE_S = 6.0  # a dead process's turn is taken over this long after its last renewal
RENEW_S = 1.5  # by a thread of its own (PostgresStore.keep_leases): a busy loop does not delay it
REAP_S = 1.0
RELEASING_S = 1.0  # how long a chat waits for a lease that another process is giving up
RELEASE_POLL_S = 0.02
COMMANDS = "prismd:c:"


class TurnAlreadyRan(Exception):
    """A `chat` whose clientMessageId already ran as `turn_id` (found once the lease was
    taken and the session's state read afresh): replay it instead."""

    def __init__(self, turn_id: str) -> None:
        super().__init__(turn_id)
        self.turn_id = turn_id


class LocalCoordination:
    """One process: nothing to coordinate."""

    distributed = False

    async def start(self, service: SessionService) -> None:
        self.service = service

    async def close(self) -> None:
        pass

    async def claim(self, live: LiveSession) -> None:
        """Called with the local turn lock taken; raises if another process runs a turn."""

    def released(self, live: LiveSession) -> None:
        """The turn ended here."""

    async def command(self, session_id: str, command: dict[str, Any]) -> bool:
        """Send `stop` or an approval answer to the process running the session's turn; False
        when no process runs one."""
        return False

    async def connected(self, live: LiveSession) -> bool:
        """Is any connection, on any process, bound to the session?"""
        return self.service.bus.subscribers(live.id) > 0

    async def running_turn(self, live: LiveSession) -> str | None:
        return live.turn.id if live.turn is not None else None

    async def ready(self, live: LiveSession) -> None:
        """Before a replay reads the log: every event logged after it reaches this process."""

    async def refresh(self, live: LiveSession) -> None:
        """Before a resume is judged: the session's log position as stored."""


class DistributedCoordination(LocalCoordination):
    """Many processes on one PostgreSQL (leases, the log) and one Redis (the bus, commands)."""

    distributed = True

    def __init__(self, store: Store, bus: RedisBus, origin: str) -> None:
        self.store: Any = store  # a PostgresStore: its lease methods are not in Store
        self.bus = bus
        self.origin = origin
        self._held: dict[str, LiveSession] = {}
        # The ids, as one immutable object: read by the lease keeper's thread.
        self._held_ids: frozenset[str] = frozenset()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_keeper: Any = None
        self._releasing: dict[str, asyncio.Task[None]] = {}

    async def start(self, service: SessionService) -> None:
        await super().start(service)
        self._stop_keeper = self.store.keep_leases(
            self.origin, lambda: self._held_ids, self._lost, LEASE_S, RENEW_S
        )
        self._tasks = [asyncio.create_task(self._reap(), name="lease reaper")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stop_keeper is not None:
            await asyncio.to_thread(self._stop_keeper)
        for session_id in list(self._held):
            with contextlib.suppress(Exception):
                await self.store.release_lease(session_id, self.origin)
        self._held.clear()

    async def claim(self, live: LiveSession) -> None:
        releasing = self._releasing.get(live.id)
        if releasing is not None:  # this process's previous turn is still giving it up
            with contextlib.suppress(Exception):
                await asyncio.shield(releasing)
        try:
            # The lease lives on the session's row: a new session's row must be written first.
            await self.service.durable(live)
            taken = await self._acquire(live.id)
        except Exception as exc:  # noqa: BLE001 - the store is down: a coded refusal
            raise _unavailable(exc) from None
        if not taken:
            raise ProtocolError(
                ErrorCode.TURN_IN_PROGRESS, "A turn is already in progress — wait for it to finish"
            )
        self._held[live.id] = live
        self._held_ids = frozenset(self._held)

        def on_command(data: bytes) -> None:
            self._on_command(live, data)

        self.bus.listen(COMMANDS + live.id, on_command)
        try:
            # Other processes may have run turns since this one last looked: read afresh.
            await self.service.reload(live)
        except BaseException:
            self.released(live)
            raise

    async def _acquire(self, session_id: str) -> bool:
        """Take the session's lease. Held while no turn runs in the store, it is on its way
        back: a turn that just ended elsewhere (its client may already send the next chat
        here) or a history edit (a retry) gives it up once its writes are durable. Then wait
        for it, up to RELEASING_S; a running turn is refused at once."""
        deadline = asyncio.get_running_loop().time() + RELEASING_S
        while not await self.store.acquire_lease(session_id, self.origin, LEASE_S):
            if (
                asyncio.get_running_loop().time() >= deadline
                or await self.store.running_turn(session_id) is not None
            ):
                return False
            await asyncio.sleep(RELEASE_POLL_S)
        return True

    def released(self, live: LiveSession) -> None:
        if self._held.pop(live.id, None) is None:
            return
        self._held_ids = frozenset(self._held)
        self.bus.unlisten(COMMANDS + live.id)
        task = asyncio.ensure_future(self._release(live))
        self._releasing[live.id] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _release(self, live: LiveSession) -> None:
        """Give the lease up once the turn's last writes are durable: a turn still `running`
        in the store without a lease is taken for a dead process's, and repaired."""
        try:
            with contextlib.suppress(Exception):
                await self.service.durable(live)
            await self.store.release_lease(live.id, self.origin)
        finally:
            if self._releasing.get(live.id) is asyncio.current_task():
                del self._releasing[live.id]

    async def command(self, session_id: str, command: dict[str, Any]) -> bool:
        try:
            payload = json.dumps(command).encode()
            return await self.bus.publish_raw(COMMANDS + session_id, payload) > 0
        except Exception as exc:  # noqa: BLE001 - Redis is down
            raise ProtocolError(
                ErrorCode.BUS_UNAVAILABLE,
                f"The command could not reach the process running the turn: {exc}",
            ) from None

    def _on_command(self, live: LiveSession, data: bytes) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            return
        if command.get("type") == "stop":
            self.service.stop(live, keep_spoken=bool(command.get("keepSpoken")))
        elif command.get("type") == "approval":
            self.service.answer_approval(live, str(command["requestId"]), bool(command["approved"]))

    async def connected(self, live: LiveSession) -> bool:
        if self.service.bus.subscribers(live.id) > 0:
            return True
        try:
            return await self.bus.listeners(live.id) > 0
        except Exception:  # noqa: BLE001 - Redis is down: nobody can be asked
            return False

    async def running_turn(self, live: LiveSession) -> str | None:
        if live.turn is not None:
            return live.turn.id
        running: str | None = await self.store.running_turn(live.id)
        return running

    async def ready(self, live: LiveSession) -> None:
        await self.bus.ready(live.id)

    async def refresh(self, live: LiveSession) -> None:
        if live.turn is None:
            state = await self.store.open_log(live.id)
            live.last_seq = max(live.last_seq, state.last_seq)
            live.first_seq = state.first_seq

    def _lost(self, session_ids: list[str]) -> None:
        """Leases the keeper could not renew (this process was cut off from PostgreSQL for
        longer than LEASE_S, and another process may have taken over): their turns stop
        here."""
        for session_id in session_ids:
            live = self._held.get(session_id)
            if live is not None:
                log.error("session %s: lease lost; ending its turn here", session_id)
                self.service.abandon(live)

    async def _reap(self) -> None:
        """End the turns of processes that died (their leases expired)."""
        while True:
            await asyncio.sleep(REAP_S)
            try:
                expired = await self.store.expired_turns()
            except Exception as exc:  # noqa: BLE001 - PostgreSQL is down; later
                log.debug("reaper: %s", exc)
                continue
            for session_id in expired:
                try:
                    if await self.store.acquire_lease(session_id, self.origin, LEASE_S):
                        try:
                            await self.service.take_over(session_id)
                        finally:
                            await self.store.release_lease(session_id, self.origin)
                except Exception:  # noqa: BLE001 - another process may do it; try later
                    log.exception("reaper: session %s", session_id)


def _unavailable(exc: BaseException) -> ProtocolError:
    return ProtocolError(ErrorCode.STORE_UNAVAILABLE, f"The session store cannot be reached: {exc}")
