"""Credentials are live: an open `/ws` lasts exactly as long as REST would still accept the
credential it was opened with.

Every connection remembers its credential (`Principal.via` and `.key`: the hash of its login
session, of its API token or of the configured token; the open mode has none). It is checked
again

- at once, in this process, when it is ended here (`POST /api/auth/logout`: `Auth.logout`
  closes the sockets of that login session; other in-process changes call `recheck()`);
- within POLL_S when another process changed the core database: `prismd tokens revoke`,
  `prismd users remove`, `prismd passwd` / `users passwd` (which end the user's login
  sessions) and `prismd users add` (the open mode ends) write it directly while the server
  runs. The watcher asks SQLite's `PRAGMA data_version` on the server's own core connection,
  which changes only when another connection commits: one cheap query per POLL_S while
  sockets are open, and a check of the sockets only after such a change;
- every RECHECK_S regardless, which also ends a socket whose login session expired.

A socket whose credential no longer holds gets a last `error` frame with code `unauthorized`,
is closed with code 4001 (CLOSE_REVOKED) and handles nothing more (see server/ws.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .service import Auth, Principal

log = logging.getLogger(__name__)

POLL_S = 0.5
RECHECK_S = 60.0
# The WebSocket close code of a socket whose credential was revoked (4000-4999 are the
# application's; 4001 mirrors HTTP 401).
CLOSE_REVOKED = 4001


class Socket(Protocol):
    """What the watcher needs of a connection (server/ws.py's Connection)."""

    @property
    def user(self) -> Principal: ...

    def revoke(self, reason: str, user_removed: bool = False) -> None:
        """Send `error` `unauthorized` with `reason`, close with CLOSE_REVOKED, handle nothing
        more; `user_removed`: also stop the user's running turns."""


class LiveSockets:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self._sockets: set[Socket] = set()
        self._task: asyncio.Task[None] | None = None
        self._version: int | None = None  # of the core database when last checked
        self._checked = 0.0
        self._closed = False

    def __len__(self) -> int:
        return len(self._sockets)

    def attach(self, socket: Socket) -> None:
        self._sockets.add(socket)
        if (self._task is None or self._task.done()) and not self._closed:
            self._task = asyncio.create_task(self._watch(), name="prismd-live-credentials")

    def detach(self, socket: Socket) -> None:
        self._sockets.discard(socket)

    def revoke(self, match: Callable[[Principal], bool], reason: str) -> int:
        """Close at once the sockets whose credential `match`es; how many."""
        hit = [s for s in self._sockets if match(s.user)]
        for socket in hit:
            self._sockets.discard(socket)
            socket.revoke(reason)
        if hit:
            log.info("closed %d socket(s): %s", len(hit), reason)
        return len(hit)

    async def recheck(self) -> int:
        """Check every open socket's credential again (one query per distinct credential);
        close those that no longer hold. Returns how many were closed."""
        self._checked = time.monotonic()
        verdicts: dict[tuple[str, str], str | None] = {}
        closed = 0
        for socket in list(self._sockets):
            user = socket.user
            cred = (user.via, user.key)
            if cred not in verdicts:
                verdicts[cred] = await self._verdict(user)
            reason = verdicts[cred]
            if reason is not None and socket in self._sockets:
                self._sockets.discard(socket)
                socket.revoke(reason, user_removed=reason == _REMOVED)
                closed += 1
        if closed:
            log.info("closed %d socket(s) whose credentials were revoked", closed)
        return closed

    async def _verdict(self, user: Principal) -> str | None:
        """None if the credential still acts as this user with the same rights, else why not."""
        now = await self.auth.check(user.via, user.key)
        if now is not None and now.id == user.id and now.admin == user.admin:
            return None
        if user.via == "open":
            return "Credentials are now required (a user was added): log in"
        if now is not None:
            return "Your rights changed: connect again"
        if user.via == "config-token":
            return "The configured token changed"
        if await self.auth.store.get_user(user.id) is None:
            return _REMOVED
        if user.via == "token":
            return "This API token was revoked"
        return "Your login session ended (logged out, password changed or expired)"

    async def _watch(self) -> None:
        store = self.auth.store
        while self._sockets and not self._closed:
            try:
                version = await store.data_version()
                due = time.monotonic() - self._checked > RECHECK_S
                if version != self._version or due:
                    self._version = version
                    await self.recheck()
            except Exception:  # noqa: BLE001 - the watcher must outlive a failed query
                log.exception("checking the credentials of open sockets failed")
            await asyncio.sleep(POLL_S)

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_REMOVED = "This user was removed"
