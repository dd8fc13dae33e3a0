"""The tool interface: what a built-in or MCP tool implements, and what it is given.

A tool is called with arguments already validated against its JSON schema. It returns the text
the model reads, or raises ToolError with a message the model reads (status `error`). A turn
that is stopped cancels the tool's coroutine: a tool that starts a process must kill it (the
whole process group) in a `finally`, never leave it orphaned.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ToolsSettings

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(Exception):
    """A refusal or failure, explained to the model (and shown on the tool card)."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments, {"type": "object", ...}
    needs_approval: bool = False  # default policy; an agent's policy may override it
    source: str = "builtin"  # "builtin" or "mcp:<server>"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "needsApproval": self.needs_approval,
            "source": self.source,
        }


@dataclass(slots=True)
class ToolContext:
    session_id: str
    agent_id: str
    workspace: Path  # exists, resolved (no symlinks in it); file tools stay inside it
    data_dir: Path  # prismd's data directory (shared state such as the memory database)
    settings: ToolsSettings
    extra: dict[str, Any] = field(default_factory=dict)
    owner_id: str = "local"  # the session's user ("local": the open mode's one user)
    # False when the turn's user is not an admin of a server with users: `shell` then runs only
    # in the sandbox, and `shell`/`code_exec` are refused where the sandbox cannot isolate
    # such a caller (`isolation()["untrusted_ok"]`). True for admins and the open mode's owner.
    trusted: bool = True

    @property
    def memory_scope(self) -> str:
        """Whose notes the memory tools read and write: the agent's, per user (users share
        agents such as the built-in assistant, never what it remembers for another)."""
        return self.agent_id if self.owner_id == "local" else f"{self.owner_id}/{self.agent_id}"


class Tool(abc.ABC):
    spec: ToolSpec

    @abc.abstractmethod
    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the tool holds (processes, connections) at server shutdown."""
