"""The event bus across processes: local fan-out, plus Redis pub/sub between prismd processes.

Every process keeps its own connections. The process running a session's turn (the holder of
its lease, see coordination.py) logs each event, and once it is durable delivers it to its own
connections and PUBLISHes it on the session's channel, `prismd:s:<session id>`. Every other
process with a connection bound to that session is SUBSCRIBEd to the channel and delivers what
arrives to its connections.

Redis pub/sub is at-most-once: a message sent while a subscriber's connection is down is lost.
Nothing is lost to clients all the same, because every event was durable in the store before it
was published: each process keeps, per session, the last seq it delivered; a frame further ahead
than the next one (a gap), and every reconnection to Redis, makes it read the missing events
from the store and deliver them first, in order. Duplicates (a frame at or before that seq) are
dropped. So a client sees every event once, in order, whichever process it is connected to.

A message on a channel is `<origin>\n<seq>\n<frame>`: the origin process is skipped by itself;
seq 0 is a frame that is not a logged event (`voice_state`); seq -1 tells every process to
detach the session's connections (the frame is the reason: the session was deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .bus import LocalBus, Subscriber

log = logging.getLogger("prismd.bus")

EVENTS = "prismd:s:"
RECONNECT_S = (0.05, 0.2, 0.5, 1.0, 2.0)

# Reads the logged events of a session after a seq: the store's read_events.
ReadEvents = Callable[[str, int], Awaitable[list[tuple[int, str]]]]


class RedisBus(LocalBus):
    def __init__(self, url: str, origin: str, read_events: ReadEvents) -> None:
        super().__init__()
        import redis.asyncio as redis  # only a multi-process deployment needs it

        self._redis_mod = redis
        self.url = url
        self.origin = origin
        self._read_events = read_events
        self.redis: Any = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10
        )
        self._pubsub: Any = None
        self._channels: set[str] = set()  # sessions subscribed on Redis
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._delivered: dict[str, int] = {}  # session id -> last seq delivered here
        self._filling: dict[str, list[tuple[int, str]]] = {}  # frames held during a gap fill
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._publishing = False  # a batch is being sent
        self._flushed = asyncio.Event()  # nothing queued nor being sent
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        # Handlers of other channels this process listens to (the coordinator's commands).
        self.handlers: dict[str, Callable[[bytes], None]] = {}
        self.published = 0  # PUBLISH commands sent (reported by the bench)
        # Called when another process detached a session (deleted it): (session id, reason).
        self.on_detached: Callable[[str, str], None] | None = None

    async def start(self) -> None:
        await self.redis.ping()  # fail at start-up, with a clear error, if Redis is not there
        self._tasks = [
            asyncio.create_task(self._reader(), name="redis-bus reader"),
            asyncio.create_task(self._publisher(), name="redis-bus publisher"),
        ]

    async def close(self) -> None:
        # What is queued is published first (a turn's last events), for a bounded time.
        if self._outbox or self._publishing:
            self._flushed.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 3)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # ------------------------------------------------------------ the EventBus interface

    def subscribe(self, session_id: str, subscriber: Subscriber) -> None:
        first = self.subscribers(session_id) == 0
        super().subscribe(session_id, subscriber)
        if first:
            self._listen(EVENTS + session_id)

    def unsubscribe(self, session_id: str, subscriber: Subscriber) -> None:
        super().unsubscribe(session_id, subscriber)
        if self.subscribers(session_id) == 0:
            self._delivered.pop(session_id, None)
            self._filling.pop(session_id, None)
            self._unlisten(EVENTS + session_id)

    def publish(
        self, session_id: str, seq: int, frame: str, exclude: Subscriber | None = None
    ) -> None:
        if seq > 0:
            if seq <= self._delivered.get(session_id, 0):
                return
            # Kept only while this process has connections to the session (unsubscribe
            # forgets it): a session nobody here watches leaves nothing behind.
            if self.subscribers(session_id):
                self._delivered[session_id] = seq
        super().publish(session_id, seq, frame, exclude)
        self._send(EVENTS + session_id, seq, frame)

    def detach_all(self, session_id: str, reason: str = "deleted", everywhere: bool = True) -> None:
        self._delivered.pop(session_id, None)
        super().detach_all(session_id, reason)
        self._unlisten(EVENTS + session_id)
        if everywhere:
            self._send(EVENTS + session_id, -1, reason)

    def position(self, session_id: str, seq: int) -> None:
        """This process's connections to the session have everything up to `seq` (a replay
        or a load said so): later frames continue from there."""
        if seq > self._delivered.get(session_id, 0):
            self._delivered[session_id] = seq

    async def ready(self, session_id: str) -> None:
        """Wait until Redis confirmed the subscription to the session's channel: from then on
        every event published reaches this process (a replay reads the store after this)."""
        channel = EVENTS + session_id
        waiter = self._confirmed.get(channel)
        if waiter is not None:
            await asyncio.wait_for(asyncio.shield(waiter), 5)

    async def publish_raw(self, channel: str, payload: bytes) -> int:
        """PUBLISH now (a command to another process); the number of processes listening."""
        return int(await self.redis.publish(channel, payload))

    def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        self.handlers[channel] = handler
        self._listen(channel)

    def unlisten(self, channel: str) -> None:
        self.handlers.pop(channel, None)
        self._unlisten(channel)

    async def listeners(self, session_id: str) -> int:
        """How many processes have a connection bound to the session (this one included)."""
        counts = await self.redis.pubsub_numsub(EVENTS + session_id)
        return int(counts[0][1]) if counts else 0

    # ------------------------------------------------------------ Redis

    def _listen(self, channel: str) -> None:
        if channel in self._channels:
            return
        self._channels.add(channel)
        self._confirmed[channel] = asyncio.get_running_loop().create_future()
        if self._pubsub is not None:
            task = asyncio.ensure_future(self._subscribe(channel))
            task.add_done_callback(_quiet)

    def _unlisten(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        waiter = self._confirmed.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()
        if self._pubsub is not None:
            task = asyncio.ensure_future(self._pubsub.unsubscribe(channel))
            task.add_done_callback(_quiet)

    async def _subscribe(self, channel: str) -> None:
        if self._pubsub is not None and channel in self._channels:
            await self._pubsub.subscribe(channel)

    def _send(self, channel: str, seq: int, frame: str) -> None:
        self._outbox.append((channel, f"{self.origin}\n{seq}\n{frame}".encode()))
        self._wake.set()

    async def _publisher(self) -> None:
        """PUBLISH what is queued, many commands per round trip (a pipeline). When Redis is
        unreachable, the last message of each channel is kept and sent again once it is back:
        a subscriber that receives it sees the gap and reads the rest from the store, so even
        the last events of a turn reach it."""
        outbox = self._outbox
        unsent: dict[tuple[str, bool], bytes] = {}  # (channel, is a detach) -> message
        attempt = 0
        while True:
            if not unsent:
                self._publishing = False
                self._flushed.set()
                await self._wake.wait()
            self._publishing = True
            self._wake.clear()
            while outbox or unsent:
                batch = [(channel, payload) for (channel, _), payload in unsent.items()]
                unsent.clear()
                batch += [outbox.popleft() for _ in range(min(len(outbox), 512))]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for channel, payload in batch:
                            pipe.publish(channel, payload)
                        await pipe.execute()
                    self.published += len(batch)
                    attempt = 0
                except Exception as exc:  # noqa: BLE001 - Redis down: send again later
                    if attempt == 0:
                        log.warning("redis: publishing failed (%s); retrying", exc)
                    for channel, payload in batch:
                        seq = payload.split(b"\n", 2)[1]
                        if seq != b"0":  # a voice_state relay is not worth keeping
                            unsent[(channel, seq == b"-1")] = payload
                    await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                    attempt += 1

    async def _reader(self) -> None:
        """Receive from Redis; reconnect with backoff and fill what was missed meanwhile."""
        attempt = 0
        while True:
            try:
                self._pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
                # A dummy channel keeps the connection in subscribed mode with no sessions.
                await self._pubsub.subscribe(f"prismd:p:{self.origin}", *self._channels)
                if attempt:
                    log.warning("redis: connected again; filling what was missed")
                    for session_id in list(self._delivered):
                        self._fill(session_id)
                attempt = 0
                self.connected.set()
                async for message in self._pubsub.listen():
                    self._on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Redis failure: reconnect
                self.connected.clear()
                delay = RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)]
                if attempt == 0:
                    log.warning("redis: connection lost (%s); reconnecting", exc)
                attempt += 1
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
                self._pubsub = None
                for channel, waiter in self._confirmed.items():
                    if waiter.done():
                        self._confirmed[channel] = asyncio.get_running_loop().create_future()
                await asyncio.sleep(delay)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        raw = message.get("channel")
        channel: str = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "subscribe":
            waiter = self._confirmed.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if kind != "message":
            return
        data: bytes = message["data"]
        handler = self.handlers.get(channel)
        if handler is not None:
            handler(data)
            return
        if not channel.startswith(EVENTS):
            return
        origin, seq_text, frame = data.decode().split("\n", 2)
        if origin == self.origin:
            return
        session_id = channel[len(EVENTS) :]
        seq = int(seq_text)
        if seq < 0:
            self._delivered.pop(session_id, None)
            super().detach_all(session_id, frame)
            self._unlisten(channel)
            if self.on_detached is not None:  # the sessions service forgets it here too
                self.on_detached(session_id, frame)
        elif seq == 0:
            super().publish(session_id, 0, frame)
        else:
            self._remote_event(session_id, seq, frame)

    def _remote_event(self, session_id: str, seq: int, frame: str) -> None:
        held = self._filling.get(session_id)
        if held is not None:
            held.append((seq, frame))
            return
        last = self._delivered.get(session_id)
        if last is not None and seq > last + 1:
            self._filling[session_id] = [(seq, frame)]
            self._fill(session_id)
            return
        self._deliver(session_id, seq, frame)

    def _deliver(self, session_id: str, seq: int, frame: str) -> None:
        if seq <= self._delivered.get(session_id, 0):
            return  # a duplicate
        self._delivered[session_id] = seq
        LocalBus.publish(self, session_id, seq, frame)

    def _fill(self, session_id: str) -> None:
        self._filling.setdefault(session_id, [])
        task = asyncio.ensure_future(self._fill_from_store(session_id))
        task.add_done_callback(_quiet)

    async def _fill_from_store(self, session_id: str) -> None:
        """Deliver the logged events after the last delivered one, then what arrived
        meanwhile."""
        try:
            while True:
                after = self._delivered.get(session_id, 0)
                for seq, frame in await self._read_events(session_id, after):
                    self._deliver(session_id, seq, frame)
                held = self._filling.get(session_id)
                if held is None:
                    return
                if not held:
                    del self._filling[session_id]
                    return
                held.sort()
                last = self._delivered.get(session_id, 0)
                if held[0][0] > last + 1:
                    held.clear()  # still a gap: read the store again
                    continue
                self._filling[session_id] = []
                for seq, frame in held:
                    self._deliver(session_id, seq, frame)
        except Exception:
            self._filling.pop(session_id, None)
            log.exception("bus: could not fill a gap in session %s", session_id)


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("redis-bus background task failed: %s", task.exception())
