"""The PostgreSQL store's sessions: their rows (create, get, list with filters and
search, update, delete along with their log) and the usage totals summed over their turns. A
session's log (messages, events, turns) is in log.py; who runs a session's turn, in leases.py.
"""

from __future__ import annotations

from typing import Any

from ..base import SessionRecord, UsageTotals, Written
from ..common import (
    _COUNTED_TURN,
    _SESSION_COLUMNS,
    _SESSION_FIELDS,
    _check_fields,
    _name_pattern,
    _session_row,
)
from .connection import Conn
from .core import PostgresCore, _count


class PostgresSessions(PostgresCore):
    def create_session(self, record: SessionRecord) -> Written:
        row = _session_row(record)
        marks = ",".join(f"${i}" for i in range(1, len(row) + 1))
        sql = (
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({marks}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        return self._submit(lambda c: c.execute(sql, *row))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._pooled(
            lambda c: c.fetchrow(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=$1", session_id)
        )
        return SessionRecord(**dict(row)) if row else None

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

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if agent_id:
            conds.append(f"agent_id={arg(agent_id)}")
        if owner_id is not None:
            conds.append(f"owner_id={arg(owner_id)}")
        if query:
            conds.append(f"name ILIKE {arg(_name_pattern(query))} ESCAPE '\\'")
        if statuses is not None:
            conds.append(f"status = ANY({arg(list(statuses))}::text[])")
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        sort = "started_at" if order == "started" else "COALESCE(last_turn_at, started_at)"
        count_args = list(args)
        page = f"LIMIT {arg(limit)} OFFSET {arg(offset)}"

        async def op(c: Conn) -> tuple[list[SessionRecord], int]:
            total = await c.fetchval(f"SELECT COUNT(*) FROM sessions {where}", *count_args)
            rows = await c.fetch(
                f"SELECT {_SESSION_COLUMNS} FROM sessions {where} "
                f"ORDER BY {sort} DESC, pos DESC {page}",
                *args,
            )
            return [SessionRecord(**dict(r)) for r in rows], int(total)

        return await self._snapshot(op)

    def update_session(self, session_id: str, **fields: Any) -> Written:
        _check_fields(fields, _SESSION_FIELDS)
        sets = ", ".join(f"{k}=${i}" for i, k in enumerate(fields, 2))
        values = list(fields.values())
        return self._submit(
            lambda c: c.execute(f"UPDATE sessions SET {sets} WHERE id=$1", session_id, *values)
        )

    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> Written:
        return self._submit(
            lambda c: c.execute(
                "UPDATE sessions SET turn_count=turn_count+1, last_turn_at=$2, "
                "tokens_in=tokens_in+$3, tokens_out=tokens_out+$4, "
                "cost_usd=CASE WHEN $5::float8 IS NULL THEN cost_usd "
                "ELSE COALESCE(cost_usd,0)+$5::float8 END WHERE id=$1",
                session_id,
                at,
                tokens_in,
                tokens_out,
                cost_usd,
            )
        )

    async def delete_session(self, session_id: str) -> bool:
        async def op(c: Conn) -> bool:
            for table in ("session_messages", "session_files", "session_events", "turns"):
                await c.execute(f"DELETE FROM {table} WHERE session_id=$1", session_id)
            return _count(await c.execute("DELETE FROM sessions WHERE id=$1", session_id)) > 0

        return bool(await self._call(op))

    async def usage_totals(self, owner_id: str | None, since: str | None = None) -> UsageTotals:
        conds = [_COUNTED_TURN]
        args: list[Any] = []
        if owner_id is not None:
            args.append(owner_id)
            conds.append(f"s.owner_id=${len(args)}")
        if since is not None:
            args.append(since)
            conds.append(f"t.ended_at>=${len(args)}")
        row = await self._pooled(
            lambda c: c.fetchrow(
                "SELECT COUNT(*) AS turns, COALESCE(SUM(t.tokens_in), 0) AS tin, "
                "COALESCE(SUM(t.tokens_out), 0) AS tout, COALESCE(SUM(t.cost_usd), 0) AS cost, "
                "COUNT(*) FILTER (WHERE t.cost_usd IS NULL) AS unpriced, "
                "COUNT(DISTINCT t.session_id) AS sessions "
                "FROM turns t JOIN sessions s ON s.id = t.session_id "
                f"WHERE {' AND '.join(conds)}",
                *args,
            )
        )
        return UsageTotals(
            int(row["turns"]),
            int(row["tin"]),
            int(row["tout"]),
            float(row["cost"]),
            int(row["unpriced"]),
            int(row["sessions"]),
        )
