"""What the SQLite and the PostgreSQL stores share, all of it pure (no I/O): the tables'
column lists, the columns an update may set, row conversion, and the figures both writers use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .base import (
    FileRecord,
    MessageRecord,
    NoteRecord,
    SessionRecord,
    UploadRecord,
    decode_tool_calls,
    decode_tool_result,
    encode_tool_calls,
    encode_tool_result,
)

# The columns of a session's tables that the per-session layout has too (store/session_file.py).
_MESSAGE_COLUMNS = (
    "id, role, content, tool_calls, tool_result, token_count, created_at, turn_id, status, "
    "reasoning, meta"
)
_FILE_COLUMNS = "id, message_id, filename, mime_type, size, data, text"
_TURN_COLUMNS = (
    "id, client_message_id, status, stop_reason, started_at, ended_at, provider, model, "
    "tokens_in, tokens_out, cost_usd"
)
# A session's columns, in the order of its rows (`_session_row`).
_SESSION_FIELDS_ORDER = (
    "id",
    "name",
    "agent_id",
    "channel",
    "status",
    "turn_count",
    "started_at",
    "last_turn_at",
    "closed_at",
    "parent_session_id",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "owner_id",
)
_SESSION_COLUMNS = ", ".join(_SESSION_FIELDS_ORDER)
# A user's columns, in the order of UserRecord's fields.
_USER_FIELDS = ("id", "name", "admin", "password_hash", "created_at")
_USER_COLUMNS = ", ".join(_USER_FIELDS)
# The columns `update_message`, `update_session` and `save_turn` may set (`_check_fields`).
_MESSAGE_FIELDS = {"content", "status", "token_count", "reasoning", "meta", "tool_calls"}
_SESSION_FIELDS = {"name", "agent_id", "status", "closed_at", "last_turn_at", "channel"}
_TURN_FIELDS = {
    "client_message_id",
    "status",
    "stop_reason",
    "started_at",
    "ended_at",
    "provider",
    "model",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "start_seq",
}
# An upload no existing session refers to (a link whose session is gone does not count: a
# session deleted by a process that did not clean its links frees its uploads all the same).
_UNREFERENCED = (
    "NOT EXISTS (SELECT 1 FROM upload_refs r JOIN sessions s ON s.id = r.session_id "
    "WHERE r.upload_id = uploads.id)"
)
# The turns a user's usage totals count (both dialects): ended ones, and a failed one only
# when its model calls spent something (a turn refused before any call used nothing).
_COUNTED_TURN = (
    "(t.status IN ('complete', 'stopped') OR (t.status = 'error' AND "
    "(COALESCE(t.tokens_in, 0) + COALESCE(t.tokens_out, 0) > 0 OR t.cost_usd IS NOT NULL)))"
)
# The most writes a store's writer applies in one transaction.
MAX_BATCH = 4096
# A token's last use is written at most this often (every request used to write it).
TOKEN_TOUCH_S = 60.0


def _session_row(r: SessionRecord) -> tuple[Any, ...]:
    return tuple(getattr(r, name) for name in _SESSION_FIELDS_ORDER)


def _message_rows(
    session_id: str, message: MessageRecord
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """A message's row of `session_messages` (id, session_id, role, content, tool_calls,
    tool_result, token_count, created_at, turn_id, status, reasoning, meta) and its files' rows
    of `session_files` (id, session_id, message_id, filename, mime_type, size, data, text)."""
    row = (
        message.id,
        session_id,
        message.role,
        message.content,
        encode_tool_calls(message.tool_calls),
        encode_tool_result(message.tool_result),
        message.token_count,
        message.created_at,
        message.turn_id,
        message.status,
        message.reasoning,
        json.dumps(message.meta),
    )
    files = [
        (f.id, session_id, message.id, f.filename, f.mime_type, f.size, f.data, f.text)
        for f in message.files
    ]
    return row, files


def _upload_row(upload: UploadRecord) -> tuple[Any, ...]:
    """An upload's columns but its bytes: (id, user_id, filename, mime_type, size,
    created_at)."""
    return (
        upload.id,
        upload.user_id,
        upload.filename,
        upload.mime_type,
        upload.size,
        upload.created_at,
    )


def _name_pattern(query: str) -> str:
    """A LIKE pattern (with ESCAPE '\\') matching any text that contains `query`."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _note(scope: str, row: Sequence[Any]) -> NoteRecord:
    """A note from (id, created_at, text, tags) as stored (tags joined with ", ")."""
    note_id, created_at, text, tags = row
    return NoteRecord(int(note_id), scope, created_at, text, tags.split(", ") if tags else [])


def _message(row: Sequence[Any], files: list[FileRecord]) -> MessageRecord:
    """A message from its row of `_MESSAGE_COLUMNS` (tool calls, result and meta decoded)."""
    (mid, role, content, calls, result, tokens, created, turn_id, status, reasoning, meta) = row
    return MessageRecord(
        id=mid,
        role=role,
        content=content,
        tool_calls=decode_tool_calls(calls),
        tool_result=decode_tool_result(result),
        token_count=tokens,
        created_at=created,
        turn_id=turn_id,
        status=status,
        reasoning=reasoning,
        meta=json.loads(meta or "{}"),
        files=files,
    )


def _message_update(fields: dict[str, Any]) -> dict[str, Any]:
    """`update_message`'s fields as column values (meta and tool calls encoded)."""
    _check_fields(fields, _MESSAGE_FIELDS)
    if "meta" in fields:
        fields["meta"] = json.dumps(fields["meta"])
    if "tool_calls" in fields:
        fields["tool_calls"] = encode_tool_calls(fields["tool_calls"])
    return fields


def _check_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns: {sorted(unknown)}")
