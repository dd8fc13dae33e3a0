"""`/api/agents`: the agents a chat can run as, in CortexPrism's AgentConfig shape.

The built-in `assistant` and the config file's agents are everyone's and cannot be changed
here; agents created over the API belong to their creator (admins see all). The request
models of this module (`AgentIn`, `AgentPatch`) are the only definition of what a client may
set on an agent.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...agent.agents import Found, row
from ...auth import Principal
from ...config import (
    AgentDescription,
    AgentId,
    AgentName,
    AgentSettings,
    ModelName,
    ProviderKind,
    SystemPrompt,
    ToolPatterns,
)
from ...protocol import ErrorCode
from .common import ApiError, Caller, Core, Ok, Open, api_router, doc
from .providers import provider_model
from .rows import agent_config

router = api_router(tags=["agents"])


# ---------------------------------------------------------------- shapes (OpenAPI)


class AgentOut(Open):
    """CortexPrism's AgentConfig; `default` and `ownerId` are prismd's."""

    id: str
    name: str
    description: str
    icon: str | None
    category: str | None
    provider: str | None
    model: str | None
    systemPrompt: str
    temperature: float | None
    tools: list[str]
    tags: list[str]
    builtin: bool = Field(description="From the configuration (cannot be changed here)")
    createdAt: str | None = Field(description="prismd keeps no timestamps for agents: null")
    updatedAt: str | None
    default: bool = Field(description="prismd: the caller's default agent")


class CurrentAgentOut(AgentOut):
    isDefault: bool = Field(description="The server's default agent (config `default_agent`)")


class AgentPatch(BaseModel):
    """What may be set on an agent (PUT/PATCH change only the fields given). The bounds are
    config.py's, shared with AgentSettings: one place for every limit."""

    model_config = ConfigDict(extra="forbid")
    name: AgentName | None = None
    description: AgentDescription | None = None
    provider: ProviderKind | None = None
    model: ModelName | None = None
    systemPrompt: SystemPrompt | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tools: ToolPatterns | None = None


class AgentIn(AgentPatch):
    """A new agent; without `id`, one is made from the name (as CortexPrism does)."""

    id: AgentId | None = None
    name: AgentName


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]
    return slug or f"agent_{uuid.uuid4().hex[:8]}"


def _settings_from(fields: dict[str, Any]) -> AgentSettings:
    """An AgentSettings from API fields; an invalid one is a 422 naming the field."""
    values = {k: v for k, v in fields.items() if v is not None}
    if "systemPrompt" in values:
        values["system_prompt"] = values.pop("systemPrompt")
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ApiError(
            422,
            ErrorCode.INVALID_MESSAGE,
            f"{field}: {err['msg']}",
            details={"field": field, "reason": err["msg"]},
        ) from None


# ---------------------------------------------------------------- helpers


async def _default_id(core: Core, user: Principal) -> str:
    chosen = await core.auth.default_agent(user.id)
    if chosen is not None and core.agents.find(chosen, user.id, user.admin) is not None:
        return chosen
    return core.agents.default_id


def _config(found: Found, default: str) -> dict[str, Any]:
    return agent_config(
        found.agent,
        builtin=found.owner is None,
        default=found.agent.id == default,
        owner_id=found.owner,
    )


def _missing(agent_id: str) -> ApiError:
    return ApiError(404, ErrorCode.AGENT_NOT_FOUND, f'Agent "{agent_id}" not found')


def caller_agent(agent_id: str, core: Core, caller: Caller) -> Found:
    """The caller's agent of that id (ids are per user: agent/agents.py); another user's is
    answered like a missing one."""
    found = core.agents.lookup(agent_id, caller.id, caller.admin)
    if found is None:
        raise _missing(agent_id)
    return found


VisibleAgent = Annotated[Found, Depends(caller_agent)]


def created_agent(found: VisibleAgent) -> Found:
    """An agent created over the API (those of the config file are changed there)."""
    if found.owner is None:
        raise ApiError(
            403, ErrorCode.INVALID_MESSAGE, f'Agent "{found.agent.id}" comes from the config file'
        )
    return found


CreatedAgent = Annotated[Found, Depends(created_agent)]


# ---------------------------------------------------------------- routes


@router.get(
    "/agents",
    summary="The agents a chat can run as, sorted by name",
    responses=doc(list[AgentOut]),
)
async def list_agents(core: Core, caller: Caller) -> list[dict[str, Any]]:
    default = await _default_id(core, caller)
    agents = sorted(
        core.agents.entries(caller.id, caller.admin), key=lambda f: f.agent.name.lower()
    )
    return [_config(f, default) for f in agents]


@router.get(
    "/agents/current",
    summary="The caller's default agent (set with POST /api/agents/{id}/select)",
    description="`provider` and `model` are those a chat with this agent uses.",
    responses=doc(CurrentAgentOut),
)
async def current_agent(core: Core, caller: Caller) -> dict[str, Any]:
    default = await _default_id(core, caller)
    found = core.agents.lookup(default, caller.id, caller.admin)
    assert found is not None  # _default_id answers an agent the caller has
    agent = found.agent
    body = _config(found, default)
    kind = agent.provider or core.providers.default_kind
    model = agent.model or (await provider_model(core, kind) if kind else None)
    body.update(isDefault=agent.id == core.agents.default_id, provider=kind, model=model)
    return body


@router.get("/agents/{agent_id}", summary="One agent", responses=doc(AgentOut, 404))
async def get_agent(core: Core, caller: Caller, agent: VisibleAgent) -> dict[str, Any]:
    return _config(agent, await _default_id(core, caller))


@router.post(
    "/agents",
    status_code=201,
    summary="Create an agent (owned by the caller)",
    responses=doc(AgentOut, 409, 422, status=201),
)
async def create_agent(core: Core, caller: Caller, body: AgentIn) -> dict[str, Any]:
    agent_id = body.id or _slug(body.name)
    # Ids are per user: only a config agent's id (everyone sees those) or the caller's own is
    # taken; another user's agent of that id is not revealed (the id is free for the caller).
    if core.agents.taken(agent_id, caller.id):
        raise ApiError(409, ErrorCode.INVALID_MESSAGE, f'Agent "{agent_id}" already exists')
    agent = _settings_from({**body.model_dump(), "id": agent_id})
    await core.store.save_agent(row(agent), caller.id)
    core.agents.add(agent, caller.id)
    return _config(Found(agent, caller.id), await _default_id(core, caller))


async def update_agent(
    core: Core, caller: Caller, agent: CreatedAgent, body: AgentPatch
) -> dict[str, Any]:
    current = row(agent.agent)
    current["systemPrompt"] = current.pop("system_prompt")
    updated = _settings_from({**current, **body.model_dump(exclude_unset=True)})
    owner = agent.owner
    assert owner is not None  # a created agent (created_agent)
    await core.store.save_agent(row(updated), owner)
    core.agents.add(updated, owner)
    return _config(Found(updated, owner), await _default_id(core, caller))


# CortexPrism's PUT, and PATCH (prismd's first route): both change only the fields given.
for _method in ("PUT", "PATCH"):
    router.add_api_route(
        "/agents/{agent_id}",
        update_agent,
        methods=[_method],
        name=f"{_method.lower()}_agent",
        summary="Change an agent created over the API (only the fields given)",
        responses=doc(AgentOut, 403, 404, 422),
    )


@router.delete(
    "/agents/{agent_id}",
    summary="Delete an agent created over the API (not one from the config file)",
    responses=doc(Ok, 403, 404),
)
async def delete_agent(core: Core, agent: CreatedAgent) -> dict[str, Any]:
    assert agent.owner is not None  # a created agent (created_agent)
    await core.store.delete_agent(agent.agent.id, agent.owner)
    core.agents.remove(agent.agent.id, agent.owner)
    return {"ok": True}


@router.post(
    "/agents/{agent_id}/select",
    summary="Make an agent the caller's default (chats without agentId run as it)",
    responses=doc(Ok, 404),
)
async def select_agent(core: Core, caller: Caller, agent: VisibleAgent) -> dict[str, Any]:
    await core.auth.set_default_agent(caller.id, agent.agent.id)
    return {"ok": True}
