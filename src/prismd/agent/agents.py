"""The agents a turn can run as: the built-in `assistant` plus those of the config file."""

from __future__ import annotations

from typing import Any

from ..config import AgentSettings, Settings
from ..protocol import ErrorCode, ProtocolError


class AgentDirectory:
    def __init__(self, settings: Settings) -> None:
        self._agents = {a.id: a for a in settings.all_agents()}
        self.default_id = settings.default_agent

    def get(self, agent_id: str | None) -> AgentSettings:
        agent = self._agents.get(agent_id or self.default_id)
        if agent is None:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f'Agent "{agent_id}" not found')
        return agent

    def all(self) -> list[AgentSettings]:
        return list(self._agents.values())

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "id": a.id,
                "name": a.name,
                "description": a.description,
                "provider": a.provider,
                "model": a.model,
                "system_prompt": a.system_prompt,
                "temperature": a.temperature,
                "tools": a.tools,
                "builtin": int(a.id == "assistant"),
            }
            for a in self._agents.values()
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
