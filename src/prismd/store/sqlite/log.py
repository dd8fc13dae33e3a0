"""One session's log in the SQLite store: its messages and their files, its events
(the numbered frames a client replays on resume), its turns, the turns a crash left running,
the activity figures, and the export as a standalone file (store/session_file.py).
"""

from __future__ import annotations

import json
import sqlite3
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
from ..session_file import write_session_file
from .core import SqliteCore


class SqliteLog(SqliteCore):
    async def open_log(self, session_id: str) -> SessionLog:
        def op(db: sqlite3.Connection) -> SessionLog:
            lo, hi = db.execute(
                "SELECT MIN(seq), MAX(seq) FROM session_events WHERE session_id=?", (session_id,)
            ).fetchone()
            turns = db.execute(
                "SELECT id, client_message_id, status FROM turns WHERE session_id=?",
                (session_id,),
            ).fetchall()
            (messages,) = db.execute(
                "SELECT COUNT(*) FROM session_messages WHERE session_id=?", (session_id,)
            ).fetchone()
            streaming = [
                StreamingMessage(mid, turn_id, content, json.loads(meta or "{}").get("startSeq"))
                for mid, turn_id, content, meta in db.execute(
                    "SELECT id, turn_id, content, meta FROM session_messages "
                    "WHERE session_id=? AND status='streaming' ORDER BY rowid",
                    (session_id,),
                )
            ]
            return SessionLog(
                last_seq=hi or 0,
                first_seq=lo if lo else (hi or 0) + 1,
                client_turns={cmid: tid for tid, cmid, _ in turns if cmid is not None},
                running_turns=[tid for tid, _, status in turns if status == "running"],
                streaming=streaming,
                messages=messages,
            )

        return await self._read(op)

    async def crashed_sessions(self) -> list[str]:
        return await self._read(
            lambda db: [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT session_id FROM turns WHERE status='running'"
                ).fetchall()
            ]
        )

    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]:
        return await self._read(lambda db: _messages(db, session_id, with_file_data))

    def add_message(self, session_id: str, message: MessageRecord) -> Written:
        row, files = _message_rows(session_id, message)

        def op() -> None:
            db = self._w()
            db.execute(
                "INSERT INTO session_messages (id, session_id, role, content, tool_calls, "
                "tool_result, token_count, created_at, turn_id, status, reasoning, meta) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            if files:
                db.executemany(
                    "INSERT INTO session_files (id, session_id, message_id, filename, "
                    "mime_type, size, data, text) VALUES (?,?,?,?,?,?,?,?)",
                    files,
                )

        return self._submit(op)

    def update_message(self, session_id: str, message_id: str, **fields: Any) -> Written:
        fields = _message_update(fields)
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [*fields.values(), message_id, session_id]
        return self._submit(
            lambda: self._w().execute(
                f"UPDATE session_messages SET {sets} WHERE id=? AND session_id=?", values
            )
        )

    def delete_messages(
        self, session_id: str, message_ids: list[str], forget_turns: list[str] | None = None
    ) -> Written:
        def op() -> None:
            db = self._w()
            ids = [(session_id, m) for m in message_ids]
            db.executemany("DELETE FROM session_files WHERE session_id=? AND message_id=?", ids)
            db.executemany("DELETE FROM session_messages WHERE session_id=? AND id=?", ids)
            db.executemany(
                "UPDATE turns SET client_message_id=NULL WHERE session_id=? AND id=?",
                [(session_id, t) for t in forget_turns or ()],
            )

        return self._submit(op)

    def append_events(self, session_id: str, events: list[EventRow]) -> Written:
        rows = [(session_id, seq, turn_id, frame) for seq, turn_id, frame in events]
        return self._submit(
            lambda: self._w().executemany(
                "INSERT INTO session_events (session_id, seq, turn_id, frame) VALUES (?,?,?,?)",
                rows,
            )
        )

    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]:
        def op(db: sqlite3.Connection) -> list[tuple[int, str]]:
            if turn_id is None:
                return db.execute(
                    "SELECT seq, frame FROM session_events WHERE session_id=? AND seq>? "
                    "ORDER BY seq",
                    (session_id, after_seq),
                ).fetchall()
            # A turn's events are one run of seqs from its first one (turns do not overlap):
            # a range scan of the primary key, no index on turn ids needed.
            start = db.execute(
                "SELECT start_seq FROM turns WHERE id=? AND session_id=?", (turn_id, session_id)
            ).fetchone()
            low = max(after_seq, (start[0] or 1) - 1) if start else after_seq
            return [
                (seq, frame)
                for seq, tid, frame in db.execute(
                    "SELECT seq, turn_id, frame FROM session_events WHERE session_id=? AND seq>? "
                    "ORDER BY seq",
                    (session_id, low),
                )
                if tid == turn_id
            ]

        return await self._read(op)

    async def turn_start_seq(self, session_id: str, turn_id: str) -> int | None:
        def op(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT start_seq FROM turns WHERE id=? AND session_id=?", (turn_id, session_id)
            ).fetchone()
            return row[0] if row else None

        return await self._read(op)

    async def session_activity(self, session_id: str) -> SessionActivity:
        def op(db: sqlite3.Connection) -> SessionActivity:
            messages, assistant, tool, errors = db.execute(
                "SELECT COUNT(*), TOTAL(role='assistant'), TOTAL(role='tool'), "
                "TOTAL(role='assistant' AND status='error') "
                "FROM session_messages WHERE session_id=?",
                (session_id,),
            ).fetchone()
            # The LIKE skips the parse of every other event (chunks are most of the log).
            rounds, llm_ms = db.execute(
                "SELECT TOTAL(json_extract(frame, '$.rounds')), "
                "TOTAL(json_extract(frame, '$.latency.llmMs')) FROM session_events "
                "WHERE session_id=? AND frame LIKE ? "
                "AND json_extract(frame, '$.type')='done' AND json_extract(frame, '$.rounds')>0",
                (session_id, '%"type":"done"%'),
            ).fetchone()
            return SessionActivity(
                messages, int(assistant), int(tool), int(errors), int(rounds), llm_ms
            )

        return await self._read(op)

    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> Written:
        _check_fields(fields, _TURN_FIELDS)
        cols = ", ".join(["id", "session_id", *fields])
        marks = ", ".join("?" * (len(fields) + 2))
        updates = ", ".join(f"{k}=excluded.{k}" for k in fields) or "id=id"
        values = [turn_id, session_id, *fields.values()]
        return self._submit(
            lambda: self._w().execute(
                f"INSERT INTO turns ({cols}) VALUES ({marks}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                values,
            )
        )

    def prune_events(self, session_id: str, below_seq: int) -> Written:
        return self._submit(
            lambda: self._w().execute(
                "DELETE FROM session_events WHERE session_id=? AND seq<?", (session_id, below_seq)
            )
        )

    async def export_session(self, session_id: str, path: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,)).fetchone() is None:
                return False
            write_session_file(
                path,
                lambda table, columns, order: db.execute(
                    f"SELECT {columns} FROM {table} WHERE session_id=? ORDER BY {order}",
                    (session_id,),
                ),
            )
            return True

        return await self._read(op)

    async def get_session_file(self, session_id: str, file_id: str) -> FileRecord | None:
        def op(db: sqlite3.Connection) -> FileRecord | None:
            row = db.execute(
                "SELECT id, filename, mime_type, size, data, text FROM session_files "
                "WHERE session_id=? AND id=?",
                (session_id, file_id),
            ).fetchone()
            return FileRecord(*row) if row else None

        return await self._read(op)


def _messages(db: sqlite3.Connection, session_id: str, with_data: bool) -> list[MessageRecord]:
    rows = db.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM session_messages WHERE session_id=? ORDER BY rowid",
        (session_id,),
    ).fetchall()
    data_col = "data" if with_data else "x''"
    files: dict[str, list[FileRecord]] = {}
    for mid, fid, name, mime, size, data, text in db.execute(
        f"SELECT message_id, id, filename, mime_type, size, {data_col}, text "
        "FROM session_files WHERE session_id=? ORDER BY rowid",
        (session_id,),
    ):
        files.setdefault(mid, []).append(FileRecord(fid, name, mime, size, data, text))
    return [_message(r, files.get(r[0], [])) for r in rows]
