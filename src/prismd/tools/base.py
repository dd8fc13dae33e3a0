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

from ..protocol import ErrorCode, PrismdError

if TYPE_CHECKING:
    from ..config import ToolsSettings
    from ..store.base import Store

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(PrismdError):
    """A refusal or failure, explained to the model (and shown on the tool card)."""

    code = ErrorCode.TOOL_ERROR


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments, {"type": "object", ...}
    needs_approval: bool = False  # default policy; an agent's policy may override it
    source: str = "builtin"  # "builtin" or "mcp:<server>"
    # Touches the host as prismd's own user (a host shell, an MCP server shared by everyone):
    # in a server with users, only admins get it, unless the config grants it (tools/registry.py).
    host_level: bool = False
    # The data the tool reaches, as an approval_request's `dataClassification` says it:
    # "public" (the open web), "internal" (the user's workspace, notes and tools' services),
    # "restricted" (the host itself). None: derived ("restricted" when host-level).
    data_access: str | None = None

    @property
    def data_classification(self) -> str:
        if self.data_access is not None:
            return self.data_access
        return "restricted" if self.host_level else "internal"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "needsApproval": self.needs_approval,
            "source": self.source,
            "hostLevel": self.host_level,
            "dataClassification": self.data_classification,
        }


@dataclass(slots=True)
class ToolContext:
    session_id: str
    agent_id: str
    workspace: Path  # exists, resolved (no symlinks in it); file tools stay inside it
    data_dir: Path  # prismd's data directory
    settings: ToolsSettings
    extra: dict[str, Any] = field(default_factory=dict)
    owner_id: str = "local"  # the session's user ("local": the open mode's one user)
    # The turn's user is an admin (or the open mode's one local owner). An untrusted caller's
    # processes must run in the sandbox (tools/builtins/sandbox.py): `shell` runs only there,
    # and `shell`/`code_exec` are refused where it cannot isolate such a caller
    # (`isolation()["untrusted_ok"]`).
    trusted: bool = True
    store: Store | None = None  # the server's store (the memory tools' notes live there)

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
