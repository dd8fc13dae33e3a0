"""The SQLite store's machinery: the writer thread and the readers, on which every
concept's part of the store (store/sqlite/*.py) builds (`SqliteCore`).

Writes are queued to the writer thread, which drains whatever is queued, runs it, commits once,
and then resolves the writes' futures on the event loop in one callback: under load many small
writes (stream events) share one commit, and the event loop never waits on the disk. Reads run
on a small pool of reader threads with connections of their own (WAL readers do not block the
writer nor wait for it), so history loads, replays and credential lookups never queue behind a
batch of events. A read sees what is committed.

Durability: WAL with synchronous=NORMAL. A committed batch survives a process crash (kill -9);
an OS crash or power loss may lose the last batches, never corrupt the file.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..base import Store, StoreUnavailable, TouchLimiter, Written
from ..common import MAX_BATCH, TOKEN_TOUCH_S

log = logging.getLogger("prismd.store")
T = TypeVar("T")

# A write's outcome: (its future, its value, its error).
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]
READERS = 2
_STOP = object()


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    conn.execute("PRAGMA busy_timeout=5000")
    if readonly:
        conn.execute("PRAGMA query_only=1")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteCore(Store):
    """The connections, the writer thread and its queue, the readers (see the module)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "prismd.db"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._token_touched = TouchLimiter(TOKEN_TOUCH_S)

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="prismd-store", daemon=True)
        self._thread.start()
        await self._call(self._open_db)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="prismd-read")

    @abc.abstractmethod
    def _open_db(self) -> None:
        """Open the writer's connection and bring the database to the current layout (on
        the writer thread): store/sqlite/schema.py."""

    async def close(self) -> None:
        if self._thread is None:
            return
        await self.flush()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results = self._apply([item for item in batch if item is not _STOP])
            if results and self._loop is not None:
                self._loop.call_soon_threadsafe(_resolve_all, results)
            if _STOP in batch:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                return

    def _apply(self, writes: list[tuple[Callable[[], Any], Written]]) -> list[_Result]:
        """Run a batch's writes in one transaction and commit it. A write that fails fails
        alone, and nothing of it is kept: the batch is rolled back and its writes run again
        one by one, each committed on its own. If the database cannot be used (locked, disk
        full) or the commit fails, every write of the batch fails."""
        results: list[_Result] = []
        for fn, fut in writes:
            try:
                value = _run_write(fn)
            except Exception as exc:  # noqa: BLE001 - reported to the callers and logged
                self._rollback()
                failed = _unavailable(exc)
                if isinstance(failed, StoreUnavailable):  # the others would fail the same way
                    log.error("store write failed: %s", failed)
                    return [(f, None, failed) for _, f in writes]
                log.warning("a store write failed (%s); running the batch's writes one by one", exc)
                return [self._alone(fn, fut) for fn, fut in writes]
            results.append((fut, value, None))
        return self._commit(results)

    def _alone(self, fn: Callable[[], Any], fut: Written) -> _Result:
        try:
            value = _run_write(fn)
        except Exception as exc:  # noqa: BLE001 - reported to the caller and logged
            log.exception("store write failed")
            self._rollback()
            return (fut, None, _unavailable(exc))
        return self._commit([(fut, value, None)])[0]

    def _commit(self, results: list[_Result]) -> list[_Result]:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.commit()
            except sqlite3.Error as exc:
                log.exception("store commit failed")
                # Nothing of this batch is durable: every write of it failed.
                failed = _unavailable(exc)
                self._rollback()
                return [(f, None, failed) for f, _, _ in results]
        return results

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.rollback()
            except sqlite3.Error:
                log.exception("store rollback failed")

    def _submit(self, fn: Callable[[], Any]) -> Written:
        """Queue a write; the future resolves once it is committed."""
        assert self._loop is not None, "store is not open"
        fut: Written = self._loop.create_future()
        self._queue.put((fn, fut))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, fut))
        return await fut

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._readers is not None, "store is not open"
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._on_reader, fn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def _on_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path, readonly=True)
            self._reader_conns.append(conn)
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.rollback()  # end the read snapshot

    async def flush(self) -> None:
        await self._call(lambda: None)

    def _w(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db


# SQLite's primary result codes that mean the database cannot be used now (not a bad write).
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
}


def _unavailable(exc: BaseException) -> BaseException:
    """`StoreUnavailable` for a database that cannot be used (disk full, I/O error, locked),
    with the SQLite error as its cause; any other error as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or code & 0xFF not in _UNAVAILABLE_CODES:
        return exc
    failed = StoreUnavailable(f"the SQLite database cannot be used: {exc}")
    failed.__cause__ = exc
    return failed


def _run_write(fn: Callable[[], Any]) -> Any:
    value = fn()
    if isinstance(value, sqlite3.Cursor):
        # A cursor must never reach the event loop's thread: finalised there while the writer
        # thread uses the connection, it breaks both (SQLITE_MISUSE).
        value.close()
        value = None
    return value


def _resolve_all(results: Iterable[_Result]) -> None:
    for fut, value, exc in results:
        if fut.done():  # cancelled by an awaiting caller
            continue
        if exc is not None:
            fut.set_exception(exc)
            fut.exception()  # logged already; a caller that never awaits it loses nothing
        else:
            fut.set_result(value)
