"""The SQLite store's sessions: their rows (create, get, list with filters and
search, update, delete along with their log) and the usage totals summed over their turns. A
session's log (messages, events, turns) is in log.py.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..base import SessionRecord, UsageTotals, Written
from ..common import (
    _COUNTED_TURN,
    _SESSION_COLUMNS,
    _SESSION_FIELDS,
    _SESSION_FIELDS_ORDER,
    _check_fields,
    _name_pattern,
    _session_row,
)
from .core import SqliteCore

_SESSION_MARKS = ",".join("?" * len(_SESSION_FIELDS_ORDER))


class SqliteSessions(SqliteCore):
    def create_session(self, record: SessionRecord) -> Written:
        row = _session_row(record)
        return self._submit(
            lambda: self._w().execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({_SESSION_MARKS}) "
                "ON CONFLICT(id) DO NOTHING",
                row,
            )
        )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def op(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=?", (session_id,)
            ).fetchone()
            return _session_record(row) if row else None

        return await self._read(op)

    async def list_sessions(
        self,
        limit: int,
        offset: int,
        agent_id: str | None = None,
        *,
        owner_id: str | None = None,
        query: str | None = None,
        statuses: tuple[str, ...] | None = None,
        order: str = "activity",
    ) -> tuple[list[SessionRecord], int]:
        conds: list[str] = []
        args: list[Any] = []
        if agent_id:
            conds.append("agent_id=?")
            args.append(agent_id)
        if owner_id is not None:
            conds.append("owner_id=?")
            args.append(owner_id)
        if query:
            conds.append("name LIKE ? ESCAPE '\\'")
            args.append(_name_pattern(query))
        if statuses is not None:
            conds.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        sort = "started_at" if order == "started" else "COALESCE(last_turn_at, started_at)"

        def op(db: sqlite3.Connection) -> tuple[list[SessionRecord], int]:
            total = db.execute(f"SELECT COUNT(*) FROM sessions {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions {where} "
                f"ORDER BY {sort} DESC, rowid DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [_session_record(r) for r in rows], total

        return await self._read(op)

    def update_session(self, session_id: str, **fields: Any) -> Written:
        _check_fields(fields, _SESSION_FIELDS)
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [*fields.values(), session_id]
        return self._submit(
            lambda: self._w().execute(f"UPDATE sessions SET {sets} WHERE id=?", values)
        )

    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> Written:
        return self._submit(
            lambda: self._w().execute(
                "UPDATE sessions SET turn_count=turn_count+1, last_turn_at=?, "
                "tokens_in=tokens_in+?, tokens_out=tokens_out+?, "
                "cost_usd=CASE WHEN ? IS NULL THEN cost_usd ELSE COALESCE(cost_usd,0)+? END "
                "WHERE id=?",
                (at, tokens_in, tokens_out, cost_usd, cost_usd, session_id),
            )
        )

    async def delete_session(self, session_id: str) -> bool:
        def op() -> bool:
            db = self._w()
            for table in ("session_messages", "session_files", "session_events", "turns"):
                db.execute(f"DELETE FROM {table} WHERE session_id=?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id=?", (session_id,)).rowcount > 0

        return await self._call(op)

    async def usage_totals(self, owner_id: str | None, since: str | None = None) -> UsageTotals:
        conds = [_COUNTED_TURN]
        args: list[Any] = []
        if owner_id is not None:
            conds.append("s.owner_id=?")
            args.append(owner_id)
        if since is not None:
            conds.append("t.ended_at>=?")
            args.append(since)

        def op(db: sqlite3.Connection) -> UsageTotals:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(t.tokens_in), 0), COALESCE(SUM(t.tokens_out), 0), "
                "COALESCE(SUM(t.cost_usd), 0), COALESCE(SUM(t.cost_usd IS NULL), 0), "
                "COUNT(DISTINCT t.session_id) "
                "FROM turns t JOIN sessions s ON s.id = t.session_id "
                f"WHERE {' AND '.join(conds)}",
                args,
            ).fetchone()
            return UsageTotals(
                int(row[0]), int(row[1]), int(row[2]), float(row[3]), int(row[4]), int(row[5])
            )

        return await self._read(op)


def _session_record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(**dict(zip(_SESSION_FIELDS_ORDER, row, strict=True)))
