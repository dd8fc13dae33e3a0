"""The REST API (OpenAPI schema at /openapi.json, docs at /docs).

Credentials are checked before a route runs (auth/middleware.py); a route finds its caller in
`request.state.user`. Sessions, agents and uploads belong to a user: another user's object is
answered exactly like a missing one (404), so ids are not revealed; admins see everything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Body, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..agent.agents import AgentDirectory, row
from ..auth import Principal
from ..auth.service import COOKIE_NAME, RateLimited
from ..config import PROVIDER_KINDS, AgentSettings
from ..protocol import PROTOCOL_VERSION, SESSION_ID_RE, ErrorCode, ProtocolError
from ..sessions.manager import LiveSession, new_id, now_iso
from ..store.base import SessionRecord, UploadRecord
from . import config_api
from .app import Prismd

# ---------------------------------------------------------------- response shapes (OpenAPI)


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, in words")
    code: str = Field(description="One of the error codes of PROTOCOL.md B4")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class UserOut(BaseModel):
    id: str
    name: str
    admin: bool


class AuthStatus(BaseModel):
    authRequired: bool
    user: UserOut | None


class UserBody(BaseModel):
    user: UserOut


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=4096)


class SessionOut(_Open):
    id: str
    name: str
    agentId: str
    status: Literal["active", "closed", "archived"]
    turnCount: int
    startedAt: str
    lastTurnAt: str | None
    tokensIn: int
    tokensOut: int
    costUsd: float | None
    ownerId: str


class SessionDetail(SessionOut):
    lastSeq: int
    firstSeq: int
    turnRunning: bool


class SessionList(BaseModel):
    sessions: list[SessionOut]
    total: int
    limit: int
    offset: int


class FileMeta(BaseModel):
    id: str
    filename: str
    mimeType: str
    size: int


class MessageOut(_Open):
    id: str
    role: str
    content: str
    createdAt: str
    turnId: str | None
    status: str
    files: list[FileMeta]


class MessageList(BaseModel):
    sessionId: str
    lastSeq: int
    messages: list[MessageOut]


class RenameIn(BaseModel):
    name: str = Field(max_length=200)


class RetryOut(BaseModel):
    message: str = Field(description="The text of the dropped user message")
    files: list[FileMeta] = Field(
        description="Its files, uploaded again: send them back as {fileId} entries"
    )


class StatsOut(BaseModel):
    turns: int
    tokensIn: int
    tokensOut: int
    costUsd: float | None
    messages: int


class AgentOut(_Open):
    id: str
    name: str
    description: str
    provider: str | None
    model: str | None
    temperature: float | None
    tools: list[str]
    default: bool
    builtin: bool = Field(description="From the configuration (cannot be changed here)")
    systemPrompt: str | None = None


class AgentList(BaseModel):
    agents: list[AgentOut]
    default: str


class AgentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    provider: Literal["openai", "anthropic", "ollama"] | None = None
    model: str | None = None
    systemPrompt: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tools: list[str] | None = None


class AgentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = None
    provider: Literal["openai", "anthropic", "ollama"] | None = None
    model: str | None = None
    systemPrompt: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tools: list[str] | None = None


class CurrentAgent(BaseModel):
    agent: AgentOut


class ConfigOut(BaseModel):
    config: dict[str, Any] = Field(description="Effective settings; secrets shown as ••••")
    runtimeKeys: list[str] = Field(description="Dotted keys PATCH /api/config accepts")


class ProviderOut(BaseModel):
    kind: str
    configured: bool
    model: str | None
    baseUrl: str | None
    # When configured: how to show the model; `note` is a line to show beside it (the offline
    # demo model says what it is and how to connect a real one).
    displayName: str | None = None
    note: str | None = None
    demo: bool = False


class ProviderList(BaseModel):
    default: str | None
    providers: list[ProviderOut]


class ModelId(BaseModel):
    id: str


class ModelList(BaseModel):
    models: list[ModelId]
    cached: bool


class VersionOut(BaseModel):
    version: str
    protocol: int


class HealthOut(_Open):
    status: str


class ToolsOut(_Open):
    tools: list[dict[str, Any]]


def _doc(model: Any = None, *errors: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        responses[200] = {"model": model}
    for status in errors:
        responses[status] = {"model": ErrorBody}
    return responses


router = APIRouter(
    prefix="/api",
    # 422: request validation errors come in the API's error shape (see validation_error).
    responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)


def _error(status: int, code: ErrorCode, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code.value}, status_code=status, headers=headers)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation errors in the API's error shape (registered in app.py)."""
    errors: list[dict[str, Any]] = list(getattr(exc, "errors", list)())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    return JSONResponse(
        {
            "error": f"{field or 'request'}: {first['msg']}",
            "code": ErrorCode.INVALID_MESSAGE.value,
            "details": {"field": field, "reason": first["msg"]},
        },
        status_code=422,
    )


def _core(request: Request) -> Prismd:
    core: Prismd = request.app.state.prismd
    return core


def _user(request: Request) -> Principal:
    """The caller; the middleware has refused the request already if credentials are missing.
    Should a route be reached without a user all the same, it fails closed (401)."""
    user: Principal | None = getattr(request.state, "user", None)
    if user is None:
        raise HTTPException(401, "Authentication required")
    return user


def _not_found(session_id: str) -> JSONResponse:
    return _error(404, ErrorCode.SESSION_NOT_FOUND, f'Session "{session_id}" not found')


async def _record(request: Request, session_id: str) -> SessionRecord | JSONResponse:
    """The caller's session (live copy if loaded), or the error response."""
    if not SESSION_ID_RE.match(session_id):
        return _error(400, ErrorCode.INVALID_SESSION_ID, "Invalid session id")
    core = _core(request)
    live = core.manager.live(session_id)
    record = live.record if live is not None else await core.store.get_session(session_id)
    if record is None or not _user(request).owns(record.owner_id):
        return _not_found(session_id)
    return record


@contextlib.asynccontextmanager
async def _loaded(request: Request, session_id: str) -> AsyncIterator[LiveSession | JSONResponse]:
    """The caller's session, loaded for the block (evicted after it if nobody holds it), or
    the error response."""
    found = await _record(request, session_id)
    manager = _core(request).manager
    live = None if isinstance(found, JSONResponse) else await manager.get(session_id)
    try:
        yield found if isinstance(found, JSONResponse) else live or _not_found(session_id)
    finally:
        if live is not None:
            manager.maybe_evict(live)


def _live_json(live: LiveSession) -> dict[str, Any]:
    body = live.record.to_json()
    body.update(lastSeq=live.last_seq, firstSeq=live.first_seq, turnRunning=live.turn is not None)
    return body


async def _session_json(request: Request, session_id: str) -> dict[str, Any] | JSONResponse:
    core = _core(request)
    record = await _record(request, session_id)
    if isinstance(record, JSONResponse):
        return record
    live = core.manager.live(session_id)
    if live is not None:
        return _live_json(live)
    log = await core.store.open_log(session_id)
    body = record.to_json()
    body.update(lastSeq=log.last_seq, firstSeq=log.first_seq, turnRunning=False)
    return body


# ---------------------------------------------------------------- health, version, auth


@router.get("/health", summary="Liveness and configuration summary", responses=_doc(HealthOut))
async def health(request: Request) -> dict[str, Any]:
    core = _core(request)
    if getattr(request.state, "user", None) is None:
        return {"status": "ok"}  # credentials are needed and none were given: liveness only
    return {
        "status": "ok",
        "version": __version__,
        "provider": core.providers.default_kind,
        "providerConfigured": core.providers.default_kind is not None,
        # The offline demo model says so here: {displayName, note, demo, runtime…}.
        "model": core.providers.describe(),
        "connections": len(core.connections),
        "liveSessions": len(core.manager._live),
        "runningTurns": len(core.manager.running_turns()),
    }


@router.get("/version", summary="Server and protocol versions", responses=_doc(VersionOut))
async def version() -> dict[str, Any]:
    return {"version": __version__, "protocol": PROTOCOL_VERSION}


@router.get(
    "/auth/status",
    summary="Whether credentials are needed, and who the caller is",
    responses=_doc(AuthStatus),
)
async def auth_status(request: Request) -> dict[str, Any]:
    core = _core(request)
    user: Principal | None = getattr(request.state, "user", None)
    required = await core.auth.required()
    return {"authRequired": required, "user": user.to_json() if user else None}


@router.post(
    "/auth/login",
    summary="Log in with a username and password; sets the prismd_session cookie",
    responses=_doc(UserBody, 401, 429),
)
async def login(request: Request, body: LoginIn) -> Any:
    core = _core(request)
    client = request.client.host if request.client else "unknown"
    try:
        user, token = await core.auth.login(body.username, body.password, client)
    except RateLimited as exc:
        return _error(
            429, ErrorCode.RATE_LIMITED, str(exc), **{"Retry-After": str(exc.retry_after)}
        )
    except PermissionError as exc:
        return _error(401, ErrorCode.UNAUTHORIZED, str(exc))
    response = JSONResponse({"user": user.to_json()})
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=int(core.auth.ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/auth/logout", status_code=204, summary="End this login session")
async def logout(request: Request) -> Response:
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        await _core(request).auth.logout(cookie)
    response = Response(status_code=204)
    response.delete_cookie(
        COOKIE_NAME,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/auth/me", summary="The logged-in user", responses=_doc(UserBody))
async def me(request: Request) -> Any:
    user: Principal | None = getattr(request.state, "user", None)
    if user is None:
        return _error(401, ErrorCode.UNAUTHORIZED, "Authentication required")
    return {"user": user.to_json()}


# ---------------------------------------------------------------- sessions


STATUS_FILTERS: dict[str, tuple[str, ...] | None] = {
    "visible": ("active", "closed"),
    "active": ("active",),
    "closed": ("closed",),
    "archived": ("archived",),
    "all": None,
}


@router.get(
    "/sessions",
    summary="List the caller's sessions, newest activity first (admins: everyone's)",
    responses=_doc(SessionList),
)
async def list_sessions(
    request: Request,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    agentId: str | None = Query(None),
    q: str | None = Query(None, max_length=200, description="Part of the session name"),
    status: Literal["visible", "active", "closed", "archived", "all"] = Query(
        "visible", description="visible = active and closed (archived ones are hidden)"
    ),
) -> dict[str, Any]:
    core = _core(request)
    user = _user(request)
    records, total = await core.store.list_sessions(
        limit,
        offset,
        agentId,
        owner_id=None if user.admin else user.id,
        query=q,
        statuses=STATUS_FILTERS[status],
    )
    sessions = []
    for r in records:
        live = core.manager.live(r.id)
        sessions.append((live.record if live else r).to_json())
    return {"sessions": sessions, "total": total, "limit": limit, "offset": offset}


@router.get(
    "/sessions/{session_id}",
    summary="One session, with its event-log position",
    responses=_doc(SessionDetail, 400, 404),
)
async def get_session(request: Request, session_id: str) -> Any:
    return await _session_json(request, session_id)


@router.get(
    "/sessions/{session_id}/messages",
    summary="The stored messages of a session",
    responses=_doc(MessageList, 400, 404),
)
async def get_messages(request: Request, session_id: str) -> Any:
    core = _core(request)
    body = await _session_json(request, session_id)
    if isinstance(body, JSONResponse):
        return body
    messages = await core.store.load_messages(session_id)
    return {
        "sessionId": session_id,
        "lastSeq": body["lastSeq"],
        "messages": [m.to_json() for m in messages],
    }


@router.post(
    "/sessions/{session_id}/resume",
    summary="Mark a session active again",
    responses=_doc(SessionDetail, 400, 404),
)
async def resume_session(request: Request, session_id: str) -> Any:
    async with _loaded(request, session_id) as live:
        if isinstance(live, JSONResponse):
            return live
        _core(request).manager.activate(live)
        return _live_json(live)


@router.patch(
    "/sessions/{session_id}",
    summary="Rename a session",
    responses=_doc(SessionDetail, 400, 404),
)
async def rename_session(request: Request, session_id: str, body: RenameIn) -> Any:
    async with _loaded(request, session_id) as live:
        if isinstance(live, JSONResponse):
            return live
        live.record.name = body.name.strip()
        _core(request).store.update_session(session_id, name=live.record.name)
        return _live_json(live)


@router.post(
    "/sessions/{session_id}/close",
    summary="Close a session (a chat or resume opens it again)",
    responses=_doc(SessionDetail, 400, 404),
)
async def close_session(request: Request, session_id: str) -> Any:
    return await _set_status(request, session_id, "closed")


@router.post(
    "/sessions/{session_id}/archive",
    summary="Archive a session (hidden from the default listing)",
    responses=_doc(SessionDetail, 400, 404),
)
async def archive_session(request: Request, session_id: str) -> Any:
    return await _set_status(request, session_id, "archived")


async def _set_status(request: Request, session_id: str, status: str) -> Any:
    core = _core(request)
    async with _loaded(request, session_id) as live:
        if isinstance(live, JSONResponse):
            return live
        core.manager.close(live)
        if status != "closed":
            live.record.status = status
            core.store.update_session(session_id, status=status)
        return _live_json(live)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    summary="Delete a session and its database",
    responses=_doc(None, 400, 404),
)
async def delete_session(request: Request, session_id: str) -> Response:
    core = _core(request)
    found = await _record(request, session_id)
    if isinstance(found, JSONResponse):
        return found
    if not await core.manager.delete(session_id):
        return _not_found(session_id)
    return Response(status_code=204)


def _busy() -> JSONResponse:
    return _error(
        409, ErrorCode.TURN_IN_PROGRESS, "A turn is in progress in this session: stop it first"
    )


@router.post(
    "/sessions/{session_id}/retry",
    summary="Drop the last exchange (the last user message and all after it)",
    description="Returns the dropped message so that a client can send it again, edited or "
    "not; its files come back as new uploads (send them as `{fileId}`). The model no longer "
    "sees the dropped messages.",
    responses=_doc(RetryOut, 400, 404, 409),
)
async def retry(request: Request, session_id: str) -> Any:
    core = _core(request)
    async with _loaded(request, session_id) as live:
        if isinstance(live, JSONResponse):
            return live
        if live.turn is not None:
            return _busy()
        history = live.history
        last_user = next(
            (i for i in range(len(history) - 1, -1, -1) if history[i].role == "user"), None
        )
        if last_user is None:
            return _error(409, ErrorCode.INVALID_MESSAGE, "This session has no message to retry")
        # No await between the check above and this cut: a chat cannot slip in between.
        dropped = history[last_user:]
        del history[last_user:]
        # The dropped turns' clientMessageIds are released: a resend runs a new turn.
        turns = {m.turn_id for m in dropped if m.turn_id}
        for client_id in [k for k, v in live.client_turns.items() if v in turns]:
            del live.client_turns[client_id]
        core.store.delete_messages(session_id, [m.id for m in dropped], sorted(turns))
    user = _user(request)
    files = []
    for f in dropped[0].files:
        upload = UploadRecord(
            new_id("upl"), user.id, f.filename, f.mime_type, f.size, now_iso(), f.data
        )
        await core.store.save_upload(upload)
        files.append(upload.meta())
    return {"message": dropped[0].content, "files": files}


@router.delete(
    "/sessions/{session_id}/messages/{message_id}",
    status_code=204,
    summary="Delete one message (the model no longer sees it)",
    responses=_doc(None, 400, 404, 409),
)
async def delete_message(request: Request, session_id: str, message_id: str) -> Response:
    async with _loaded(request, session_id) as live:
        if isinstance(live, JSONResponse):
            return live
        if live.turn is not None:
            return _busy()
        index = next((i for i, m in enumerate(live.history) if m.id == message_id), None)
        if index is None:
            return _error(404, ErrorCode.INVALID_MESSAGE, f'Message "{message_id}" not found')
        del live.history[index]
        _core(request).store.delete_messages(session_id, [message_id])
    return Response(status_code=204)


@router.get(
    "/sessions/{session_id}/stats",
    summary="Turns, tokens, cost and message count of a session",
    responses=_doc(StatsOut, 400, 404),
)
async def session_stats(request: Request, session_id: str) -> Any:
    core = _core(request)
    record = await _record(request, session_id)
    if isinstance(record, JSONResponse):
        return record
    live = core.manager.live(session_id)
    if live is not None:
        count = len(live.history)
    else:
        count = len(await core.store.load_messages(session_id))
    return {
        "turns": record.turn_count,
        "tokensIn": record.tokens_in,
        "tokensOut": record.tokens_out,
        "costUsd": record.cost_usd,
        "messages": count,
    }


# ---------------------------------------------------------------- tools


@router.get(
    "/tools",
    summary="Every tool, with its schema and each agent's policy",
    responses=_doc(ToolsOut),
)
async def list_tools(request: Request) -> dict[str, Any]:
    core = _core(request)
    user = _user(request)
    tools = []
    agents = core.agents.all(user.id, user.admin)
    for tool in core.tools.all():
        body = tool.spec.to_json()
        policy = {}
        for agent in agents:
            view = core.tools.view(agent)
            if tool.spec.name in view.tools:
                policy[agent.id] = "approve" if view.needs_approval(tool.spec.name) else "allow"
            else:
                policy[agent.id] = "deny"
        body["agents"] = policy
        tools.append(body)
    from ..tools.builtins.sandbox import isolation

    # The first call probes the machine in a child process: keep it off the event loop.
    sandbox = await asyncio.to_thread(isolation)
    servers = core.mcp.status() if core.mcp is not None else []
    return {"tools": tools, "mcpServers": servers, "sandbox": sandbox}


# ---------------------------------------------------------------- agents


async def _default_agent(core: Prismd, user: Principal) -> str:
    chosen = await core.auth.default_agent(user.id)
    if chosen is not None and core.agents.find(chosen) is not None:
        if core.agents.visible(chosen, user.id, user.admin):
            return chosen
    return core.agents.default_id


def _agent_json(core: Prismd, agent: AgentSettings, default: str) -> dict[str, Any]:
    body = AgentDirectory.to_json(agent, default)
    body["builtin"] = core.agents.is_config(agent.id)
    body["systemPrompt"] = agent.system_prompt
    owner = core.agents.owners.get(agent.id)
    if owner is not None:
        body["ownerId"] = owner
    return body


def _agent_missing(agent_id: str) -> JSONResponse:
    return _error(404, ErrorCode.AGENT_NOT_FOUND, f'Agent "{agent_id}" not found')


@router.get("/agents", summary="The agents a chat can run as", responses=_doc(AgentList))
async def list_agents(request: Request) -> dict[str, Any]:
    core = _core(request)
    user = _user(request)
    default = await _default_agent(core, user)
    return {
        "agents": [_agent_json(core, a, default) for a in core.agents.all(user.id, user.admin)],
        "default": default,
    }


@router.get(
    "/agents/current",
    summary="The caller's default agent (set with POST /api/agents/{id}/select)",
    responses=_doc(CurrentAgent),
)
async def current_agent(request: Request) -> dict[str, Any]:
    core = _core(request)
    default = await _default_agent(core, _user(request))
    return {"agent": _agent_json(core, core.agents.get(default), default)}


@router.get("/agents/{agent_id}", summary="One agent", responses=_doc(AgentOut, 404))
async def get_agent(request: Request, agent_id: str) -> Any:
    core = _core(request)
    user = _user(request)
    agent = core.agents.find(agent_id)
    if agent is None or not core.agents.visible(agent_id, user.id, user.admin):
        return _agent_missing(agent_id)
    return _agent_json(core, agent, await _default_agent(core, user))


def _settings_from(body: dict[str, Any]) -> AgentSettings:
    fields = {k: v for k, v in body.items() if v is not None}
    if "systemPrompt" in fields:
        fields["system_prompt"] = fields.pop("systemPrompt")
    return AgentSettings.model_validate(fields)


def _invalid(exc: ValidationError) -> JSONResponse:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    return JSONResponse(
        {
            "error": f"{field}: {err['msg']}",
            "code": ErrorCode.INVALID_MESSAGE.value,
            "details": {"field": field, "reason": err["msg"]},
        },
        status_code=422,
    )


@router.post(
    "/agents",
    status_code=201,
    summary="Create an agent (owned by the caller)",
    responses={201: {"model": AgentOut}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def create_agent(request: Request, body: AgentIn) -> Any:
    core = _core(request)
    user = _user(request)
    if core.agents.find(body.id) is not None:
        return _error(409, ErrorCode.INVALID_MESSAGE, f'An agent "{body.id}" exists already')
    try:
        agent = _settings_from(body.model_dump())
    except ValidationError as exc:
        return _invalid(exc)
    await core.store.save_agent(row(agent), user.id)
    core.agents.add(agent, user.id)
    return JSONResponse(_agent_json(core, agent, await _default_agent(core, user)), status_code=201)


@router.patch(
    "/agents/{agent_id}",
    summary="Change an agent created over the API",
    responses=_doc(AgentOut, 403, 404, 422),
)
async def update_agent(request: Request, agent_id: str, body: AgentPatch) -> Any:
    core = _core(request)
    user = _user(request)
    agent = core.agents.find(agent_id)
    if agent is None or not core.agents.visible(agent_id, user.id, user.admin):
        return _agent_missing(agent_id)
    if core.agents.is_config(agent_id):
        return _error(
            403, ErrorCode.INVALID_MESSAGE, f'Agent "{agent_id}" comes from the config file'
        )
    current = row(agent)
    current["systemPrompt"] = current.pop("system_prompt")
    changes = body.model_dump(exclude_unset=True)
    try:
        updated = _settings_from({**current, **changes})
    except ValidationError as exc:
        return _invalid(exc)
    owner = core.agents.owners[agent_id]
    await core.store.save_agent(row(updated), owner)
    core.agents.add(updated, owner)
    return _agent_json(core, updated, await _default_agent(core, user))


@router.delete(
    "/agents/{agent_id}",
    status_code=204,
    summary="Delete an agent created over the API (not one from the config file)",
    responses=_doc(None, 403, 404),
)
async def delete_agent(request: Request, agent_id: str) -> Response:
    core = _core(request)
    user = _user(request)
    if core.agents.find(agent_id) is None or not core.agents.visible(agent_id, user.id, user.admin):
        return _agent_missing(agent_id)
    if core.agents.is_config(agent_id):
        return _error(
            403, ErrorCode.INVALID_MESSAGE, f'Agent "{agent_id}" comes from the config file'
        )
    await core.store.delete_agent(agent_id)
    core.agents.remove(agent_id)
    return Response(status_code=204)


@router.post(
    "/agents/{agent_id}/select",
    summary="Make an agent the caller's default (chats without agentId run as it)",
    responses=_doc(CurrentAgent, 404),
)
async def select_agent(request: Request, agent_id: str) -> Any:
    core = _core(request)
    user = _user(request)
    agent = core.agents.find(agent_id)
    if agent is None or not core.agents.visible(agent_id, user.id, user.admin):
        return _agent_missing(agent_id)
    await core.auth.set_default_agent(user.id, agent_id)
    return {"agent": _agent_json(core, agent, agent_id)}


# ---------------------------------------------------------------- config, providers


@router.get(
    "/config",
    summary="The effective settings (secrets masked)",
    responses=_doc(ConfigOut),
)
async def get_config(request: Request) -> Any:
    # Admins only: besides the masked secrets it shows the server's paths, MCP commands and
    # endpoints, which are not every user's business.
    if not _user(request).admin:
        return _error(403, ErrorCode.UNAUTHORIZED, "Only an admin may read the configuration")
    return config_api.effective(_core(request).settings)


@router.patch(
    "/config",
    summary="Change settings at run time (admins; written to $PRISMD_HOME/config.toml)",
    description='The body is a partial configuration, nested (`{"tools": {"max_rounds": 5}}`) '
    'or dotted (`{"tools.max_rounds": 5}`); only the keys in `runtimeKeys` are accepted. '
    "`null` removes a key.",
    responses=_doc(ConfigOut, 403, 422),
)
async def patch_config(request: Request, body: dict[str, Any] = Body(...)) -> Any:  # noqa: B008
    core = _core(request)
    if not _user(request).admin:
        return _error(403, ErrorCode.UNAUTHORIZED, "Only an admin may change the configuration")
    try:
        return config_api.apply(core, body)
    except config_api.ConfigChangeError as exc:
        return JSONResponse(
            {
                "error": str(exc),
                "code": ErrorCode.INVALID_MESSAGE.value,
                "details": {"field": exc.key, "reason": exc.reason},
            },
            status_code=422,
        )


async def _provider_info(core: Prismd, kind: str) -> dict[str, Any]:
    ps = core.settings.provider_settings(kind)
    configured = kind == core.providers.default_kind or bool(ps.api_key or ps.base_url)
    if kind == "anthropic":
        configured = bool(ps.api_key)
    if kind == "local":
        configured = kind == core.providers.default_kind or bool(ps.model or ps.models)
    model = ps.model
    if configured and not model:
        # Ollama's default is its first model, which may need a (blocking) probe.
        model = await asyncio.to_thread(core.providers._default_model, kind)
    info = {"kind": kind, "configured": configured, "model": model, "baseUrl": ps.base_url}
    if configured:
        shown = core.providers.describe(kind, model)
        info.update(displayName=shown["displayName"], note=shown["note"], demo=shown["demo"])
    return info


@router.get(
    "/providers",
    summary="The model providers, which are configured, and the default",
    responses=_doc(ProviderList),
)
async def list_providers(request: Request) -> dict[str, Any]:
    core = _core(request)
    return {
        "default": core.providers.default_kind,
        "providers": [await _provider_info(core, kind) for kind in PROVIDER_KINDS],
    }


MODELS_CACHE_S = 300.0
_models_cache: dict[int, dict[str, tuple[float, list[str]]]] = {}  # id(core) -> kind -> ids


@router.get(
    "/providers/{kind}/models",
    summary="The models a provider offers (live from its /models, cached 5 minutes)",
    responses=_doc(ModelList, 404, 409, 502),
)
async def provider_models(request: Request, kind: str) -> Any:
    core = _core(request)
    if kind not in PROVIDER_KINDS:
        return _error(404, ErrorCode.PROVIDER_UNCONFIGURED, f'No provider "{kind}"')
    cache = _models_cache.setdefault(id(core), {})
    hit = cache.get(kind)
    if hit is not None and time.monotonic() - hit[0] < MODELS_CACHE_S:
        return {"models": [{"id": m} for m in hit[1]], "cached": True}
    try:
        # Building a provider imports its SDK (a second or two) and may probe Ollama.
        provider = await asyncio.to_thread(core.providers.get, kind)
    except ProtocolError as exc:
        return _error(409, exc.code, exc.message)
    local_ids = getattr(provider, "model_ids", None)  # the local provider's configured models
    if local_ids is not None:
        return {"models": [{"id": m} for m in local_ids()], "cached": False}
    shards = getattr(provider, "_clients", None)
    if shards is None:
        return _error(502, ErrorCode.PROVIDER_ERROR, f"Provider {kind!r} cannot list models")
    try:
        with shards.lease() as client:
            page = await asyncio.wait_for(client.models.list(), 30)
        ids = sorted({m.id for m in page.data})
    except Exception as exc:  # noqa: BLE001 - the SDKs raise many kinds; all mean the same here
        return _error(
            502, ErrorCode.PROVIDER_ERROR, f"Listing the models of {kind!r} failed: {exc}"
        )
    cache[kind] = (time.monotonic(), ids)
    return {"models": [{"id": m} for m in ids], "cached": False}


# ---------------------------------------------------------------- uploads


@router.post(
    "/upload",
    status_code=201,
    summary="Upload a file (multipart field `file`) to attach to a chat as {fileId}",
    responses={201: {"model": FileMeta}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def upload(request: Request, file: UploadFile = File(...)) -> Any:  # noqa: B008
    core = _core(request)
    limit = core.settings.server.max_file_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        return _error(
            413, ErrorCode.PAYLOAD_TOO_LARGE, f"The file is larger than the limit of {limit} bytes"
        )
    from ..agent.files import decode_files
    from ..protocol import FileIn

    # The same checks and name/type clean-up as a file sent inline in a chat.
    try:
        (record,) = decode_files(
            [
                FileIn(
                    filename=(file.filename or "file")[:255] or "file",
                    mimeType=file.content_type or "application/octet-stream",
                    data=base64.b64encode(data).decode("ascii"),
                )
            ],
            1,
            limit,
        )
    except ProtocolError as exc:
        return _error(422, exc.code, exc.message)
    user = _user(request)
    item = UploadRecord(
        new_id("upl"), user.id, record.filename, record.mime_type, record.size, now_iso(), data
    )
    await core.store.save_upload(item)
    return JSONResponse(item.meta(), status_code=201)
