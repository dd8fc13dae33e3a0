"""The SQLite store's accounts: users, login sessions, API tokens (of a secret,
only its hash is stored) and each user's preferences; `data_version` tells the server when
another process (the CLI) changed credentials.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from ..base import LoginRecord, TokenRecord, UserRecord
from ..common import _USER_COLUMNS
from .core import SqliteCore


class SqliteAccounts(SqliteCore):
    async def data_version(self) -> int:
        """SQLite's `PRAGMA data_version` on the writer's connection: it changes only when
        another connection (another process: the CLI) commits, never for this store's writes
        (its readers never write)."""
        return await self._call(lambda: int(self._w().execute("PRAGMA data_version").fetchone()[0]))

    async def count_users(self) -> int:
        return await self._read(
            lambda db: int(db.execute("SELECT COUNT(*) FROM users").fetchone()[0])
        )

    async def create_user(self, user: UserRecord) -> None:
        await self._call(
            lambda: self._w().execute(
                "INSERT INTO users (id, name, admin, password_hash, created_at) VALUES (?,?,?,?,?)",
                (user.id, user.name, int(user.admin), user.password_hash, user.created_at),
            )
        )

    def _user_where(self, db: sqlite3.Connection, where: str, *args: Any) -> UserRecord | None:
        row = db.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE {where}", args).fetchone()
        return _user_record(row) if row else None

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._read(lambda db: self._user_where(db, "id=?", user_id))

    async def get_user_by_name(self, name: str) -> UserRecord | None:
        return await self._read(lambda db: self._user_where(db, "name=?", name))

    async def list_users(self) -> list[UserRecord]:
        def op(db: sqlite3.Connection) -> list[UserRecord]:
            rows = db.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, rowid")
            return [_user_record(r) for r in rows.fetchall()]

        return await self._read(op)

    async def delete_user(self, user_id: str) -> bool:
        def op() -> bool:
            db = self._w()
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM api_tokens WHERE user_id=?", (user_id,))
            db.execute("DELETE FROM user_prefs WHERE user_id=?", (user_id,))
            return db.execute("DELETE FROM users WHERE id=?", (user_id,)).rowcount > 0

        return await self._call(op)

    async def set_password(self, user_id: str, password_hash: str) -> None:
        def op() -> None:
            db = self._w()
            db.execute("UPDATE users SET password_hash=? WHERE id=?", (password_hash, user_id))
            db.execute("DELETE FROM login_sessions WHERE user_id=?", (user_id,))

        await self._call(op)

    async def create_login(self, token_hash: str, user_id: str, expires_at: float) -> None:
        def op() -> None:
            db = self._w()
            db.execute("DELETE FROM login_sessions WHERE expires_at<?", (time.time(),))
            db.execute(
                "INSERT INTO login_sessions (token_hash, user_id, expires_at, created_at) "
                "VALUES (?,?,?,?)",
                (token_hash, user_id, expires_at, time.time()),
            )

        await self._call(op)

    async def login_user(self, token_hash: str, now: float) -> UserRecord | None:
        def op(db: sqlite3.Connection) -> tuple[UserRecord | None, bool]:
            row = db.execute(
                "SELECT user_id, expires_at FROM login_sessions WHERE token_hash=?", (token_hash,)
            ).fetchone()
            if row is None:
                return None, False
            if row[1] < now:
                return None, True
            return self._user_where(db, "id=?", row[0]), False

        user, expired = await self._read(op)
        if expired:
            self._submit(
                lambda: self._w().execute(
                    "DELETE FROM login_sessions WHERE token_hash=?", (token_hash,)
                )
            )
        return user

    async def delete_login(self, token_hash: str) -> None:
        await self._call(
            lambda: self._w().execute(
                "DELETE FROM login_sessions WHERE token_hash=?", (token_hash,)
            )
        )

    async def create_token(self, token: TokenRecord) -> None:
        await self._call(
            lambda: self._w().execute(
                "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at) "
                "VALUES (?,?,?,?,?)",
                (token.id, token.user_id, token.name, token.token_hash, token.created_at),
            )
        )

    async def list_tokens(self) -> list[TokenRecord]:
        def op(db: sqlite3.Connection) -> list[TokenRecord]:
            rows = db.execute(
                "SELECT id, user_id, name, token_hash, created_at, last_used_at FROM api_tokens "
                "ORDER BY created_at, rowid"
            )
            return [TokenRecord(*r) for r in rows.fetchall()]

        return await self._read(op)

    async def revoke_token(self, token_id: str) -> bool:
        return await self._call(
            lambda: self._w().execute("DELETE FROM api_tokens WHERE id=?", (token_id,)).rowcount > 0
        )

    async def token_user(self, token_hash: str, now: str) -> UserRecord | None:
        def op(db: sqlite3.Connection) -> tuple[str, UserRecord | None] | None:
            row = db.execute(
                "SELECT id, user_id FROM api_tokens WHERE token_hash=?", (token_hash,)
            ).fetchone()
            return None if row is None else (row[0], self._user_where(db, "id=?", row[1]))

        found = await self._read(op)
        if found is None:
            return None
        token_id, user = found
        # Recording the last use is not worth a write per request.
        if self._token_touched.due(token_id):
            self._submit(
                lambda: self._w().execute(
                    "UPDATE api_tokens SET last_used_at=? WHERE id=?", (now, token_id)
                )
            )
        return user

    async def get_pref(self, user_id: str, key: str) -> str | None:
        def op(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT value FROM user_prefs WHERE user_id=? AND key=?", (user_id, key)
            ).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def set_pref(self, user_id: str, key: str, value: str | None) -> None:
        def op() -> None:
            db = self._w()
            if value is None:
                db.execute("DELETE FROM user_prefs WHERE user_id=? AND key=?", (user_id, key))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO user_prefs (user_id, key, value) VALUES (?,?,?)",
                    (user_id, key, value),
                )

        await self._call(op)

    async def list_logins(self, user_id: str | None = None) -> list[LoginRecord]:
        where = "expires_at>=?"
        args: list[Any] = [time.time()]
        if user_id is not None:
            where += " AND user_id=?"
            args.append(user_id)

        def op(db: sqlite3.Connection) -> list[LoginRecord]:
            rows = db.execute(
                "SELECT token_hash, user_id, created_at, expires_at FROM login_sessions "
                f"WHERE {where} ORDER BY COALESCE(created_at, 0) DESC, expires_at DESC",
                args,
            ).fetchall()
            return [LoginRecord(*r) for r in rows]

        return await self._read(op)


def _user_record(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(
        id=row[0], name=row[1], admin=bool(row[2]), password_hash=row[3], created_at=row[4]
    )
