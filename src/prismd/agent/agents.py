"""The agents a turn can run as: the built-in `assistant`, those of the config file, and those
users create over the API (stored in the core database, each with its owner).

Agent ids are per user. The config file's agents are everyone's and their ids are global; an
agent a user creates lives in that user's namespace, so two users may each have an agent
`helper` and neither can tell that the other's exists (creating an id another user holds
answers exactly like a free id: 201). Sessions, workspaces and memory notes already belong to
the session's owner, so (owner, agent id) names an agent everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..config import AgentSettings, Settings
from ..protocol import ErrorCode, ProtocolError


@dataclass(frozen=True, slots=True)
class Found:
    agent: AgentSettings
    owner: str | None  # None: from the config file (everyone's)


log = logging.getLogger(__name__)


class AgentDirectory:
    def __init__(self, settings: Settings) -> None:
        self._config = {a.id: a for a in settings.all_agents()}
        # (owner user id, agent id) -> a created agent, in creation order.
        self._created: dict[tuple[str, str], AgentSettings] = {}
        self.default_id = settings.default_agent

    def lookup(
        self, agent_id: str | None, user_id: str | None = None, admin: bool = False
    ) -> Found | None:
        """The agent `agent_id` as `user_id` names it: their own created agent, else a config
        agent; for an admin, else the oldest created agent of that id of any user (admins see
        everyone's). `user_id` None: config agents only."""
        if agent_id is None:
            return None
        if user_id is not None:
            own = self._created.get((user_id, agent_id))
            if own is not None:
                return Found(own, user_id)
        config = self._config.get(agent_id)
        if config is not None:
            return Found(config, None)
        if admin:
            for (owner, aid), agent in self._created.items():
                if aid == agent_id:
                    return Found(agent, owner)
        return None

    def get(
        self, agent_id: str | None, user_id: str | None = None, admin: bool = False
    ) -> AgentSettings:
        """Like `lookup` (None: the server's default agent); raises `agent_not_found`."""
        found = self.lookup(agent_id or self.default_id, user_id, admin)
        if found is None:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f'Agent "{agent_id}" not found')
        return found.agent

    def find(
        self, agent_id: str, user_id: str | None = None, admin: bool = False
    ) -> AgentSettings | None:
        found = self.lookup(agent_id, user_id, admin)
        return found.agent if found is not None else None

    def taken(self, agent_id: str, owner_id: str) -> bool:
        """Whether `owner_id` cannot create `agent_id`: a config agent's id (public) or one of
        their own. Another user's agent of that id does not count (ids are per user)."""
        return agent_id in self._config or (owner_id, agent_id) in self._created

    def entries(self, user_id: str | None = None, admin: bool = False) -> list[Found]:
        """Config agents, then the user's created ones (an admin: everyone's)."""
        found = [Found(a, None) for a in self._config.values()]
        found += [
            Found(agent, owner)
            for (owner, _), agent in self._created.items()
            if admin or owner == user_id
        ]
        return found

    def all(self, user_id: str | None = None, admin: bool = False) -> list[AgentSettings]:
        return [f.agent for f in self.entries(user_id, admin)]

    def add(self, agent: AgentSettings, owner_id: str) -> None:
        """A created agent (new or changed); a config agent's id is never shadowed."""
        if agent.id not in self._config:
            self._created[(owner_id, agent.id)] = agent

    def load(self, rows: list[dict[str, Any]], default_owner: str) -> None:
        """The stored created agents (at start). One that breaks today's bounds (stored before
        they existed) is left out with a warning, not fatal: it stays in the database."""
        for stored in rows:
            owner = stored.pop("owner_id", None) or default_owner
            try:
                agent = AgentSettings.model_validate(stored)
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                field = ".".join(str(p) for p in err["loc"])
                log.warning(
                    "stored agent %r of user %s not loaded: %s: %s",
                    str(stored.get("id"))[:64],
                    owner,
                    field,
                    err["msg"],
                )
                continue
            self.add(agent, owner)

    def remove(self, agent_id: str, owner_id: str) -> None:
        self._created.pop((owner_id, agent_id), None)

    def rows(self) -> list[dict[str, Any]]:
        return [row(a) | {"builtin": int(a.id == "assistant")} for a in self._config.values()]

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
