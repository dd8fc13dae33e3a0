"""Speech work shared fairly between users, bounded per user, and cancelled with its requester.

Each engine (speech-to-text, text-to-speech, and the stream work: decoding and voice activity
detection) has one `FairExecutor`: its own worker thread, fed by one queue per key (a user).
The next job is chosen by start-time fair queueing: every job has a cost (seconds of audio for
a transcription) and the user who has been served least recently in cost goes first, so a
user who queued an hour of audio does not delay another user's 3-s clip by more than the job
that is running. A job is at most one segment of speech (at most `MAX_SEGMENT_S`), so that
wait is short.

A `Ticket` is one request (a recording, a REST transcription, a hands-free stream): its jobs
run under it, and `cancel()` drops the ones not started (a running one cannot be interrupted,
its result is dropped). `SpeechLimits` hands out tickets and holds the bounds: requests in
flight per user, seconds of audio queued per user, and bytes of recorded audio held, per
user and in total.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import Cancelled, SpeechBusy

if TYPE_CHECKING:
    from ..config import VoiceSettings

log = logging.getLogger("prismd.voice")
T = TypeVar("T")
MB = 1024 * 1024


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    key: str
    cost: float
    start: float  # virtual start tag
    seq: int
    ticket: Ticket | None = None


@dataclass
class _Key:
    queue: deque[_Job] = field(default_factory=deque)
    finish: float = 0.0  # virtual finish tag of this key's last job
    cost: float = 0.0  # cost queued or running


class FairExecutor:
    """Blocking jobs in one worker thread, fairly between keys (start-time fair queueing)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._keys: dict[str, _Key] = {}
        self._jobs: dict[asyncio.Future[Any], _Job] = {}  # the queued ones
        self._clock = 0.0  # virtual time: the start tag of the job last started
        self._seq = itertools.count()
        self._closed = False
        self.done = 0
        self.cancelled = 0
        self.running: _Job | None = None
        self._thread = threading.Thread(target=self._work, name=f"prismd-{name}", daemon=True)
        self._thread.start()

    def submit(
        self, key: str, fn: Callable[..., T], *args: Any, cost: float = 1.0
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} executor is closed")
            if self.running is None and not any(s.queue for s in self._keys.values()):
                self._idle()
            state = self._keys.setdefault(key, _Key())
            start = max(self._clock, state.finish)
            state.finish = start + max(cost, 1e-3)
            state.cost += cost
            job = _Job(fn, args, future, loop, key, cost, start, next(self._seq))
            state.queue.append(job)
            self._jobs[future] = job
            self._cond.notify()
        future.add_done_callback(lambda f: self._drop(job) if f.cancelled() else None)
        return future

    def cancel(self, future: asyncio.Future[Any]) -> None:
        """Cancel a job now: if it is queued, it leaves the queue (and its user's cost) at
        once; if it runs, its result is dropped."""
        job = self._jobs.get(future)
        if job is not None:
            self._drop(job)
        future.cancel()

    async def run(self, key: str, fn: Callable[..., T], *args: Any, cost: float = 1.0) -> T:
        return await self.submit(key, fn, *args, cost=cost)

    def withdraw(self, future: asyncio.Future[Any]) -> bool:
        """Cancel a job that has not started; False (and nothing done) if it has."""
        with self._cond:
            if future not in self._jobs:
                return False
        self.cancel(future)
        return True

    def queued_cost(self, key: str) -> float:
        """Cost queued or running for `key` (seconds of audio for transcriptions)."""
        with self._cond:
            state = self._keys.get(key)
            return state.cost if state is not None else 0.0

    def queued(self) -> int:
        with self._cond:
            return sum(len(s.queue) for s in self._keys.values())

    def _drop(self, job: _Job) -> None:
        """A queued job's future was cancelled: take it out of the queue now."""
        with self._cond:
            self._jobs.pop(job.future, None)
            state = self._keys.get(job.key)
            if state is None or job not in state.queue:
                return  # running or finished: its result is dropped
            state.queue.remove(job)
            state.cost -= job.cost
            self.cancelled += 1
            # The user is not charged for work that was never done.
            if state.queue:
                last = state.queue[-1]
                state.finish = last.start + max(last.cost, 1e-3)
            else:
                running = self.running
                if running is not None and running.key == job.key:
                    state.finish = running.start + running.cost
                else:
                    state.finish = self._clock
            self._forget_idle(job.key, state)

    def _forget_idle(self, key: str, state: _Key) -> None:
        if not state.queue and state.cost <= 1e-9 and state.finish <= self._clock:
            del self._keys[key]

    def _idle(self) -> None:
        """Nothing queued or running: the past is forgotten (fair queueing starts afresh)."""
        self._clock = max([self._clock, *(s.finish for s in self._keys.values())])
        for key, state in list(self._keys.items()):
            self._forget_idle(key, state)

    def _next(self) -> _Job | None:
        """The queued job with the lowest start tag (ties: the earliest submitted)."""
        best: _Job | None = None
        for state in self._keys.values():
            if state.queue:
                head = state.queue[0]
                if best is None or (head.start, head.seq) < (best.start, best.seq):
                    best = head
        return best

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next()
                while job is None and not self._closed:
                    self._idle()
                    self._cond.wait()
                    job = self._next()
                if job is None:
                    return
                self._keys[job.key].queue.popleft()
                self._jobs.pop(job.future, None)
                self._clock = max(self._clock, job.start)
                self.running = job
            try:
                result: Any = job.fn(*job.args)
                error: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            with self._cond:
                self.running = None
                self.done += 1
                owner = self._keys.get(job.key)
                if owner is not None:
                    owner.cost -= job.cost
                    self._forget_idle(job.key, owner)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:
                pass  # the event loop is closed (shutdown)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queued": sum(len(s.queue) for s in self._keys.values()),
                "running": self.running is not None,
                "done": self.done,
                "cancelled": self.cancelled,
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            jobs = [job for state in self._keys.values() for job in state.queue]
            for state in self._keys.values():
                state.queue.clear()
            self._jobs.clear()
            self._cond.notify_all()
        for job in jobs:
            try:
                job.loop.call_soon_threadsafe(job.future.cancel)
            except RuntimeError:
                pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # cancelled while it ran: the result is dropped
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Ticket:
    """One request's speech work: every job it submits is cancelled with it."""

    def __init__(self, limits: SpeechLimits, key: str, what: str, kind: str = "stt") -> None:
        self.limits = limits
        self.key = key
        self.what = what
        self.kind = kind
        self.cancelled = False
        self.closed = False
        self.audio_bytes = 0  # recorded audio this request holds (see SpeechLimits.hold)
        self._futures: dict[asyncio.Future[Any], FairExecutor] = {}

    def submit(
        self, executor: FairExecutor, fn: Callable[..., T], *args: Any, cost: float = 1.0
    ) -> asyncio.Future[T]:
        if self.cancelled:
            raise Cancelled(f"The {self.what} was cancelled")
        future = executor.submit(self.key, fn, *args, cost=cost)
        self._futures[future] = executor
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._futures.pop(future, None)
        if not future.cancelled():
            future.exception()  # an abandoned job's failure is not an unhandled error

    async def run(
        self, executor: FairExecutor, fn: Callable[..., T], *args: Any, cost: float = 1.0
    ) -> T:
        return await self.submit(executor, fn, *args, cost=cost)

    def cancel(self) -> None:
        """The requester went: queued jobs are dropped, running ones' results ignored."""
        if self.cancelled:
            return
        self.cancelled = True
        for future, executor in list(self._futures.items()):
            executor.cancel(future)
        self.close()

    def close(self) -> None:
        """The request is over: its slot and its audio bytes are released."""
        if not self.closed:
            self.closed = True
            self.limits._release(self)


class SpeechLimits:
    """Per-user bounds on speech work and on recorded audio held in memory (see
    `VoiceSettings`): requests in progress per user and kind (`stt`: recordings,
    transcriptions, hands-free streams; `tts`: `speak` and synthesis requests), seconds of
    audio waiting for transcription per user, recorded bytes per user and in total."""

    def __init__(self, stt: FairExecutor, settings: VoiceSettings) -> None:
        self.stt = stt
        self.settings = settings
        self._open: dict[tuple[str, str], set[Ticket]] = {}
        self._bytes: dict[str, int] = {}
        self.total_bytes = 0

    def open(self, key: str, what: str, kind: str = "stt") -> Ticket:
        limit = (
            self.settings.max_user_transcriptions
            if kind == "stt"
            else self.settings.max_user_syntheses
        )
        tickets = self._open.setdefault((key, kind), set())
        if len(tickets) >= limit:
            setting = "max_user_transcriptions" if kind == "stt" else "max_user_syntheses"
            things = (
                "recordings, transcriptions or hands-free streams"
                if kind == "stt"
                else ("speech syntheses")
            )
            raise SpeechBusy(
                f"You already have {len(tickets)} {things} in progress (the limit is {limit}, "
                f"voice.{setting}): wait for one to finish"
            )
        ticket = Ticket(self, key, what, kind)
        tickets.add(ticket)
        return ticket

    def check_queue(self, ticket: Ticket, seconds: float) -> None:
        """Refuse to queue `seconds` more audio for transcription past the user's bound."""
        queued = self.stt.queued_cost(ticket.key)
        limit = self.settings.max_user_queued_s
        if queued + seconds > limit:
            raise SpeechBusy(
                f"You have {queued:.0f} s of audio waiting to be transcribed; "
                f"{seconds:.0f} s more would pass the limit of {limit:g} s "
                "(voice.max_user_queued_s): wait for it to finish"
            )

    def hold(self, ticket: Ticket, size: int) -> None:
        """Account `size` more bytes of recorded audio held for `ticket`."""
        user = self._bytes.get(ticket.key, 0)
        per_user, total = self.settings.max_user_audio_bytes, self.settings.max_buffered_audio_bytes
        if user + size > per_user:
            raise SpeechBusy(
                f"Your recordings in progress hold {user / MB:.1f} MB of audio; the limit per "
                f"user is {per_user / MB:g} MB (voice.max_user_audio_bytes): this recording "
                "was discarded"
            )
        if self.total_bytes + size > total:
            raise SpeechBusy(
                f"The server holds {self.total_bytes / MB:.0f} MB of recorded audio, its "
                f"limit (voice.max_buffered_audio_bytes): this recording was discarded; try "
                "again in a moment"
            )
        ticket.audio_bytes += size
        self._bytes[ticket.key] = user + size
        self.total_bytes += size

    def drop_audio(self, ticket: Ticket) -> None:
        """The ticket's recorded bytes were freed."""
        size, ticket.audio_bytes = ticket.audio_bytes, 0
        if size:
            left = self._bytes.get(ticket.key, 0) - size
            if left > 0:
                self._bytes[ticket.key] = left
            else:
                self._bytes.pop(ticket.key, None)
            self.total_bytes -= size

    def _release(self, ticket: Ticket) -> None:
        self.drop_audio(ticket)
        tickets = self._open.get((ticket.key, ticket.kind))
        if tickets is not None:
            tickets.discard(ticket)
            if not tickets:
                del self._open[ticket.key, ticket.kind]

    def status(self) -> dict[str, Any]:
        return {
            "requests": sum(len(t) for t in self._open.values()),
            "bufferedAudioBytes": self.total_bytes,
        }
