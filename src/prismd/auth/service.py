"""Credentials: argon2id password hashes, login sessions, API tokens, failed-login limits.

Everything lives in the core database, so `prismd users …` / `prismd tokens …` work with the
server stopped, and a running server sees their changes at once: credentials are looked up per
request (one indexed query); only "does any user exist?" is cached, for a second. Open
WebSockets are checked again when the credentials change (auth/live.py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..config import TEST_CLOCK_ENV, Settings
from ..store.base import LOCAL_USER_ID, Store, TokenRecord, UserRecord
from .limits import LocalLimits

if TYPE_CHECKING:
    from argon2 import PasswordHasher

log = logging.getLogger(__name__)

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
# A username's failures are forgotten after this long without one (or at a successful login).
NAME_FORGET_S = 900.0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as."""

    id: str
    name: str
    admin: bool
    via: str  # open | cookie | token | config-token
    # Which credential: the SHA-256 of the login-session cookie, of the API token or of the
    # configured token ("" in the open mode). An open socket is checked against it again when
    # credentials change (auth/live.py).
    key: str = ""

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


USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 4096


class AccountError(ValueError):
    """A change to users or credentials that is refused; the message says why, `field` which
    input was wrong, `conflict` whether it clashes with what exists (a name taken)."""

    def __init__(self, message: str, field: str = "", conflict: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.conflict = conflict


def check_username(name: str) -> str:
    if not USERNAME_RE.fullmatch(name):
        raise AccountError("a user name has 1 to 64 letters, digits or _ . @ -", "name")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(
            f"the password must have at least {MIN_PASSWORD_CHARS} characters", "password"
        )
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(
            f"the password must have at most {MAX_PASSWORD_CHARS} characters", "password"
        )
    return password


class Auth:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._users_seen: tuple[float, bool] = (0.0, False)
        # Failed logins (and connections per address) counted here, or across processes
        # (core.py puts RedisLimits here when several processes share a Redis).
        self.limits: LocalLimits = LocalLimits(
            settings.auth.login_attempts_per_minute, settings.auth.login_delay_max_s
        )
        self._verifying = asyncio.Semaphore(2)
        # Each user's chosen default agent (None: the server's); only this process writes it.
        self._default_agents: dict[str, str | None] = {}
        from .live import LiveSockets

        self.sockets = LiveSockets(self)
        # Login sessions are judged by this clock: the wall clock, or (tests only) ahead of it.
        self._clock_offset_s = settings.test_clock_offset_s
        if self._clock_offset_s:
            log.warning(
                "%s is set: login sessions are judged %g s ahead of the wall clock (a test "
                "setting: logins end sooner)",
                TEST_CLOCK_ENV,
                self._clock_offset_s,
            )

    def _now(self) -> float:
        """The time login sessions are created and checked at (seconds since the epoch)."""
        return time.time() + self._clock_offset_s

    @property
    def ttl_s(self) -> float:
        return self.settings.auth.session_ttl_hours * 3600

    async def required(self, fresh: bool = False) -> bool:
        """Credentials are needed once a user exists or a token is configured. `fresh`: the
        credentials changed (another process wrote them): ask the database now."""
        if self.settings.auth.token:
            return True
        at, seen = self._users_seen
        now = time.monotonic()
        if seen:
            return True  # users are rarely all removed; a restart notices
        if fresh or now - at > USERS_CACHE_S:
            seen = await self.store.count_users() > 0
            self._users_seen = (now, seen)
        return seen

    async def authenticate(self, cookie: str | None, bearer: str | None) -> Principal | None:
        if bearer:
            found = await self.check("token", token_hash(bearer))
            if found is not None:
                return found
        if cookie:
            return await self.check("cookie", token_hash(cookie))
        return None

    async def check(self, via: str, key: str) -> Principal | None:
        """Who the credential `key` (a hash, see Principal.key) of kind `via` acts as now; None
        if it no longer does (logged out, revoked, expired, user removed, users added)."""
        if via == "open":
            return None if await self.required(fresh=True) else LOCAL_PRINCIPAL
        if via in ("token", "config-token"):
            configured = self.settings.auth.token
            if configured and hmac.compare_digest(key, token_hash(configured)):
                return Principal(LOCAL_USER_ID, "admin", True, "config-token", key)
            if via == "config-token":
                return None
            user = await self.store.token_user(key, now_iso())
            return _principal(user, "token", key) if user is not None else None
        if via == "cookie":
            user = await self.store.login_user(key, self._now())
            return _principal(user, "cookie", key) if user is not None else None
        return None

    async def login(self, username: str, password: str, client: str) -> tuple[Principal, str]:
        """Check a password; returns the principal and a new login-session token. Raises
        RateLimited, or PermissionError for wrong credentials."""
        name = username.lower()
        # Counted before the check, not after it: attempts sent all at once would otherwise
        # all pass the limit while the first ones are still being verified.
        counted = await self.limits.login_attempt(client, name)
        user = await self.store.get_user_by_name(username)
        stored = user.password_hash if user is not None else ""
        async with self._verifying:  # each check takes 64 MiB: a few at a time
            ok = await asyncio.to_thread(verify_password, stored, password)
        if user is None or not ok:
            raise PermissionError("Wrong username or password")
        await self.limits.login_succeeded(client, name, counted)
        return await self.start_login(user)

    async def start_login(self, user: UserRecord) -> tuple[Principal, str]:
        """A new login session for `user` (whose password was checked): the principal and the
        cookie's token."""
        token = new_token("sess")
        key = token_hash(token)
        await self.store.create_login(key, user.id, self._now() + self.ttl_s)
        return _principal(user, "cookie", key), token

    # ------------------------------------------------------------ users and credentials
    #
    # What the admin page, a user's account page and `prismd users|tokens|passwd` change. Each
    # change is written to the store, then the open sockets are checked again at once
    # (auth/live.py): a removed user, an ended login or a revoked token loses its sockets
    # now, not at the next poll.

    async def _hash(self, password: str) -> str:
        async with self._verifying:  # each hash takes 64 MiB: a few at a time
            return await asyncio.to_thread(hash_password, check_password(password))

    async def add_user(self, name: str, password: str, admin: bool = False) -> UserRecord:
        """Raises AccountError for a bad name or password, or a name taken. The first user is
        an admin (and ends the open mode: its sockets are closed)."""
        from ..sessions.ids import new_id

        check_username(name)
        taken = AccountError(f"user {name} exists already", "name", conflict=True)
        if await self.store.get_user_by_name(name) is not None:
            raise taken
        hashed = await self._hash(password)
        if await self.store.get_user_by_name(name) is not None:  # added while hashing
            raise taken
        first = await self.store.count_users() == 0
        user = UserRecord(new_id("user"), name, admin or first, hashed, now_iso())
        await self.store.create_user(user)
        await self.sockets.recheck()
        return user

    async def remove_user(self, user_id: str) -> bool:
        """Ends the user's logins and tokens (their sockets close, their turns stop); their
        sessions are kept."""
        removed = await self.store.delete_user(user_id)
        if removed:
            await self.sockets.recheck()
        return removed

    async def set_password(self, user_id: str, password: str) -> None:
        """Ends the user's login sessions (and their sockets); tokens stay valid."""
        hashed = await self._hash(password)
        await self.store.set_password(user_id, hashed)
        await self.sockets.recheck()

    async def change_password(self, user_id: str, current: str, new: str) -> None:
        """`set_password` after checking `current`; PermissionError if it is wrong."""
        user = await self.store.get_user(user_id)
        if user is None:
            raise AccountError("no such user", "user")
        check_password(new)
        async with self._verifying:
            ok = await asyncio.to_thread(verify_password, user.password_hash, current)
        if not ok:
            raise PermissionError("The current password is wrong")
        await self.set_password(user_id, new)

    async def create_token(self, user_id: str, name: str = "") -> tuple[TokenRecord, str]:
        """A new API token for the user: its record and the token itself (shown once)."""
        from ..sessions.ids import new_id

        token = new_token()
        record = TokenRecord(new_id("tok"), user_id, name, token_hash(token), now_iso())
        await self.store.create_token(record)
        return record, token

    async def revoke_token(self, token_id: str) -> bool:
        """The token stops working, and so do the sockets opened with it."""
        revoked = await self.store.revoke_token(token_id)
        if revoked:
            await self.sockets.recheck()
        return revoked

    async def end_login(self, key: str, reason: str = "This login session was ended") -> None:
        """End the login session whose cookie hashes to `key`, and at once its sockets."""
        await self.store.delete_login(key)
        self.sockets.revoke(lambda p: p.via == "cookie" and p.key == key, reason)

    async def default_agent(self, user_id: str) -> str | None:
        if user_id not in self._default_agents:
            self._default_agents[user_id] = await self.store.get_pref(user_id, "default_agent")
        return self._default_agents[user_id]

    async def set_default_agent(self, user_id: str, agent_id: str | None) -> None:
        await self.store.set_pref(user_id, "default_agent", agent_id)
        self._default_agents[user_id] = agent_id

    async def logout(self, cookie: str) -> None:
        """Ends the login session, and at once the sockets opened with it."""
        await self.end_login(token_hash(cookie), "You logged out: this login ended")

    async def aclose(self) -> None:
        await self.sockets.aclose()


def _principal(user: UserRecord, via: str, key: str) -> Principal:
    return Principal(user.id, user.name, user.admin, via, key)
