"""The agents a turn can run as: the built-in `assistant`, those of the config file, and those
users create over the API (stored in the core database, each with its owner)."""

from __future__ import annotations

from typing import Any

from ..config import AgentSettings, Settings
from ..protocol import ErrorCode, ProtocolError


class AgentDirectory:
    def __init__(self, settings: Settings) -> None:
        self._agents = {a.id: a for a in settings.all_agents()}
        self._config_ids = frozenset(self._agents)
        self.owners: dict[str, str] = {}  # created agent id -> owner user id
        self.default_id = settings.default_agent

    def visible(self, agent_id: str, user_id: str | None, admin: bool = False) -> bool:
        """Config agents are everyone's; a created agent only its owner's (and admins')."""
        owner = self.owners.get(agent_id)
        return owner is None or user_id is None or admin or owner == user_id

    def get(
        self, agent_id: str | None, user_id: str | None = None, admin: bool = False
    ) -> AgentSettings:
        wanted = agent_id or self.default_id
        agent = self._agents.get(wanted)
        if agent is None or not self.visible(wanted, user_id, admin):
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f'Agent "{agent_id}" not found')
        return agent

    def find(self, agent_id: str) -> AgentSettings | None:
        return self._agents.get(agent_id)

    def is_config(self, agent_id: str) -> bool:
        return agent_id in self._config_ids

    def all(self, user_id: str | None = None, admin: bool = False) -> list[AgentSettings]:
        return [a for a in self._agents.values() if self.visible(a.id, user_id, admin)]

    def add(self, agent: AgentSettings, owner_id: str) -> None:
        self._agents[agent.id] = agent
        self.owners[agent.id] = owner_id

    def remove(self, agent_id: str) -> None:
        if agent_id not in self._config_ids:
            self._agents.pop(agent_id, None)
            self.owners.pop(agent_id, None)

    def rows(self) -> list[dict[str, Any]]:
        return [
            row(a) | {"builtin": int(a.id == "assistant")}
            for a in self._agents.values()
            if a.id in self._config_ids
        ]

    @staticmethod
    def to_json(a: AgentSettings, default_id: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "name": a.name,
            "description": a.description,
            "provider": a.provider,
            "model": a.model,
            "temperature": a.temperature,
            "tools": a.tools,
            "default": a.id == default_id,
        }


def row(a: AgentSettings) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "description": a.description,
        "provider": a.provider,
        "model": a.model,
        "system_prompt": a.system_prompt,
        "temperature": a.temperature,
        "tools": a.tools,
    }
