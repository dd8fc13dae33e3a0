"""All tools of the server, and the per-turn view of one agent's allowed tools for one caller.

The registry holds the built-in tools and groups of tools that change at run time (what the MCP
servers offer: `set_group`). Each change bumps `version` and drops the cached views, so the next
turn sees the tools as they are now; a view already handed to a turn is a snapshot that keeps
working (a tool that has gone since answers its own clear ToolError when called).
An agent's policy decides which tools it sees and which need the user's approval; the caller's
privilege decides whether host-level tools are among them, for tools that appear later as for
the others. Approval protects a user from the model; it never widens what a user may do: a
tool the caller may not use is not in the view, so no approval can run it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from ..config import AgentSettings, Settings
from ..providers.base import ToolDef
from .base import Tool, ToolError

log = logging.getLogger(__name__)


class Caller(Protocol):
    """Who a turn runs for (auth.Principal)."""

    @property
    def name(self) -> str: ...

    @property
    def admin(self) -> bool: ...


@lru_cache(maxsize=4096)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regular expression for a list of fnmatch patterns, compiled once per list (agents
    change rarely; their pattern lists are bounded in size)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


def matches(patterns: Iterable[str], name: str) -> bool:
    rx = _compiled(tuple(patterns))
    return rx is not None and rx.match(name) is not None


def needs_approval(agent: AgentSettings, tool: Tool) -> bool:
    """The agent's approval policy for one tool (it never widens access: see `access`)."""
    name = tool.spec.name
    if matches(agent.auto_approve, name):
        return False
    if matches(agent.approve, name):
        return True
    return tool.spec.needs_approval


@dataclass(slots=True)
class Access:
    """Whether a caller may use a tool with an agent, and why (shown by GET /api/tools)."""

    allowed: bool
    why: str
    approval: bool = False


@dataclass(slots=True)
class ToolView:
    """The tools one turn may use, with the agent's approval policy applied."""

    agent: AgentSettings
    tools: dict[str, Tool]
    version: int = 0  # the registry's version it was made from
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
        return tool is not None and needs_approval(self.agent, tool)

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
        self.version = 0  # bumped by every change of the tools
        self._fixed: dict[str, Tool] = {}  # built-ins
        self._groups: dict[str, list[Tool]] = {}  # replaced at run time (MCP)
        self._tools: dict[str, Tool] = {}
        # (the agent object, caller class) -> view; see `view`. Keyed by the object: agent ids
        # are per user, so two users' agents may share one.
        self._views: dict[tuple[int, str], ToolView] = {}
        self.add(tools)

    def add(self, tools: Iterable[Tool]) -> None:
        for tool in tools:
            self._fixed[tool.spec.name] = tool
        self._changed()

    def set_group(self, group: str, tools: Iterable[Tool]) -> bool:
        """Replace the tools of `group` (e.g. "mcp": what the MCP servers offer now); False
        when they are the same objects as before. A name already taken (a built-in, an earlier
        group) keeps its tool."""
        new = list(tools)
        old = self._groups.get(group, [])
        if len(new) == len(old) and all(a is b for a, b in zip(new, old, strict=True)):
            return False
        self._groups[group] = new
        self._changed()
        return True

    def _changed(self) -> None:
        merged = dict(self._fixed)
        for group, tools in self._groups.items():
            for tool in tools:
                name = tool.spec.name
                if name in merged:
                    log.warning("tool %r of %s ignored: the name is taken", name, group)
                    continue
                merged[name] = tool
        self._tools = merged
        self.version += 1
        self._views.clear()

    def all(self) -> list[Tool]:
        return list(self._tools.values())

    def access(self, agent: AgentSettings, caller: Caller, name: str) -> Access:
        """May `caller` use tool `name` when talking to `agent`, and why."""
        tool = self._tools.get(name)
        if tool is None:
            return Access(False, "no such tool")
        if not matches(agent.tools, name):
            return Access(False, f"not in agent {agent.id}'s tools")
        if tool.spec.host_level and not caller.admin:
            if matches(agent.grant, name):
                why = f"host-level, granted to every user of agent {agent.id}"
            elif matches(self.settings.tools.grants.get(caller.name, ()), name):
                why = f"host-level, granted to {caller.name} (tools.grants)"
            else:
                return Access(
                    False,
                    "host-level (it acts on the server as prismd's user): admins only, unless "
                    "granted in config.toml (tools.grants or the agent's grant)",
                )
        else:
            why = "admin" if tool.spec.host_level else "allowed"
        return Access(True, why, needs_approval(agent, tool))

    def view(self, agent: AgentSettings, caller: Caller) -> ToolView:
        """The tools `caller` may use with `agent`, as they are now. Cached per agent and per
        class of caller (admins, users without grants, each user with grants) until the tools
        change (`version`); agents change rarely."""
        grants = self.settings.tools.grants
        if caller.admin:
            kind = "admin"
        else:
            kind = f"user:{caller.name}" if caller.name in grants else "user"
        key = (id(agent), kind)
        view = self._views.get(key)
        if view is None or view.agent is not agent:
            allowed = {
                name: tool
                for name, tool in self._tools.items()
                if self.access(agent, caller, name).allowed
            }
            view = self._views[key] = ToolView(agent, allowed, self.version)
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
        for tool in self._fixed.values():
            await tool.aclose()
