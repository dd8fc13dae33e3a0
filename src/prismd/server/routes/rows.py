"""The shapes of what the REST API (and `prismd sessions|agents --json`) returns: CortexPrism's
(PROTOCOL.md D), so that its clients read prismd unchanged.

Sessions and messages are snake_case database rows, as CortexPrism returns them; prismd's
extras are more fields in the same style. Agents are CortexPrism's camelCase AgentConfig.
Nothing here imports FastAPI: the command line uses these functions too.
"""

from __future__ import annotations

import json
from typing import Any

from ...auth import Principal
from ...config import AgentSettings
from ...store.base import FileRecord, MessageRecord, SessionRecord


def session_row(r: SessionRecord) -> dict[str, Any]:
    """CortexPrism's `sessions` row, plus prismd's running totals and owner."""
    return {
        "id": r.id,
        "name": r.name,
        "agent_id": r.agent_id,
        "channel": r.channel,
        "status": r.status,
        "turn_count": r.turn_count,
        "context_size": None,  # prismd keeps no such figure (context_usage reports it live)
        "started_at": r.started_at,
        "last_turn_at": r.last_turn_at,
        "closed_at": r.closed_at,
        "parent_session_id": r.parent_session_id,
        # prismd's
        "tokens_in": r.tokens_in,
        "tokens_out": r.tokens_out,
        "cost_usd": r.cost_usd or 0.0,
        "cost_known": r.cost_usd is not None or r.turn_count == 0,
        "owner_id": r.owner_id,
    }


def file_row(f: FileRecord) -> dict[str, Any]:
    return {"id": f.id, "filename": f.filename, "mime_type": f.mime_type, "size": f.size}


def message_row(m: MessageRecord) -> dict[str, Any]:
    """CortexPrism's `session_messages` row (`tool_calls` is JSON text or null), plus the
    columns prismd adds; `meta` is the stored JSON object."""
    return {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "tool_calls": m.tool_calls,
        "token_count": m.token_count,
        "created_at": m.created_at,
        # prismd's
        "tool_result": m.tool_result,
        "turn_id": m.turn_id,
        "status": m.status,
        "reasoning": m.reasoning,
        "meta": m.meta,
        "files": [file_row(f) for f in m.files],
    }


def agent_config(
    a: AgentSettings, *, builtin: bool, default: bool = False, owner_id: str | None = None
) -> dict[str, Any]:
    """CortexPrism's AgentConfig. prismd keeps no icon, category, tags or timestamps for an
    agent: those are null (empty for tags). `default` (the caller's default agent) and
    `ownerId` (a created agent's owner) are prismd's."""
    body: dict[str, Any] = {
        "id": a.id,
        "name": a.name,
        "description": a.description,
        "icon": None,
        "category": None,
        "provider": a.provider,
        "model": a.model,
        "systemPrompt": a.system_prompt,
        "temperature": a.temperature,
        "tools": a.tools,
        "tags": [],
        "builtin": builtin,
        "createdAt": None,
        "updatedAt": None,
        "default": default,
    }
    if owner_id is not None:
        body["ownerId"] = owner_id
    return body


def user_json(p: Principal) -> dict[str, Any]:
    """CortexPrism's user (`id`, `username`, `isInstanceAdmin`) and prismd's (`name`,
    `admin`)."""
    return {
        "id": p.id,
        "username": p.name,
        "isInstanceAdmin": p.admin,
        "name": p.name,
        "admin": p.admin,
    }


def tool_params(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON schema's properties as CortexPrism's ToolParam list."""
    required = set(schema.get("required") or ())
    params = []
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "string") if isinstance(prop, dict) else "string"
        if isinstance(kind, list):  # ["string", "null"]
            kind = next((k for k in kind if k != "null"), "string")
        param: dict[str, Any] = {
            "name": name,
            "type": "number" if kind == "integer" else kind,
            "description": prop.get("description", "") if isinstance(prop, dict) else "",
            "required": name in required,
        }
        if isinstance(prop, dict) and isinstance(prop.get("enum"), list):
            param["enum"] = [json.dumps(v) if not isinstance(v, str) else v for v in prop["enum"]]
        params.append(param)
    return params
