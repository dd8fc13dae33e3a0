"""The PostgreSQL store's agents: the configuration's (written again at each start) and
those users made (agent ids are per user: the key is (owner_id, id)).
"""

from __future__ import annotations

import json
from typing import Any

from .connection import Conn
from .core import PostgresCore, _count

_AGENT_COLUMNS = (
    "id",
    "name",
    "description",
    "provider",
    "model",
    "system_prompt",
    "temperature",
    "tools",
    "builtin",
    "source",
    "owner_id",
)
_UPSERT_AGENT = (
    f"INSERT INTO agents ({', '.join(_AGENT_COLUMNS)}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) "
    "ON CONFLICT (owner_id, id) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in _AGENT_COLUMNS[1:-1])
)


class PostgresAgents(PostgresCore):
    async def sync_agents(self, agents: list[dict[str, Any]]) -> None:
        rows = [
            (
                a["id"],
                a["name"],
                a.get("description", ""),
                a.get("provider"),
                a.get("model"),
                a.get("system_prompt", ""),
                a.get("temperature"),
                json.dumps(a.get("tools", [])),
                bool(a.get("builtin")),
                "config",
                "",
            )
            for a in agents
        ]

        async def op(c: Conn) -> None:
            await c.execute("DELETE FROM agents WHERE source='config'")
            if rows:
                await c.executemany(_UPSERT_AGENT, rows)

        await self._call(op)

    async def list_custom_agents(self) -> list[dict[str, Any]]:
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT id, name, description, provider, model, system_prompt, temperature, "
                "tools, owner_id FROM agents WHERE source='user' ORDER BY pos"
            )
        )
        agents = [dict(r) for r in rows]
        for agent in agents:
            agent["tools"] = json.loads(agent["tools"] or "[]")
        return agents

    async def save_agent(self, row: dict[str, Any], owner_id: str) -> None:
        values = (
            row["id"],
            row["name"],
            row.get("description", ""),
            row.get("provider"),
            row.get("model"),
            row.get("system_prompt", ""),
            row.get("temperature"),
            json.dumps(row.get("tools", [])),
            False,
            "user",
            owner_id,
        )
        await self._call(lambda c: c.execute(_UPSERT_AGENT, *values))

    async def delete_agent(self, agent_id: str, owner_id: str) -> bool:
        status = await self._call(
            lambda c: c.execute(
                "DELETE FROM agents WHERE id=$1 AND owner_id=$2 AND source='user'",
                agent_id,
                owner_id,
            )
        )
        return _count(status) > 0
