"""The SQLite store's agents: the configuration's (written again at each start) and
those users made (agent ids are per user: the key is (owner_id, id)).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .core import SqliteCore


class SqliteAgents(SqliteCore):
    async def sync_agents(self, agents: list[dict[str, Any]]) -> None:
        def op() -> None:
            db = self._w()
            db.execute("DELETE FROM agents WHERE source='config'")
            db.executemany(
                "INSERT OR REPLACE INTO agents (id, name, description, provider, model, "
                "system_prompt, temperature, tools, builtin, source) "
                "VALUES (:id,:name,:description,:provider,:model,:system_prompt,:temperature,"
                ":tools,:builtin,'config')",
                [{**a, "tools": json.dumps(a.get("tools", []))} for a in agents],
            )

        await self._call(op)

    async def list_custom_agents(self) -> list[dict[str, Any]]:
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = db.execute(
                "SELECT id, name, description, provider, model, system_prompt, temperature, "
                "tools, owner_id FROM agents WHERE source='user' ORDER BY rowid"
            )
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            for row in rows:
                row["tools"] = json.loads(row["tools"] or "[]")
            return rows

        return await self._read(op)

    async def save_agent(self, row: dict[str, Any], owner_id: str) -> None:
        values = {**row, "tools": json.dumps(row.get("tools", [])), "owner_id": owner_id}
        await self._call(
            lambda: self._w().execute(
                "INSERT OR REPLACE INTO agents (id, name, description, provider, model, "
                "system_prompt, temperature, tools, builtin, source, owner_id) "
                "VALUES (:id,:name,:description,:provider,:model,:system_prompt,:temperature,"
                ":tools,0,'user',:owner_id)",
                values,
            )
        )

    async def delete_agent(self, agent_id: str, owner_id: str) -> bool:
        return await self._call(
            lambda: (
                self._w()
                .execute(
                    "DELETE FROM agents WHERE id=? AND owner_id=? AND source='user'",
                    (agent_id, owner_id),
                )
                .rowcount
                > 0
            )
        )
