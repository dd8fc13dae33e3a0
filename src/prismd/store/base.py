"""The store interface. SQLite implements it now; PostgreSQL may later.

Writes that sit on the streaming path (`append_event`, `update_message`, …) are fire-and-forget:
they are queued in order and applied by the store off the event loop. Reads are awaited and
see every write queued before them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SessionRecord:
    id: str
    agent_id: str
    name: str = ""
    channel: str = "web"
    status: str = "active"  # active | closed | archived
    turn_count: int = 0
    started_at: str = ""
    last_turn_at: str | None = None
    closed_at: str | None = None
    parent_session_id: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "agentId": self.agent_id,
            "channel": self.channel,
            "status": self.status,
            "turnCount": self.turn_count,
            "startedAt": self.started_at,
            "lastTurnAt": self.last_turn_at,
            "closedAt": self.closed_at,
            "parentSessionId": self.parent_session_id,
            "tokensIn": self.tokens_in,
            "tokensOut": self.tokens_out,
            "costUsd": self.cost_usd,
        }


@dataclass(slots=True)
class FileRecord:
    id: str
    filename: str
    mime_type: str
    size: int
    data: bytes
    text: str | None = None  # extracted text (text files, PDFs)

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filename": self.filename,
            "mimeType": self.mime_type,
            "size": self.size,
        }


@dataclass(slots=True)
class MessageRecord:
    id: str
    role: str  # user | assistant | system | tool
    content: str
    created_at: str
    turn_id: str | None = None
    status: str = "complete"  # streaming | complete | stopped | error | interrupted
    token_count: int = 0
    tool_calls: str | None = None
    tool_result: str | None = None
    reasoning: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[FileRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "createdAt": self.created_at,
            "turnId": self.turn_id,
            "status": self.status,
            "tokenCount": self.token_count,
            "toolCalls": self.tool_calls,
            "toolResult": self.tool_result,
            "reasoning": self.reasoning,
            "meta": self.meta,
            "files": [f.meta() for f in self.files],
        }


@dataclass(slots=True)
class SessionLog:
    """What a live session needs from its event log when it is loaded."""

    last_seq: int
    first_seq: int  # oldest seq still held (last_seq + 1 when the log is empty)
    client_turns: dict[str, str]  # clientMessageId -> turnId


class Store(abc.ABC):
    # Set by the session manager: called on the event loop with {session id: highest seq}
    # when the events up to that seq are durable (committed). Frames go out only then, so a
    # client never sees an event that a crash could take back.
    on_events_durable: Callable[[dict[str, int]], None] | None = None

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every queued write is durable."""

    # sessions (core database)
    @abc.abstractmethod
    def create_session(self, record: SessionRecord) -> None:
        """Queued like the other writes: creating a session database costs a disk sync, and a
        new session's first turn must not wait for it."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def list_sessions(
        self, limit: int, offset: int, agent_id: str | None = None
    ) -> tuple[list[SessionRecord], int]: ...

    @abc.abstractmethod
    def update_session(self, session_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> None: ...

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool: ...

    # agents (core database)
    @abc.abstractmethod
    async def sync_agents(self, agents: list[dict[str, Any]]) -> None: ...

    # one session's database
    @abc.abstractmethod
    async def open_log(self, session_id: str) -> SessionLog: ...

    @abc.abstractmethod
    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]: ...

    @abc.abstractmethod
    def add_message(self, session_id: str, message: MessageRecord) -> None: ...

    @abc.abstractmethod
    def update_message(self, session_id: str, message_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def append_event(self, session_id: str, seq: int, turn_id: str | None, frame: str) -> None: ...

    @abc.abstractmethod
    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]: ...

    @abc.abstractmethod
    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def prune_events(self, session_id: str, below_seq: int) -> None: ...
