"""One session's log in the PostgreSQL store: its messages and their files, its events
(the numbered frames a client replays on resume), its turns, the activity figures, and the
export as a standalone file (store/session_file.py). The turns a crash left running are found
with the leases (leases.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from ..base import (
    EventRow,
    FileRecord,
    MessageRecord,
    SessionActivity,
    SessionLog,
    StreamingMessage,
    Written,
)
from ..common import (
    _MESSAGE_COLUMNS,
    _TURN_FIELDS,
    _check_fields,
    _message,
    _message_rows,
    _message_update,
)
from ..session_file import EXPORT_TABLES, write_session_file
from .connection import Conn
from .core import PostgresCore


class PostgresLog(PostgresCore):
    async def open_log(self, session_id: str) -> SessionLog:
        async def op(c: Conn) -> SessionLog:
            lo, hi = await c.fetchrow(
                "SELECT MIN(seq), MAX(seq) FROM session_events WHERE session_id=$1", session_id
            )
            turns = await c.fetch(
                "SELECT id, client_message_id, status FROM turns WHERE session_id=$1 ORDER BY pos",
                session_id,
            )
            messages = await c.fetchval(
                "SELECT COUNT(*) FROM session_messages WHERE session_id=$1", session_id
            )
            streaming = [
                StreamingMessage(
                    r["id"],
                    r["turn_id"],
                    r["content"],
                    json.loads(r["meta"] or "{}").get("startSeq"),
                )
                for r in await c.fetch(
                    "SELECT id, turn_id, content, meta FROM session_messages "
                    "WHERE session_id=$1 AND status='streaming' ORDER BY pos",
                    session_id,
                )
            ]
            return SessionLog(
                last_seq=hi or 0,
                first_seq=lo if lo else (hi or 0) + 1,
                client_turns={
                    t["client_message_id"]: t["id"]
                    for t in turns
                    if t["client_message_id"] is not None
                },
                running_turns=[t["id"] for t in turns if t["status"] == "running"],
                streaming=streaming,
                messages=int(messages),
            )

        return await self._snapshot(op)

    async def session_activity(self, session_id: str) -> SessionActivity:
        async def op(c: Conn) -> tuple[Any, list[Any]]:
            counts = await c.fetchrow(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE role='assistant'), "
                "COUNT(*) FILTER (WHERE role='tool'), "
                "COUNT(*) FILTER (WHERE role='assistant' AND status='error') "
                "FROM session_messages WHERE session_id=$1",
                session_id,
            )
            # Only the `done` frames (one per turn), parsed here: PostgreSQL's json input
            # refuses the escaped lone surrogates a logged frame may hold.
            done = await c.fetch(
                "SELECT frame FROM session_events WHERE session_id=$1 AND frame LIKE $2",
                session_id,
                '%"type":"done"%',
            )
            return counts, done

        counts, done = await self._pooled(op)
        activity = SessionActivity(counts[0], counts[1], counts[2], counts[3])
        for row in done:
            frame = json.loads(row[0])
            if frame.get("type") == "done" and frame.get("rounds"):
                activity.rounds += frame["rounds"]
                activity.llm_ms += (frame.get("latency") or {}).get("llmMs") or 0
        return activity

    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]:
        data_col = "data" if with_file_data else "''::bytea AS data"

        async def op(c: Conn) -> list[MessageRecord]:
            rows = await c.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM session_messages WHERE session_id=$1 ORDER BY pos",
                session_id,
            )
            files: dict[str, list[FileRecord]] = {}
            for f in await c.fetch(
                f"SELECT message_id, id, filename, mime_type, size, {data_col}, text "
                "FROM session_files WHERE session_id=$1 ORDER BY pos",
                session_id,
            ):
                files.setdefault(f["message_id"], []).append(
                    FileRecord(
                        f["id"], f["filename"], f["mime_type"], f["size"], f["data"], f["text"]
                    )
                )
            return [_message(tuple(r), files.get(r["id"], [])) for r in rows]

        return await self._snapshot(op)

    def add_message(self, session_id: str, message: MessageRecord) -> Written:
        row, files = _message_rows(session_id, message)

        async def op(c: Conn) -> None:
            await c.execute(
                "INSERT INTO session_messages (id, session_id, role, content, tool_calls, "
                "tool_result, token_count, created_at, turn_id, status, reasoning, meta) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
                *row,
            )
            if files:
                await c.executemany(
                    "INSERT INTO session_files (id, session_id, message_id, filename, "
                    "mime_type, size, data, text) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
                    files,
                )

        return self._submit(op)

    def update_message(self, session_id: str, message_id: str, **fields: Any) -> Written:
        fields = _message_update(fields)
        sets = ", ".join(f"{k}=${i}" for i, k in enumerate(fields, 3))
        values = list(fields.values())
        sql = f"UPDATE session_messages SET {sets} WHERE id=$1 AND session_id=$2"
        return self._submit(lambda c: c.execute(sql, message_id, session_id, *values))

    def delete_messages(
        self, session_id: str, message_ids: list[str], forget_turns: list[str] | None = None
    ) -> Written:
        async def op(c: Conn) -> None:
            for table, column in (("session_files", "message_id"), ("session_messages", "id")):
                await c.execute(
                    f"DELETE FROM {table} WHERE session_id=$1 AND {column} = ANY($2::text[])",
                    session_id,
                    message_ids,
                )
            if forget_turns:
                await c.execute(
                    "UPDATE turns SET client_message_id=NULL "
                    "WHERE session_id=$1 AND id = ANY($2::text[])",
                    session_id,
                    forget_turns,
                )

        return self._submit(op)

    def append_events(self, session_id: str, events: list[EventRow]) -> Written:
        return self._submit([(session_id, seq, turn_id, frame) for seq, turn_id, frame in events])

    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]:
        if turn_id is None:
            rows = await self._pooled(
                lambda c: c.fetch(
                    "SELECT seq, frame FROM session_events WHERE session_id=$1 AND seq>$2 "
                    "ORDER BY seq",
                    session_id,
                    after_seq,
                )
            )
            return [(r[0], r[1]) for r in rows]
        # A turn's events are one run of seqs from its first one (turns do not overlap): a
        # range scan of the primary key from there, no index on turn ids needed.
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT seq, frame FROM session_events WHERE session_id=$1 AND turn_id=$3 "
                "AND seq > GREATEST($2, COALESCE((SELECT start_seq - 1 FROM turns "
                "WHERE id=$3 AND session_id=$1), $2)) ORDER BY seq",
                session_id,
                after_seq,
                turn_id,
            )
        )
        return [(r[0], r[1]) for r in rows]

    async def turn_start_seq(self, session_id: str, turn_id: str) -> int | None:
        value = await self._pooled(
            lambda c: c.fetchval(
                "SELECT start_seq FROM turns WHERE id=$1 AND session_id=$2", turn_id, session_id
            )
        )
        return int(value) if value is not None else None

    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> Written:
        _check_fields(fields, _TURN_FIELDS)
        cols = ", ".join(["id", "session_id", *fields])
        marks = ", ".join(f"${i}" for i in range(1, len(fields) + 3))
        updates = ", ".join(f"{k}=excluded.{k}" for k in fields) or "id=excluded.id"
        values = [turn_id, session_id, *fields.values()]
        sql = (
            f"INSERT INTO turns ({cols}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}"
        )
        return self._submit(lambda c: c.execute(sql, *values))

    def prune_events(self, session_id: str, below_seq: int) -> Written:
        return self._submit(
            lambda c: c.execute(
                "DELETE FROM session_events WHERE session_id=$1 AND seq<$2", session_id, below_seq
            )
        )

    async def export_session(self, session_id: str, path: str) -> bool:
        async def op(c: Conn) -> dict[str, list[Sequence[Any]]] | None:
            if await c.fetchval("SELECT 1 FROM sessions WHERE id=$1", session_id) is None:
                return None
            return {
                table: [
                    tuple(r)
                    for r in await c.fetch(
                        f"SELECT {columns} FROM {table} WHERE session_id=$1 ORDER BY "
                        + ("pos" if order == "rowid" else order),
                        session_id,
                    )
                ]
                for table, columns, order in EXPORT_TABLES
            }

        tables = await self._snapshot(op)
        if tables is None:
            return False
        await asyncio.to_thread(write_session_file, path, lambda table, _c, _o: tables[table])
        return True

    async def get_session_file(self, session_id: str, file_id: str) -> FileRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(
                "SELECT id, filename, mime_type, size, data, text FROM session_files "
                "WHERE session_id=$1 AND id=$2",
                session_id,
                file_id,
            )
        )
        return FileRecord(**dict(row)) if row else None
