"""All tools of the server, and the per-turn view of one agent's allowed tools.

The registry is built once (built-ins plus what the MCP servers offer); a turn never mutates it.
An agent's policy decides which tools it sees and which need the user's approval.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ..config import AgentSettings, Settings
from ..providers.base import ToolDef
from .base import Tool, ToolError


def matches(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


@dataclass(slots=True)
class ToolView:
    """The tools one turn may use, with the agent's approval policy applied."""

    agent: AgentSettings
    tools: dict[str, Tool]
    _defs: list[ToolDef] | None = None

    def definitions(self) -> list[ToolDef]:
        """The tools as the provider's native tool calling declares them."""
        if self._defs is None:
            self._defs = [
                ToolDef(t.spec.name, t.spec.description, t.spec.parameters)
                for t in self.tools.values()
            ]
        return self._defs

    def needs_approval(self, name: str) -> bool:
        tool = self.tools.get(name)
        if tool is None:
            return False
        if matches(self.agent.auto_approve, name):
            return False
        if matches(self.agent.approve, name):
            return True
        return tool.spec.needs_approval

    def validate(self, name: str, args: Any) -> dict[str, Any]:
        """The arguments if they fit the tool's schema, else ToolError naming the problem."""
        tool = self.tools.get(name)
        if tool is None:
            available = ", ".join(sorted(self.tools)) or "none"
            raise ToolError(f"Unknown tool {name!r}. Available tools: {available}")
        if not isinstance(args, dict):
            raise ToolError(f"Arguments of {name} must be a JSON object, got {type(args).__name__}")
        import jsonschema  # a few MB: loaded with the first tool call

        try:
            jsonschema.validate(args, tool.spec.parameters)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "arguments"
            raise ToolError(f"Invalid arguments for {name}: {where}: {exc.message}") from None
        except jsonschema.SchemaError:
            pass  # a broken schema from an MCP server: let the server judge the arguments
        return args

    def describe_for_prompt(self) -> str:
        """Tool descriptions for the text protocol (models without native tool calling)."""
        lines = []
        for tool in self.tools.values():
            schema = json.dumps(tool.spec.parameters, separators=(",", ":"))
            lines.append(f"- {tool.spec.name}: {tool.spec.description}\n  arguments: {schema}")
        return "\n".join(lines)


class ToolRegistry:
    def __init__(self, settings: Settings, tools: Iterable[Tool]) -> None:
        self.settings = settings
        self._tools: dict[str, Tool] = {}
        self._views: dict[str, ToolView] = {}
        self.add(tools)

    def add(self, tools: Iterable[Tool]) -> None:
        for tool in tools:
            self._tools[tool.spec.name] = tool
        self._views.clear()

    def all(self) -> list[Tool]:
        return list(self._tools.values())

    def view(self, agent: AgentSettings) -> ToolView:
        """The agent's tools. Cached: the registry only changes at startup (MCP)."""
        view = self._views.get(agent.id)
        if view is None or view.agent is not agent:
            allowed = {name: t for name, t in self._tools.items() if matches(agent.tools, name)}
            view = self._views[agent.id] = ToolView(agent, allowed)
        return view

    def workspace(self, agent_id: str, session_id: str, owner_id: str = "local") -> Path:
        """`workspaces/<agent>` in the open mode; each user's own under `workspaces/@users/`
        (agent ids cannot start with "@"): users share agents, never their files."""
        root = self.settings.data_dir / "workspaces"
        if owner_id != "local":
            root = root / "@users" / owner_id
        root = root / agent_id
        if self.settings.tools.workspace_per_session:
            root = root / session_id
        root.mkdir(parents=True, exist_ok=True)
        return root.resolve()

    async def aclose(self) -> None:
        for tool in self._tools.values():
            await tool.aclose()
