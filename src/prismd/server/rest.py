"""The REST API (OpenAPI schema at /openapi.json)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from .. import __version__
from ..agent.agents import AgentDirectory
from ..protocol import SESSION_ID_RE, ErrorCode
from ..sessions.manager import LiveSession
from .app import Prismd

router = APIRouter(prefix="/api")


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code.value}, status_code=status)


def _core(request: Request) -> Prismd:
    core: Prismd = request.app.state.prismd
    return core


async def _session_json(core: Prismd, session_id: str) -> dict[str, Any] | JSONResponse:
    if not SESSION_ID_RE.match(session_id):
        return _error(400, ErrorCode.INVALID_SESSION_ID, "Invalid session id")
    live: LiveSession | None = core.manager.live(session_id)
    if live is not None:
        body = live.record.to_json()
        body.update(
            lastSeq=live.last_seq, firstSeq=live.first_seq, turnRunning=live.turn is not None
        )
        return body
    record = await core.store.get_session(session_id)
    if record is None:
        return _error(404, ErrorCode.SESSION_NOT_FOUND, f'Session "{session_id}" not found')
    log = await core.store.open_log(session_id)
    body = record.to_json()
    body.update(lastSeq=log.last_seq, firstSeq=log.first_seq, turnRunning=False)
    return body


@router.get("/health", summary="Liveness and configuration summary")
async def health(request: Request) -> dict[str, Any]:
    core = _core(request)
    return {
        "status": "ok",
        "version": __version__,
        "provider": core.providers.default_kind,
        "providerConfigured": core.providers.default_kind is not None,
        "connections": len(core.connections),
        "liveSessions": len(core.manager._live),
        "runningTurns": len(core.manager.running_turns()),
    }


@router.get("/sessions", summary="List sessions, newest activity first")
async def list_sessions(
    request: Request,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    agentId: str | None = Query(None),
) -> dict[str, Any]:
    core = _core(request)
    records, total = await core.store.list_sessions(limit, offset, agentId)
    sessions = []
    for r in records:
        live = core.manager.live(r.id)
        sessions.append((live.record if live else r).to_json())
    return {"sessions": sessions, "total": total, "limit": limit, "offset": offset}


@router.get("/sessions/{session_id}", summary="One session, with its event-log position")
async def get_session(request: Request, session_id: str) -> Any:
    return await _session_json(_core(request), session_id)


@router.get("/sessions/{session_id}/messages", summary="The stored messages of a session")
async def get_messages(request: Request, session_id: str) -> Any:
    core = _core(request)
    body = await _session_json(core, session_id)
    if isinstance(body, JSONResponse):
        return body
    messages = await core.store.load_messages(session_id)
    return {
        "sessionId": session_id,
        "lastSeq": body["lastSeq"],
        "messages": [m.to_json() for m in messages],
    }


@router.post("/sessions/{session_id}/resume", summary="Mark a session active again")
async def resume_session(request: Request, session_id: str) -> Any:
    core = _core(request)
    if not SESSION_ID_RE.match(session_id):
        return _error(400, ErrorCode.INVALID_SESSION_ID, "Invalid session id")
    live = await core.manager.get(session_id)
    if live is None:
        return _error(404, ErrorCode.SESSION_NOT_FOUND, f'Session "{session_id}" not found')
    core.manager.activate(live)
    body = live.record.to_json()
    body.update(lastSeq=live.last_seq, firstSeq=live.first_seq, turnRunning=live.turn is not None)
    core.manager.maybe_evict(live)
    return body


@router.delete(
    "/sessions/{session_id}", status_code=204, summary="Delete a session and its database"
)
async def delete_session(request: Request, session_id: str) -> Response:
    core = _core(request)
    if not SESSION_ID_RE.match(session_id):
        return _error(400, ErrorCode.INVALID_SESSION_ID, "Invalid session id")
    if not await core.manager.delete(session_id):
        return _error(404, ErrorCode.SESSION_NOT_FOUND, f'Session "{session_id}" not found')
    return Response(status_code=204)


@router.get("/tools", summary="Every tool, with its schema and each agent's policy")
async def list_tools(request: Request) -> dict[str, Any]:
    core = _core(request)
    tools = []
    for tool in core.tools.all():
        body = tool.spec.to_json()
        policy = {}
        for agent in core.agents.all():
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


@router.get("/agents", summary="The agents a chat can run as")
async def list_agents(request: Request) -> dict[str, Any]:
    core = _core(request)
    default = core.agents.default_id
    return {
        "agents": [AgentDirectory.to_json(a, default) for a in core.agents.all()],
        "default": default,
    }
