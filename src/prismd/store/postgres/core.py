"""The PostgreSQL store's machinery, on which every concept's part of the store
(store/postgres/*.py) builds (`PostgresCore`): the writer, and the connection pool for reads.

Writes are queued and applied by one writer task on a connection of its own, which drains
whatever is queued and runs it in one transaction (consecutive `append_events` of a batch as one
`executemany`: the streaming hot path), then resolves each write's future after COMMIT, in queue
order. A write that fails fails alone (the batch is rolled back and its writes are run one by
one); if the COMMIT fails, every write of the batch fails. Reads run on a connection pool and
see what is committed.

Failures: when PostgreSQL is unreachable or restarts, a write's future fails and a read raises
`StoreUnavailable` within `timeout_s` (never a hang); the next use opens new connections, so
the store recovers by itself when the server is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..base import Store, StoreUnavailable, TouchLimiter, Written
from ..common import MAX_BATCH, TOKEN_TOUCH_S
from .connection import Conn, _unavailable, connect, describe_url
from .schema import migrate

log = logging.getLogger("prismd.store")
T = TypeVar("T")
_INSERT_EVENTS = "INSERT INTO session_events (session_id, seq, turn_id, frame) VALUES ($1,$2,$3,$4)"
# A write: event rows (session_id, seq, turn_id, frame) to append, or a statement to run.
Op = Callable[[Conn], Awaitable[Any]]
_STOP = object()


def _count(status: str) -> int:
    """Rows a statement touched, from its status ("DELETE 3", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


async def _no_session_state(conn: Any) -> None:
    """The pool's reset: nothing beyond asyncpg's own client-side cleanup (see open())."""


class PostgresCore(Store):
    """The pool, the writer task and its queue and connection (see the module)."""

    def __init__(self, url: str, *, pool_size: int = 10, timeout_s: float = 5.0) -> None:
        self.url = url
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self.where = describe_url(url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._conn: Conn | None = None  # the writer's
        self._pool: Any = None
        self._token_touched = TouchLimiter(TOKEN_TOUCH_S)

    async def open(self) -> None:
        await migrate(self.url, self.timeout_s)
        self._pool = await asyncpg.create_pool(
            self.url,
            # No floor: an idle pool keeps no connection to re-open (and log) while the
            # server is down; a read after an idle spell pays one connect.
            min_size=0,
            max_size=self.pool_size,
            timeout=self.timeout_s,
            command_timeout=self.timeout_s,
            # asyncpg's default reset runs four statements (unlisten, reset, close cursors,
            # advisory unlock) each time a connection goes back: prismd leaves no session
            # state on a pooled connection, so only an open transaction is rolled back.
            reset=_no_session_state,
        )
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._run(), name="prismd-store-writer")

    async def close(self) -> None:
        if self._writer is None:
            return
        self._queue.put_nowait(_STOP)  # after every queued write: those are applied first
        await self._writer
        self._writer = None
        await self._drop_writer_conn()
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), self.timeout_s)
        except (TimeoutError, *_CLOSE_ERRORS):
            pool.terminate()

    async def flush(self) -> None:
        await self._submit(_nothing)

    def _submit(self, op: Op | list[tuple[Any, ...]], keep: bool = False) -> Written:
        """Queue a write; its future resolves once it is committed (to the op's value if
        `keep`, else None)."""
        assert self._loop is not None and self._writer is not None, "store is not open"
        fut: Written = self._loop.create_future()
        self._queue.put_nowait((op, fut, keep))
        return fut

    async def _call(self, op: Op) -> Any:
        return await self._submit(op, keep=True)

    def _failure(self, exc: BaseException) -> StoreUnavailable:
        reason = f"no answer within {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else exc
        failure = StoreUnavailable(f"PostgreSQL at {self.where} is unavailable: {reason}")
        failure.__cause__ = exc
        return failure

    async def _pooled(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `fn` on a pooled connection; StoreUnavailable if the server cannot be used. A
        connection found broken (the server restarted since it was last used) is replaced
        once."""
        assert self._pool is not None, "store is not open"
        for attempt in (1, 2):
            try:
                async with self._pool.acquire(timeout=self.timeout_s) as conn:
                    return await fn(conn)
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                broken = isinstance(
                    exc, asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError
                )
                if attempt == 2 or not broken:
                    raise self._failure(exc) from exc
        raise AssertionError("unreachable")

    async def _snapshot(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Several reads that must agree with each other: one read-only snapshot."""

        async def run(conn: Conn) -> T:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await fn(conn)

        return await self._pooled(run)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            stop = _STOP in batch
            writes = [item for item in batch if item is not _STOP]
            if writes:
                try:
                    await self._apply(writes)
                except BaseException as exc:  # never leave a caller waiting
                    for _, fut, _ in writes:
                        if not fut.done():
                            fut.set_exception(exc)
                            fut.exception()
                    if not isinstance(exc, Exception):
                        raise
                    log.exception("store writer failed")
            if stop:
                return

    async def _writer_conn(self) -> Conn:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            self._conn = await connect(self.url, self.timeout_s, self.timeout_s)
        return self._conn

    async def _drop_writer_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except (TimeoutError, *_CLOSE_ERRORS):
                conn.terminate()

    async def _begin(self, transaction: bool) -> tuple[Conn, Any]:
        """The writer's connection (in a new transaction if asked); StoreUnavailable if there
        is none. A connection the server closed since the last batch (it restarted) is
        replaced once: nothing was applied on it yet."""
        for attempt in (1, 2):
            try:
                conn = await self._writer_conn()
                if not transaction:
                    return conn, None
                tr = conn.transaction()
                await tr.start()
                return conn, tr
            except Exception as exc:
                await self._drop_writer_conn()
                if attempt == 2 or not isinstance(
                    exc, asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError
                ):
                    if isinstance(exc, StoreUnavailable):
                        raise
                    raise self._failure(exc) from exc
        raise AssertionError("unreachable")

    async def _apply(self, writes: list[tuple[Any, Written, bool]]) -> None:
        results: list[tuple[Any, BaseException | None]]
        # A batch of event appends alone is one `executemany`, atomic by itself: it needs no
        # BEGIN and COMMIT round trips (the streaming hot path).
        events_only = all(isinstance(op, list) for op, _, _ in writes)
        try:
            conn, tr = await self._begin(transaction=not events_only)
        except StoreUnavailable as exc:
            _resolve(writes, [(None, exc)] * len(writes))
            return
        try:
            values = await _run_batch(conn, [op for op, _, _ in writes])
        except Exception as exc:
            if _unavailable(exc):
                await self._drop_writer_conn()
                _resolve(writes, [(None, self._failure(exc))] * len(writes))
                return
            log.warning("a store write failed (%s); running the batch's writes one by one", exc)
            try:
                if tr is not None:
                    await tr.rollback()
            except Exception as rollback_exc:  # noqa: BLE001 - the connection is gone
                await self._drop_writer_conn()
                _resolve(writes, [(None, self._failure(rollback_exc))] * len(writes))
                return
            results = await self._one_by_one(conn, writes)
        else:
            try:
                if tr is not None:
                    await tr.commit()
            except Exception as exc:
                # Nothing of this batch is known to be durable: every write of it failed.
                log.error("store commit failed: %s", exc)
                await self._drop_writer_conn()
                failure = self._failure(exc) if _unavailable(exc) else exc
                results = [(None, failure)] * len(writes)
            else:
                results = [(value, None) for value in values]
        _resolve(writes, results)

    async def _one_by_one(
        self, conn: Conn, writes: list[tuple[Any, Written, bool]]
    ) -> list[tuple[Any, BaseException | None]]:
        """Each write in a transaction of its own: the failing one fails alone."""
        results: list[tuple[Any, BaseException | None]] = []
        for op, _, _ in writes:
            try:
                async with conn.transaction():
                    (value,) = await _run_batch(conn, [op])
            except Exception as exc:
                if _unavailable(exc):
                    await self._drop_writer_conn()
                    failure = self._failure(exc)
                    results.extend([(None, failure)] * (len(writes) - len(results)))
                    return results
                log.error("store write failed: %r", exc)
                results.append((None, exc))
            else:
                results.append((value, None))
        return results


_CLOSE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def _nothing(_conn: Conn) -> None:
    return None


async def _run_batch(conn: Conn, ops: list[Any]) -> list[Any]:
    """Run a batch's writes in order (in the caller's transaction); consecutive event appends
    go as one `executemany`. Returns each write's value."""
    values: list[Any] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, list):
            rows = []
            j = i
            while j < len(ops) and isinstance(ops[j], list):
                rows.extend(ops[j])
                j += 1
            await conn.executemany(_INSERT_EVENTS, rows)
            values.extend([None] * (j - i))
            i = j
        else:
            values.append(await op(conn))
            i += 1
    return values


def _resolve(
    writes: list[tuple[Any, Written, bool]], results: list[tuple[Any, BaseException | None]]
) -> None:
    """Resolve the writes' futures in queue order."""
    for (_, fut, keep), (value, exc) in zip(writes, results, strict=True):
        if fut.done():  # cancelled by an awaiting caller
            continue
        if exc is not None:
            fut.set_exception(exc)
            fut.exception()  # a caller that never awaits it loses nothing: it was logged
        else:
            fut.set_result(value if keep else None)
