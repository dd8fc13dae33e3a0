"""`/api/sessions`: list, read, rename, close, archive, resume, delete; messages, retry, stats.

Every route on one session depends on `caller_session` (the id checked, the session found and
the caller's, else 400/404), or on `loaded_session` (the same, loaded in memory for the route
and dropped after it if nobody else holds it), both from the sessions service
(sessions/service.py), which does every change; a refusal of the service (a turn in
progress…) comes out through the ProtocolError handler of common.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Response
from pydantic import BaseModel, Field

from ...protocol import ErrorCode
from ...sessions.service import LiveSession
from ...store.base import SessionRecord
from ..uploads import file_response
from .common import ApiError, Caller, Core, Ok, Open, api_router, doc, invalid
from .rows import message_row, session_row

router = api_router(tags=["sessions"])

# ---------------------------------------------------------------- shapes (OpenAPI)


class SessionRow(Open):
    """CortexPrism's session row; the fields after `parent_session_id` are prismd's."""

    id: str
    name: str | None
    agent_id: str
    channel: str
    status: Literal["active", "closed", "archived"]
    turn_count: int
    context_size: int | None
    started_at: str
    last_turn_at: str | None
    closed_at: str | None
    parent_session_id: str | None
    tokens_in: int
    tokens_out: int
    cost_usd: float = Field(description="0 when unknown: see cost_known")
    cost_known: bool = Field(description="false when a turn used a model with no known price")
    owner_id: str


class SessionDetail(SessionRow):
    last_seq: int = Field(description="The newest event seq the server holds (for `resume`)")
    first_seq: int = Field(description="The oldest event seq still held")
    turn_running: bool


class ActivityStats(BaseModel):
    tokens_in: int
    tokens_out: int
    total_tokens: int
    cost_usd: float
    llm_calls: int
    tool_calls: int
    errors: int
    avg_duration_ms: int = Field(description="Mean duration of a model call")


class EnrichedSession(SessionRow, ActivityStats):
    child_count: int
    children: list[SessionRow]


class SessionTree(SessionRow):
    children: list[SessionRow]


class SessionStats(Open, ActivityStats):
    sessionId: str
    turns: int = Field(description="prismd: turns run in the session")
    messages: int = Field(description="prismd: messages it holds")
    cost_known: bool


class FileRow(BaseModel):
    id: str
    filename: str
    mime_type: str
    size: int


class MessageRow(Open):
    """CortexPrism's message row; the fields after `created_at` are prismd's."""

    id: str
    role: Literal["user", "assistant", "tool", "system"]
    content: str
    tool_calls: str | None = Field(description="JSON text: [{id, name, arguments}]")
    token_count: int
    created_at: str
    tool_result: str | None = Field(description="JSON text: {id, name, status}")
    turn_id: str | None
    status: Literal["streaming", "complete", "stopped", "error", "interrupted"]
    reasoning: str | None
    meta: dict[str, Any]
    files: list[FileRow]


class RenameIn(BaseModel):
    name: str = Field(max_length=200)


class UploadMeta(BaseModel):
    id: str
    filename: str
    mimeType: str
    size: int


class RetryOut(Open):
    success: bool
    sessionId: str
    message: str = Field(description="The text of the dropped user message")
    lastUserMessageId: str
    files: list[UploadMeta] = Field(
        description="prismd: its files, uploaded again; send them back as {fileId} entries"
    )


class DeletedMessage(BaseModel):
    success: bool
    messageId: str


# ---------------------------------------------------------------- the caller's session


def _not_found() -> ApiError:
    return ApiError(404, ErrorCode.SESSION_NOT_FOUND, "Session not found")


async def caller_session(session_id: str, core: Core, caller: Caller) -> SessionRecord:
    """The caller's session (the live copy when it is loaded). Another user's is answered
    exactly like a missing one, so ids are not revealed."""
    record = await core.sessions.find(caller, session_id)
    if record is None:
        raise _not_found()
    return record


OwnSession = Annotated[SessionRecord, Depends(caller_session)]


async def loaded_session(session_id: str, core: Core, caller: Caller) -> AsyncIterator[LiveSession]:
    """The caller's session, loaded for the route; dropped after it unless someone holds it."""
    async with core.sessions.loaded(caller, session_id) as live:
        if live is None:
            raise _not_found()
        yield live


LoadedSession = Annotated[LiveSession, Depends(loaded_session, scope="function")]


async def _detail(core: Core, record: SessionRecord) -> dict[str, Any]:
    position = await core.sessions.position(record)
    return session_row(record) | {
        "last_seq": position["lastSeq"],
        "first_seq": position["firstSeq"],
        "turn_running": position["turnRunning"],
    }


def _fresh(core: Core, record: SessionRecord) -> SessionRecord:
    live = core.sessions.live(record.id)
    return live.record if live is not None else record


async def _activity(core: Core, record: SessionRecord) -> tuple[dict[str, Any], int]:
    """CortexPrism's figures of a session, and how many messages it holds. Tokens and cost as
    spent (the session's totals), calls and errors counted by the store over the messages it
    holds, and the mean model-call time over the `done` events still in its log; nothing is
    loaded (Store.session_activity)."""
    live = core.sessions.live(record.id)
    if live is not None and live.last_write is not None:
        # Count what the live session wrote (reads see what is durable); shielded: a request
        # that goes away must not cancel the session's write.
        with contextlib.suppress(Exception):
            await asyncio.shield(live.last_write)
    counts = await core.store.session_activity(record.id)
    stats = {
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "total_tokens": record.tokens_in + record.tokens_out,
        "cost_usd": record.cost_usd or 0.0,
        "llm_calls": counts.assistant,
        "tool_calls": counts.tool,
        "errors": counts.errors,
        "avg_duration_ms": round(counts.llm_ms / counts.rounds) if counts.rounds else 0,
    }
    return stats, counts.messages


# ---------------------------------------------------------------- listings


STATUS_FILTERS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "visible": ("active", "closed"),
    "active": ("active",),
    "closed": ("closed",),
    "archived": ("archived",),
}
StatusFilter = Literal["all", "visible", "active", "closed", "archived"]
SortOrder = Literal["started", "activity"]


async def _records(
    core: Core,
    caller: Caller,
    limit: int,
    offset: int = 0,
    agent_id: str | None = None,
    q: str | None = None,
    status: StatusFilter = "all",
    sort: SortOrder = "started",
) -> tuple[list[SessionRecord], int]:
    records, total = await core.store.list_sessions(
        limit,
        offset,
        agent_id,
        owner_id=None if caller.admin else caller.id,
        query=q,
        statuses=STATUS_FILTERS[status],
        order=sort,
    )
    return [_fresh(core, r) for r in records], total


@router.get(
    "/sessions",
    summary="The caller's sessions, newest first (admins: everyone's)",
    description="The total number of matching sessions is in the `X-Total-Count` header.",
    responses=doc(list[SessionRow]),
)
async def list_sessions(
    core: Core,
    caller: Caller,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0, description="prismd: paging")] = 0,
    agentId: str | None = None,  # noqa: N803 - CortexPrism's name
    q: Annotated[str | None, Query(max_length=200, description="prismd: part of the name")] = None,
    status: Annotated[
        StatusFilter, Query(description="prismd: visible = active and closed (not archived)")
    ] = "all",
    sort: Annotated[
        SortOrder,
        Query(description="started: newest started first (CortexPrism); activity: newest turn"),
    ] = "started",
) -> list[dict[str, Any]]:
    records, total = await _records(core, caller, limit, offset, agentId, q, status, sort)
    response.headers["X-Total-Count"] = str(total)
    return [session_row(r) for r in records]


@router.get(
    "/sessions/enriched",
    summary="Top-level sessions with their token, call and error figures",
    responses=doc(list[EnrichedSession]),
)
async def enriched_sessions(
    core: Core,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    agentId: str | None = None,  # noqa: N803
) -> list[dict[str, Any]]:
    records, _ = await _records(core, caller, limit, agent_id=agentId)
    rows = []
    for r in records:
        if r.parent_session_id is not None:
            continue
        stats, _ = await _activity(core, r)
        # prismd runs no sub-agents: no session has children.
        rows.append({**session_row(r), **stats, "child_count": 0, "children": []})
    return rows


@router.get(
    "/sessions/tree",
    summary="Top-level sessions that are not archived, each with its child sessions",
    responses=doc(list[SessionTree]),
)
async def session_tree(
    core: Core, caller: Caller, limit: Annotated[int, Query(ge=1, le=500)] = 30
) -> list[dict[str, Any]]:
    records, _ = await _records(core, caller, limit, status="visible")
    return [{**session_row(r), "children": []} for r in records if r.parent_session_id is None]


@router.get(
    "/sessions/search",
    summary="Sessions whose name contains `q`",
    responses=doc(list[SessionRow], 400),
)
async def search_sessions(
    core: Core,
    caller: Caller,
    q: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> list[dict[str, Any]]:
    if not q:
        raise ApiError(
            400, ErrorCode.INVALID_MESSAGE, "Missing q", details={"field": "q", "reason": "missing"}
        )
    records, _ = await _records(core, caller, limit, q=q)
    return [session_row(r) for r in records]


# ---------------------------------------------------------------- one session


@router.get(
    "/sessions/{session_id}",
    summary="One session, with its event-log position",
    responses=doc(SessionDetail, 400, 404),
)
async def get_session(core: Core, session: OwnSession) -> dict[str, Any]:
    return await _detail(core, session)


@router.get(
    "/sessions/{session_id}/messages",
    summary="The stored messages of a session, oldest first",
    description="The newest event seq of the session is in the `X-Last-Seq` header.",
    responses=doc(list[MessageRow], 400, 404),
)
async def get_messages(core: Core, session: OwnSession, response: Response) -> list[dict[str, Any]]:
    position = await core.sessions.position(session)
    messages = await core.sessions.messages(session.id)
    response.headers["X-Last-Seq"] = str(position["lastSeq"])
    return [message_row(m) for m in messages]


@router.get(
    "/sessions/{session_id}/stats",
    summary="Tokens, cost, model and tool calls, errors and turns of a session",
    responses=doc(SessionStats, 400, 404),
)
async def session_stats(core: Core, session: OwnSession) -> dict[str, Any]:
    stats, messages = await _activity(core, session)
    return {
        "sessionId": session.id,
        **stats,
        "turns": session.turn_count,
        "messages": messages,
        "cost_known": session_row(session)["cost_known"],
    }


@router.get(
    "/sessions/{session_id}/children",
    summary="Child sessions (prismd runs no sub-agents: always empty)",
    responses=doc(list[SessionRow], 400, 404),
)
async def session_children(session: OwnSession) -> list[dict[str, Any]]:
    return []


@router.get(
    "/sessions/{session_id}/events",
    summary="CortexPrism's Lens events of a session (prismd has none: always empty)",
    description="prismd's own event log is replayed over the WebSocket with `resume`.",
    responses=doc(list[dict[str, Any]], 400, 404),
)
async def session_events(session: OwnSession) -> list[dict[str, Any]]:
    return []


# POST /api/sessions/{id}/<action>: the status it sets, and its summary.
STATUS_ACTIONS = {
    "resume": ("active", "Mark a session active again"),
    "close": ("closed", "Close a session (a chat or resume opens it again)"),
    "archive": ("archived", "Archive a session (prismd's own app lists it only when asked)"),
}


def _status_route(status: str) -> Callable[..., Any]:
    async def route(core: Core, live: LoadedSession) -> dict[str, Any]:
        await core.sessions.set_status(live, status)
        return {"ok": True}

    return route


for _action, (_status, _summary) in STATUS_ACTIONS.items():
    router.add_api_route(
        f"/sessions/{{session_id}}/{_action}",
        _status_route(_status),
        methods=["POST"],
        name=f"{_action}_session",
        summary=_summary,
        responses=doc(Ok, 400, 404),
    )


@router.patch(
    "/sessions/{session_id}",
    summary="Rename a session",
    responses=doc(Ok, 400, 404),
)
async def rename_session(core: Core, live: LoadedSession, body: RenameIn) -> dict[str, Any]:
    await core.sessions.rename(live, body.name)
    return {"ok": True}


@router.delete(
    "/sessions/{session_id}",
    summary="Delete a session and its database",
    responses=doc(Ok, 400, 404),
)
async def delete_session(core: Core, session: OwnSession) -> dict[str, Any]:
    if not await core.sessions.delete(session.id):
        raise _not_found()
    # Its uploads go with it, unless another session sent them too (server/uploads.py).
    await core.store.delete_session_uploads(session.id)
    return {"ok": True}


@router.get(
    "/sessions/{session_id}/files/{file_id}",
    summary="A file of the session's messages (images inline, anything else as an attachment)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **doc(None, 400, 404)},
)
async def session_file(core: Core, session: OwnSession, file_id: str) -> Response:
    found = await core.store.get_session_file(session.id, file_id)
    if found is None:
        raise ApiError(404, ErrorCode.INVALID_MESSAGE, "File not found")
    return file_response(found.data, found.mime_type, found.filename)


@router.post(
    "/sessions/{session_id}/retry",
    summary="Drop the last exchange (the last user message and all after it)",
    description="Returns the dropped message so that a client can send it again, edited or "
    "not; its files come back as new uploads (send them as `{fileId}`). The model no longer "
    "sees the dropped messages. 400 when there is no user message; 409 during a turn.",
    responses=doc(RetryOut, 400, 404, 409),
)
async def retry(core: Core, caller: Caller, live: LoadedSession) -> dict[str, Any]:
    dropped = await core.sessions.drop_last_exchange(live)  # 409 during a turn
    if dropped is None:
        raise invalid("", "No user message available to retry", status=400)
    return {
        "success": True,
        "sessionId": live.id,
        "message": dropped.content,
        "lastUserMessageId": dropped.id,
        "files": await core.sessions.reupload(caller, dropped),
    }


@router.delete(
    "/sessions/{session_id}/messages/{message_id}",
    summary="Delete one message (the model no longer sees it)",
    responses=doc(DeletedMessage, 400, 404, 409),
)
async def delete_message(core: Core, live: LoadedSession, message_id: str) -> dict[str, Any]:
    if not await core.sessions.delete_message(live, message_id):  # 409 during a turn
        raise ApiError(404, ErrorCode.INVALID_MESSAGE, "Message not found")
    return {"success": True, "messageId": message_id}
