"""The PostgreSQL store's accounts: users, login sessions, API tokens (of a secret, only
its hash is stored) and each user's preferences. A write that may end credentials also moves
`credentials_version` (`_revoking`), which `data_version` reads: every process watches it to
check its open sockets again.
"""

from __future__ import annotations

import time
from typing import Any

from ..base import LoginRecord, TokenRecord, UserRecord
from ..common import _USER_COLUMNS, _USER_FIELDS
from .connection import Conn
from .core import Op, PostgresCore, _count

_JOINED_USER_COLUMNS = ", ".join(f"u.{c}" for c in _USER_FIELDS)  # u: users, joined


class PostgresAccounts(PostgresCore):
    async def count_users(self) -> int:
        return int(await self._pooled(lambda c: c.fetchval("SELECT COUNT(*) FROM users")))

    async def data_version(self) -> int:
        """Moves whenever a process (a server, or `prismd users|tokens|passwd`) changed
        credentials in a way that may end some: users added or removed, passwords changed,
        logouts, revoked tokens (`credentials_version`, bumped by those writes)."""
        return int(
            await self._pooled(
                lambda c: c.fetchval(
                    "SELECT COALESCE((SELECT version FROM credentials_version), 0)"
                )
            )
        )

    async def create_user(self, user: UserRecord) -> None:
        await self._call(
            _revoking(
                lambda c: c.execute(
                    "INSERT INTO users (id, name, admin, password_hash, created_at) "
                    "VALUES ($1,$2,$3,$4,$5)",
                    user.id,
                    user.name,
                    user.admin,
                    user.password_hash,
                    user.created_at,
                )
            )
        )

    async def _user_where(self, where: str, value: str) -> UserRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE {where}=$1", value)
        )
        return UserRecord(**dict(row)) if row else None

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._user_where("id", user_id)

    async def get_user_by_name(self, name: str) -> UserRecord | None:
        return await self._user_where("name", name)

    async def list_users(self) -> list[UserRecord]:
        rows = await self._pooled(
            lambda c: c.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, pos")
        )
        return [UserRecord(**dict(r)) for r in rows]

    async def delete_user(self, user_id: str) -> bool:
        async def op(c: Conn) -> bool:
            for table in ("login_sessions", "api_tokens", "user_prefs"):
                await c.execute(f"DELETE FROM {table} WHERE user_id=$1", user_id)
            return _count(await c.execute("DELETE FROM users WHERE id=$1", user_id)) > 0

        return bool(await self._call(_revoking(op)))

    async def set_password(self, user_id: str, password_hash: str) -> None:
        async def op(c: Conn) -> None:
            await c.execute("UPDATE users SET password_hash=$2 WHERE id=$1", user_id, password_hash)
            await c.execute("DELETE FROM login_sessions WHERE user_id=$1", user_id)

        await self._call(_revoking(op))

    async def create_login(self, token_hash: str, user_id: str, expires_at: float) -> None:
        async def op(c: Conn) -> None:
            await c.execute("DELETE FROM login_sessions WHERE expires_at<$1", time.time())
            await c.execute(
                "INSERT INTO login_sessions (token_hash, user_id, expires_at, created_at) "
                "VALUES ($1,$2,$3,$4)",
                token_hash,
                user_id,
                expires_at,
                time.time(),
            )

        await self._call(op)

    async def login_user(self, token_hash: str, now: float) -> UserRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(
                f"SELECT l.expires_at, {_JOINED_USER_COLUMNS} "
                "FROM login_sessions l LEFT JOIN users u ON u.id = l.user_id "
                "WHERE l.token_hash=$1",
                token_hash,
            )
        )
        if row is None:
            return None
        if row["expires_at"] < now:
            self._submit(
                lambda c: c.execute("DELETE FROM login_sessions WHERE token_hash=$1", token_hash)
            )
            return None
        return _user(row)

    async def delete_login(self, token_hash: str) -> None:
        await self._call(
            _revoking(
                lambda c: c.execute("DELETE FROM login_sessions WHERE token_hash=$1", token_hash)
            )
        )

    async def create_token(self, token: TokenRecord) -> None:
        await self._call(
            lambda c: c.execute(
                "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) "
                "VALUES ($1,$2,$3,$4,$5)",
                token.id,
                token.user_id,
                token.name,
                token.token_hash,
                token.created_at,
            )
        )

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT id, user_id, name, token_hash, created_at, last_used_at FROM api_tokens "
                "ORDER BY created_at, pos"
            )
        )
        return [TokenRecord(**dict(r)) for r in rows]

    async def revoke_token(self, token_id: str) -> bool:
        status = await self._call(
            _revoking(lambda c: c.execute("DELETE FROM api_tokens WHERE id=$1", token_id))
        )
        return _count(status) > 0

    async def token_user(self, token_hash: str, now: str) -> UserRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(
                f"SELECT t.id AS token_id, {_JOINED_USER_COLUMNS} "
                "FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.token_hash=$1",
                token_hash,
            )
        )
        if row is None:
            return None
        token_id = row["token_id"]
        # Recording the last use is not worth a write per request.
        if self._token_touched.due(token_id):
            self._submit(
                lambda c: c.execute(
                    "UPDATE api_tokens SET last_used_at=$2 WHERE id=$1", token_id, now
                )
            )
        return _user(row)

    async def get_pref(self, user_id: str, key: str) -> str | None:
        value = await self._pooled(
            lambda c: c.fetchval(
                "SELECT value FROM user_prefs WHERE user_id=$1 AND key=$2", user_id, key
            )
        )
        return str(value) if value is not None else None

    async def set_pref(self, user_id: str, key: str, value: str | None) -> None:
        if value is None:
            await self._call(
                lambda c: c.execute(
                    "DELETE FROM user_prefs WHERE user_id=$1 AND key=$2", user_id, key
                )
            )
            return
        await self._call(
            lambda c: c.execute(
                "INSERT INTO user_prefs (user_id, key, value) VALUES ($1,$2,$3) "
                "ON CONFLICT (user_id, key) DO UPDATE SET value=excluded.value",
                user_id,
                key,
                value,
            )
        )

    async def list_logins(self, user_id: str | None = None) -> list[LoginRecord]:
        args: list[Any] = [time.time()]
        where = "expires_at>=$1"
        if user_id is not None:
            args.append(user_id)
            where += " AND user_id=$2"
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT token_hash, user_id, created_at, expires_at FROM login_sessions "
                f"WHERE {where} ORDER BY COALESCE(created_at, 0) DESC, expires_at DESC",
                *args,
            )
        )
        return [LoginRecord(**dict(r)) for r in rows]


def _user(row: Any) -> UserRecord | None:
    """The user columns of a row joined to `users` (None when the user is gone)."""
    return UserRecord(**{k: row[k] for k in _USER_FIELDS}) if row["id"] is not None else None


def _revoking(op: Op) -> Op:
    """A write that may end credentials: it also moves `credentials_version` (data_version),
    which every process watches to check its open sockets again."""

    async def run(conn: Conn) -> Any:
        value = await op(conn)
        await conn.execute(
            "INSERT INTO credentials_version (version) VALUES (1) "
            "ON CONFLICT (one) DO UPDATE SET version = credentials_version.version + 1"
        )
        return value

    return run
