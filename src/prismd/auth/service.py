"""Credentials: argon2id password hashes, login sessions, API tokens, failed-login limits.

Everything lives in the core database, so `prismd users …` / `prismd tokens …` work with the
server stopped, and a running server sees their changes at once: credentials are looked up per
request (one indexed query); only "does any user exist?" is cached, for a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..config import Settings
from ..store.base import LOCAL_USER_ID, Store, UserRecord

if TYPE_CHECKING:
    from argon2 import PasswordHasher

COOKIE_NAME = "prismd_session"


@functools.cache
def _hasher() -> PasswordHasher:
    """argon2id with the library's defaults (RFC 9106 low-memory profile: 64 MiB, 3 passes).
    Imported on first use: a server that never sees a password does not carry it (~4 MB)."""
    from argon2 import PasswordHasher

    return PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when a username is unknown, so that a miss costs as much as a hit.
    Made on first use: hashing costs 64 MiB and ~0.2 s, which a server start should not pay."""
    return _hasher().hash("prismd-no-such-user")


USERS_CACHE_S = 1.0
WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as."""

    id: str
    name: str
    admin: bool
    via: str  # open | cookie | token | config-token

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "admin": self.admin}

    def owns(self, owner_id: str | None) -> bool:
        return self.admin or owner_id == self.id


# Loopback with no user and no token: everything acts as this one local admin.
LOCAL_PRINCIPAL = Principal(LOCAL_USER_ID, "local", True, "open")


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(password_hash or _dummy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


def new_token(prefix: str = "prismd") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """Tokens are 256 random bits: a plain SHA-256 is enough to store them (no KDF needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins: try again in {retry_after} s")
        self.retry_after = retry_after


class _FailureLimiter:
    """Failed attempts per key within a sliding minute."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float) -> int:
        window = self._failures.get(key)
        if window is None:
            return 0
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if not window:
            del self._failures[key]
            return 0
        if len(window) < self.limit:
            return 0
        return max(1, int(window[0] + WINDOW_S - now + 0.999))

    def fail(self, key: str, now: float) -> None:
        self._failures.setdefault(key, deque()).append(now)
        if len(self._failures) > 100_000:  # bounded memory under a spray of names/addresses
            self._failures.pop(next(iter(self._failures)))

    def forgive(self, key: str, at: float) -> None:
        """Take back an attempt counted in advance (it succeeded)."""
        window = self._failures.get(key)
        if window is not None:
            with contextlib.suppress(ValueError):
                window.remove(at)


class Auth:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._users_seen: tuple[float, bool] = (0.0, False)
        self._limiter = _FailureLimiter(settings.auth.login_attempts_per_minute)
        self._verifying = asyncio.Semaphore(2)
        # Each user's chosen default agent (None: the server's); only this process writes it.
        self._default_agents: dict[str, str | None] = {}

    @property
    def ttl_s(self) -> float:
        return self.settings.auth.session_ttl_hours * 3600

    async def required(self) -> bool:
        """Credentials are needed once a user exists or a token is configured."""
        if self.settings.auth.token:
            return True
        at, seen = self._users_seen
        now = time.monotonic()
        if seen:
            return True  # users are rarely all removed; a restart notices
        if now - at > USERS_CACHE_S:
            seen = await self.store.count_users() > 0
            self._users_seen = (now, seen)
        return seen

    async def authenticate(self, cookie: str | None, bearer: str | None) -> Principal | None:
        if bearer:
            configured = self.settings.auth.token
            if configured and hmac.compare_digest(bearer.encode(), configured.encode()):
                return Principal(LOCAL_USER_ID, "admin", True, "config-token")
            user = await self.store.token_user(token_hash(bearer), now_iso())
            if user is not None:
                return _principal(user, "token")
        if cookie:
            user = await self.store.login_user(token_hash(cookie), time.time())
            if user is not None:
                return _principal(user, "cookie")
        return None

    async def login(self, username: str, password: str, client: str) -> tuple[Principal, str]:
        """Check a password; returns the principal and a new login-session token. Raises
        RateLimited, or PermissionError for wrong credentials."""
        now = time.monotonic()
        keys = (f"user:{username.lower()}", f"addr:{client}")
        wait = max(self._limiter.retry_after(k, now) for k in keys)
        if wait:
            raise RateLimited(wait)
        # Counted before the check, not after it: attempts sent all at once would otherwise
        # all pass the limit while the first ones are still being verified.
        for k in keys:
            self._limiter.fail(k, now)
        user = await self.store.get_user_by_name(username)
        stored = user.password_hash if user is not None else ""
        async with self._verifying:  # each check takes 64 MiB: a few at a time
            ok = await asyncio.to_thread(verify_password, stored, password)
        if user is None or not ok:
            raise PermissionError("Wrong username or password")
        for k in keys:
            self._limiter.forgive(k, now)
        token = new_token("sess")
        await self.store.create_login(token_hash(token), user.id, time.time() + self.ttl_s)
        return _principal(user, "cookie"), token

    async def default_agent(self, user_id: str) -> str | None:
        if user_id not in self._default_agents:
            self._default_agents[user_id] = await self.store.get_pref(user_id, "default_agent")
        return self._default_agents[user_id]

    async def set_default_agent(self, user_id: str, agent_id: str | None) -> None:
        await self.store.set_pref(user_id, "default_agent", agent_id)
        self._default_agents[user_id] = agent_id

    async def logout(self, cookie: str) -> None:
        await self.store.delete_login(token_hash(cookie))


def _principal(user: UserRecord, via: str) -> Principal:
    return Principal(user.id, user.name, user.admin, via)
