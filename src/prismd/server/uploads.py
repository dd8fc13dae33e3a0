"""Files uploaded with `POST /api/upload`, and their use in a `chat` (`{"fileId": …}`); the
bounds that keep one user from filling the disk (config `[uploads]`):

- a quota of upload bytes and files per user (`check_quota`, by the upload route);
- a daily budget of chat bytes (text and files) and files per user (`charge_chat`, by the
  WebSocket's chat path once a chat is known to be valid);
- uploads no session refers to are removed after `max_age_days` (`prune_uploads`: a periodic
  task of the server, and `prismd uploads prune`); a session refers to the uploads sent in its
  chats (`link_uploads`), and a deleted session's uploads go with it (the sessions route calls
  the store's `delete_session_uploads`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi.responses import Response

from ..auth import Principal
from ..protocol import Chat, ErrorCode, FileIn, ProtocolError

if TYPE_CHECKING:
    from ..core import Prismd
    from ..store.base import FileRecord, Store

log = logging.getLogger("prismd.uploads")

# Shown inline (thumbnails); anything else is served as an attachment, never rendered.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

_quota_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def resolve_uploads(core: Prismd, user: Principal, msg: Chat) -> Chat:
    """The chat with each `fileId` replaced by the upload's content, so that the usual checks
    and limits apply. Another user's upload is reported exactly like a missing one."""
    if len(msg.files) > core.settings.server.max_files:
        return msg  # refused with the usual message by the runner's checks
    files: list[FileIn] = []
    for i, f in enumerate(msg.files):
        if f.fileId is None:
            files.append(f)
            continue
        upload = await core.store.get_upload(f.fileId)
        if upload is None or not user.owns(upload.user_id):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f'Uploaded file "{f.fileId}" not found',
                {"field": f"files.{i}.fileId", "reason": "no such upload"},
            )
        files.append(
            FileIn(
                filename=upload.filename,
                mimeType=upload.mime_type,
                data=base64.b64encode(upload.data).decode("ascii"),
            )
        )
    return msg.model_copy(update={"files": files})


def upload_ids(msg: Chat) -> list[str]:
    """The uploads a chat sends (`{fileId}` entries)."""
    return [f.fileId for f in msg.files if f.fileId is not None]


def link_uploads(core: Prismd, session_id: str, ids: Sequence[str]) -> None:
    """The session now refers to these uploads: they live as long as it does. Queued after
    the session's creation; the chat does not wait for it (a failed write is logged)."""
    if ids:
        core.store.link_uploads(session_id, list(ids))


# ---------------------------------------------------------------- bounds


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


@contextlib.asynccontextmanager
async def check_quota(core: Prismd, user_id: str, size: int) -> AsyncIterator[None]:
    """Hold the user's upload quota for one more upload of `size` bytes while the body runs
    (which saves it); raises ProtocolError `payload_too_large` naming the limit when it would
    not fit. One upload at a time per user within this process, so two at once cannot both
    pass a quota that only one of them fits."""
    limits = core.settings.uploads
    lock = _quota_locks.get(user_id)
    if lock is None:
        lock = _quota_locks[user_id] = asyncio.Lock()
    async with lock:
        used, count = await core.store.upload_usage(user_id)
        if limits.max_files_per_user and count + 1 > limits.max_files_per_user:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"Upload quota reached: {count} files stored, the limit is "
                f"{limits.max_files_per_user} files per user (delete chats, or wait for unused "
                f"uploads to expire)",
            )
        if limits.max_bytes_per_user and used + size > limits.max_bytes_per_user:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"Upload quota reached: {_mib(used)} stored and this file is {_mib(size)}; "
                f"the limit is {limits.max_bytes_per_user} bytes per user",
            )
        yield


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).date().isoformat()


# How long a check trusts the store's totals it read for a user's day, with this process's own
# counts added since: one process counts every chat it lets through, so this bounds only what
# other processes (several workers) let through unseen.
BUDGET_REFRESH_S = 2.0


@dataclass(slots=True)
class _Seen:
    """A user's totals of one day as read from the store at `at`, and what this process
    counted since the read began (then still pending writes included)."""

    day: str
    at: float
    since: list[int]
    base: tuple[int, int] = (0, 0)


class DailyBudget:
    """Each user's chat bytes and files of the day (`chat_bytes_per_day`,
    `chat_files_per_day`), checked before a chat runs. The totals are the store's (read on a
    reader, never behind the stream's writes, at most every BUDGET_REFRESH_S per user) plus
    what this process counted since; the count itself is a queued write the chat does not wait
    for. One check at a time per user, so chats sent at once cannot all pass a budget that only
    one fits; and since a check rarely reads, a user's chats sent at once do not queue behind
    one store read each. With several processes, what the others let through in the last
    BUDGET_REFRESH_S can pass unseen."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._seen: dict[str, _Seen] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._clock = clock

    async def used(self, store: Store, user_id: str, day: str) -> tuple[int, int]:
        """The day's totals read afresh: the store's, and this process's pending counts."""
        # What is pending is taken before the read: a count that becomes durable meanwhile is
        # then counted once or twice (refusing early at worst), never missed.
        pending = tuple(self._pending.get((user_id, day), (0, 0)))
        size, files = await store.chat_usage(user_id, day)
        return size + pending[0], files + pending[1]

    async def _checked(self, store: Store, user_id: str, day: str) -> tuple[int, int]:
        """The totals a check goes by (called with the user's lock held): the last read while it
        is recent, with this process's counts since; otherwise a new read."""
        seen = self._seen.get(user_id)
        now = self._clock()
        if seen is None or seen.day != day or now - seen.at >= BUDGET_REFRESH_S:
            # Counts made from here on add to `since` (see _count), as the pending ones do.
            seen = _Seen(day, now, list(self._pending.get((user_id, day), (0, 0))))
            self._seen[user_id] = seen
            try:
                seen.base = await store.chat_usage(user_id, day)
            except BaseException:
                if self._seen.get(user_id) is seen:
                    del self._seen[user_id]
                raise
        return seen.base[0] + seen.since[0], seen.base[1] + seen.since[1]

    async def charge(
        self, core: Prismd, user: Principal, size: int, files: int
    ) -> Callable[[], None]:
        """Count a chat of `size` bytes and `files` files; raises ProtocolError
        `rate_limited`, naming the limit, when it does not fit (nothing is counted then).
        Returns what gives the chat back (it did not run: a resend answered by a replay, a
        session whose turn is running)."""
        limits = core.settings.uploads
        max_bytes, max_files = limits.chat_bytes_per_day, limits.chat_files_per_day
        if not max_bytes and not max_files:
            return lambda: None
        day = utc_day()
        key = (user.id, day)
        lock = self._locks.get(user.id)
        if lock is None:
            lock = self._locks[user.id] = asyncio.Lock()
        async with lock:
            used, count = await self._checked(core.store, user.id, day)
            if max_files and count + files > max_files:
                what = f"{count} files sent today, the limit is {max_files} files"
            elif max_bytes and used + size > max_bytes:
                what = (
                    f"{_mib(used)} sent today and this message is {_mib(size)}, the limit is "
                    f"{max_bytes} bytes"
                )
            else:
                what = ""
            if what:
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"Daily limit reached: {what} per user per day (the count starts again at "
                    "00:00 UTC)",
                )
            self._count(core, key, size, files)
        return lambda: self._count(core, key, -size, -files)

    def _count(self, core: Prismd, key: tuple[str, str], size: int, files: int) -> None:
        pending = self._pending.setdefault(key, [0, 0])
        pending[0] += size
        pending[1] += files
        seen = self._seen.get(key[0])
        if seen is not None and seen.day == key[1]:
            seen.since[0] += size
            seen.since[1] += files
        write = core.store.add_chat_usage(key[0], key[1], size, files)
        write.add_done_callback(lambda _: self._written(key, size, files))

    def _written(self, key: tuple[str, str], size: int, files: int) -> None:
        # Durable (or failed: then it is not counted twice either way, only lost).
        pending = self._pending.get(key)
        if pending is None:
            return
        pending[0] -= size
        pending[1] -= files
        if pending == [0, 0]:
            del self._pending[key]


async def charge_chat(
    core: Prismd, user: Principal, message: str, files: Sequence[FileRecord]
) -> Callable[[], None]:
    """Count a valid chat (its text and files) against the user's daily budget; returns what
    gives it back if it does not run after all."""
    size = len(message.encode("utf-8", "replace")) + sum(f.size for f in files)
    return await budget_of(core).charge(core, user, size, len(files))


_budgets: weakref.WeakKeyDictionary[Prismd, DailyBudget] = weakref.WeakKeyDictionary()


def budget_of(core: Prismd) -> DailyBudget:
    """The server's daily budget (one per server: kept beside it, not in it)."""
    budget = _budgets.get(core)
    if budget is None:
        budget = _budgets[core] = DailyBudget()
    return budget


def prune_cutoff(max_age_days: float, now: datetime | None = None) -> str:
    """Uploads created before this (ISO 8601, as stored) are `max_age_days` old."""
    when = (now or datetime.now(UTC)) - timedelta(days=max_age_days)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def prune_uploads(store: Store, max_age_days: float) -> int:
    """Remove the uploads older than `max_age_days` that no session refers to; how many."""
    removed = await store.prune_uploads(prune_cutoff(max_age_days))
    if removed:
        log.info("removed %d unused upload(s) older than %g days", removed, max_age_days)
    return removed


async def prune_periodically(core: Prismd) -> None:
    """The server's janitor: `prune_uploads` at start and every `prune_interval_s` (never
    with `max_age_days` = 0)."""
    settings = core.settings.uploads
    if not settings.max_age_days:
        return  # kept until their sessions go
    while True:
        try:
            await prune_uploads(core.store, settings.max_age_days)
        except Exception:  # noqa: BLE001 - the janitor must outlive a failed pass
            log.exception("pruning old uploads failed")
        await asyncio.sleep(settings.prune_interval_s)


# ---------------------------------------------------------------- serving a stored file


def file_response(data: bytes, mime_type: str, filename: str) -> Response:
    """A stored file, for its owner. Images of the common raster types are shown inline
    (thumbnails); everything else is an attachment served as `application/octet-stream`, so
    an uploaded HTML or SVG file can never run as a page of prismd's origin. The response's
    own CSP forbids everything anyway."""
    inline = mime_type in INLINE_TYPES
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    disposition = (
        f'{"inline" if inline else "attachment"}; filename="{fallback or "file"}"; '
        f"filename*=UTF-8''{quote(filename, safe='')}"
    )
    return Response(
        data,
        media_type=mime_type if inline else "application/octet-stream",
        headers={
            "Content-Disposition": disposition,
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=3600",
        },
    )
