"""`/api/tools`: the tools agents can call, their schemas and each agent's policy, and the MCP
servers' state.

The tools are those of now: MCP servers' tools come and go at run time (tools/mcp.py), and the
registry follows them (tools/registry.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import Field

from .common import Caller, Core, Open, api_router, doc
from .rows import tool_params

router = api_router(tags=["tools"])


class McpServerOut(Open):
    """One configured MCP server (errors masked: auth/redact.py)."""

    name: str
    transport: Literal["stdio", "http"]
    state: Literal["starting", "ready", "restarting", "failed", "disabled", "stopped"] = Field(
        description="restarting: waiting for the next attempt (nextAttemptAt); failed: not "
        "retried (a configuration error, a missing command or directory, no permission)"
    )
    connected: bool
    tools: int = Field(description="Tools it offers now (0 unless ready)")
    error: str | None = Field(description="The last error, kept once it is ready again")
    errorAt: str | None
    nextAttemptAt: str | None = Field(description="While restarting: when it is started again")
    failures: int = Field(description="Failed starts (or early deaths) in a row")
    protocol: str | None = Field(description="The MCP version it speaks (while ready)")


class ToolsOut(Open):
    tools: list[dict[str, Any]]
    mcpServers: list[McpServerOut]
    sandbox: dict[str, Any]


class ToolParam(Open):
    name: str
    type: str
    description: str
    required: bool


class RegistryItem(Open):
    """CortexPrism's registry entry; `parameters`, `needsApproval` and `source` are prismd's."""

    name: str
    description: str
    params: list[ToolParam]
    capabilities: list[str]
    disabled: bool
    parameters: dict[str, Any] = Field(description="prismd: the JSON schema of the arguments")
    needsApproval: bool
    source: str = Field(description='"builtin" or "mcp:<server>"')


@router.get(
    "/tools",
    summary="Every tool, with its schema and, for the caller, each agent's policy and why; the "
    "MCP servers' state",
    responses=doc(ToolsOut),
)
async def list_tools(core: Core, caller: Caller) -> dict[str, Any]:
    tools = []
    agents = core.agents.all(caller.id, caller.admin)
    for tool in core.tools.all():
        body = tool.spec.to_json()
        policy, why = {}, {}
        for agent in agents:
            access = core.tools.access(agent, caller, tool.spec.name)
            policy[agent.id] = (
                ("approve" if access.approval else "allow") if access.allowed else "deny"
            )
            why[agent.id] = access.why
        # For this caller: per agent, whether they may use it and why.
        body["agents"] = policy
        body["why"] = why
        tools.append(body)
    from ...tools.builtins.sandbox import isolation

    # The first call probes the machine in a child process: keep it off the event loop.
    sandbox = await asyncio.to_thread(isolation, core.settings.tools)
    servers = core.mcp.status() if core.mcp is not None else []
    return {"tools": tools, "mcpServers": servers, "sandbox": sandbox}


@router.get("/tools/list", summary="The names of every tool", responses=doc(list[str]))
async def tool_names(core: Core) -> list[str]:
    return [tool.spec.name for tool in core.tools.all()]


@router.get(
    "/tools/registry",
    summary="Every tool with its parameters (CortexPrism's registry shape)",
    responses=doc(list[RegistryItem]),
)
async def tool_registry(core: Core) -> list[dict[str, Any]]:
    return [
        {
            "name": tool.spec.name,
            "description": tool.spec.description,
            "params": tool_params(tool.spec.parameters),
            "capabilities": [],  # prismd has no capability classes
            "disabled": False,
            "parameters": tool.spec.parameters,
            "needsApproval": tool.spec.needs_approval,
            "source": tool.spec.source,
        }
        for tool in core.tools.all()
    ]
