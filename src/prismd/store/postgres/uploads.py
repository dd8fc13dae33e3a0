"""The PostgreSQL store's uploads, their links to the sessions that use them
(`upload_refs`), their removal once no session refers to them, and the daily chat totals
(`chat_usage`) the limits check.

Uploads are stored in the database (`uploads.data`, a `bytea` column), not on disk, so that
every machine serves every upload with nothing shared but the database; an upload is one
transaction, so no process ever sees half of one.
"""

from __future__ import annotations

from typing import Any

from ..base import UploadRecord, Written
from ..common import _UNREFERENCED, _upload_row
from .connection import Conn
from .core import PostgresCore


class PostgresUploads(PostgresCore):
    async def save_upload(self, upload: UploadRecord) -> None:
        """The bytes go into the database (`uploads.data`), in a transaction of its own on
        the pool (not the writer, which would hold up every stream's events for a 10 MB
        file): every process on every machine serves it, and none sees half of it."""
        await self._pooled(
            lambda c: c.execute(
                "INSERT INTO uploads (id, user_id, filename, mime_type, size, created_at, data) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7)",
                *_upload_row(upload),
                upload.data,
            )
        )

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(
                "SELECT id, user_id, filename, mime_type, size, created_at, data FROM uploads "
                "WHERE id=$1",
                upload_id,
            )
        )
        return UploadRecord(**dict(row)) if row else None

    async def upload_usage(self, user_id: str) -> tuple[int, int]:
        row = await self._pooled(
            lambda c: c.fetchrow(
                "SELECT COALESCE(SUM(size), 0) AS size, COUNT(*) AS files FROM uploads "
                "WHERE user_id=$1",
                user_id,
            )
        )
        return int(row["size"]), int(row["files"])

    async def _remove_uploads(self, where: str, *args: Any) -> int:
        """Delete the uploads matching `where` (their bytes are in the row) and their links."""

        async def op(c: Conn) -> int:
            ids = [
                r["id"]
                for r in await c.fetch(f"DELETE FROM uploads WHERE {where} RETURNING id", *args)
            ]
            if ids:
                await c.execute("DELETE FROM upload_refs WHERE upload_id = ANY($1::text[])", ids)
            return len(ids)

        return int(await self._call(op))

    async def delete_upload(self, upload_id: str) -> bool:
        return await self._remove_uploads("id=$1", upload_id) > 0

    def link_uploads(self, session_id: str, upload_ids: list[str]) -> Written:
        rows = [(u, session_id) for u in dict.fromkeys(upload_ids)]
        return self._submit(
            lambda c: c.executemany(
                "INSERT INTO upload_refs (upload_id, session_id) VALUES ($1,$2) "
                "ON CONFLICT DO NOTHING",
                rows,
            )
        )

    async def delete_session_uploads(self, session_id: str) -> int:
        async def forget(c: Conn) -> list[str]:
            rows = await c.fetch(
                "DELETE FROM upload_refs WHERE session_id=$1 RETURNING upload_id", session_id
            )
            return [r["upload_id"] for r in rows]

        ids = await self._call(forget)
        if not ids:
            return 0
        return await self._remove_uploads(f"id = ANY($1::text[]) AND {_UNREFERENCED}", ids)

    async def prune_uploads(self, created_before: str) -> int:
        return await self._remove_uploads(f"created_at < $1 AND {_UNREFERENCED}", created_before)

    async def chat_usage(self, user_id: str, day: str) -> tuple[int, int]:
        row = await self._pooled(
            lambda c: c.fetchrow(
                "SELECT bytes, files FROM chat_usage WHERE user_id=$1 AND day=$2", user_id, day
            )
        )
        return (int(row["bytes"]), int(row["files"])) if row else (0, 0)

    def add_chat_usage(self, user_id: str, day: str, size: int, files: int) -> Written:
        async def op(c: Conn) -> None:
            await c.execute("DELETE FROM chat_usage WHERE user_id=$1 AND day<$2", user_id, day)
            await c.execute(
                "INSERT INTO chat_usage (user_id, day, bytes, files) VALUES ($1,$2,$3,$4) "
                "ON CONFLICT (user_id, day) DO UPDATE SET bytes=chat_usage.bytes+excluded.bytes, "
                "files=chat_usage.files+excluded.files",
                user_id,
                day,
                size,
                files,
            )

        return self._submit(op)
