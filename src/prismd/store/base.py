"""The store interface: everything durable. SQLite implements it (store/sqlite/), and so does
PostgreSQL (store/postgres/) for several processes and machines.

Writes that sit on the streaming path (`append_events`, `add_message`, `update_message`, …) are
queued in order and applied off the event loop; each returns a `Written` awaitable that
resolves once the write, and every write queued before it, is durable (it raises if the write
failed). The sessions service delivers an event to clients only after its append resolved
(write-ahead delivery), and awaits a session's last write before reading it back.

Reads run apart from the writes (they never wait behind a batch of stream events) and see
what is durable. Nothing above this interface knows about files, threads or SQL.

When the database cannot be reached or cannot write (its server is down, the disk is full),
writes fail and reads raise `StoreUnavailable` within seconds (never a hang); a caller answers
`store_unavailable`. The store recovers by itself once the cause is gone.
"""

from __future__ import annotations

import abc
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..protocol import ErrorCode, PrismdError

# The owner of everything created while no user exists (the open loopback mode).
LOCAL_USER_ID = "local"


class StoreUnavailable(PrismdError):
    """The database cannot be reached or cannot write; the message says which and why (never
    with credentials). Callers answer `store_unavailable`."""

    code = ErrorCode.STORE_UNAVAILABLE


class TouchLimiter:
    """Whether a record's "last used" time is worth writing now: at most once per `every_s`
    for one id (a token's last use used to be written on every request)."""

    def __init__(self, every_s: float = 60.0, remember: int = 10_000) -> None:
        self.every_s = every_s
        self.remember = remember
        self._touched: dict[str, float] = {}

    def due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._touched.get(key, -self.every_s) < self.every_s:
            return False
        if len(self._touched) >= self.remember:
            self._touched.clear()
        self._touched[key] = now
        return True


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
    owner_id: str = LOCAL_USER_ID

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
            "ownerId": self.owner_id,
        }


@dataclass(slots=True)
class UserRecord:
    id: str
    name: str
    admin: bool = False
    password_hash: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "admin": self.admin}


@dataclass(slots=True)
class TokenRecord:
    id: str
    user_id: str
    name: str
    token_hash: str
    created_at: str
    last_used_at: str | None = None


@dataclass(slots=True)
class UploadRecord:
    id: str
    user_id: str
    filename: str
    mime_type: str
    size: int
    created_at: str
    data: bytes = b""

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filename": self.filename,
            "mimeType": self.mime_type,
            "size": self.size,
        }


@dataclass(slots=True)
class LoginRecord:
    """A login session as the admin page shows it; its secret is never stored (only a hash)."""

    token_hash: str
    user_id: str
    created_at: float | None  # epoch seconds (None: made before prismd recorded it)
    expires_at: float  # epoch seconds


@dataclass(slots=True)
class UsageTotals:
    """Sums over stored turns that ended (`complete`, `stopped` or `error`)."""

    turns: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    unpriced_turns: int = 0  # turns whose model has no known price (cost_usd left out)
    sessions: int = 0  # sessions those turns belong to

    def to_json(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "tokensIn": self.tokens_in,
            "tokensOut": self.tokens_out,
            "totalTokens": self.tokens_in + self.tokens_out,
            "costUsd": self.cost_usd,
            "costKnown": self.unpriced_turns == 0,
            "unpricedTurns": self.unpriced_turns,
            "sessions": self.sessions,
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


@dataclass(slots=True, frozen=True)
class ToolCallPart:
    """A tool call an assistant message made, as stored (and sent back to the model)."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(slots=True, frozen=True)
class ToolResultPart:
    """What a `tool` message answers: the call's id, the tool, and how it went."""

    id: str
    name: str
    status: str  # ok | error | denied


def encode_tool_calls(calls: list[ToolCallPart]) -> str | None:
    """The stored (and CortexPrism's REST) form: JSON text `[{id, name, arguments}]`, or null."""
    if not calls:
        return None
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls])


def decode_tool_calls(text: str | None) -> list[ToolCallPart]:
    """The parts of `encode_tool_calls`' text; what cannot be read (an older or damaged row) is
    left out rather than failing the session's load."""
    try:
        raw = json.loads(text) if text else []
    except ValueError:
        return []
    if not isinstance(raw, list):
        return []
    return [
        ToolCallPart(
            str(c.get("id") or ""), str(c.get("name") or ""), str(c.get("arguments") or "{}")
        )
        for c in raw
        if isinstance(c, dict)
    ]


def encode_tool_result(result: ToolResultPart | None) -> str | None:
    if result is None:
        return None
    return json.dumps({"id": result.id, "name": result.name, "status": result.status})


def decode_tool_result(text: str | None) -> ToolResultPart | None:
    try:
        raw = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    return ToolResultPart(
        str(raw.get("id") or ""), str(raw.get("name") or ""), str(raw.get("status") or "")
    )


@dataclass(slots=True)
class MessageRecord:
    id: str
    role: str  # user | assistant | system | tool
    content: str
    created_at: str
    turn_id: str | None = None
    status: str = "complete"  # streaming | complete | stopped | error | interrupted
    token_count: int = 0
    tool_calls: list[ToolCallPart] = field(default_factory=list)  # an assistant message's
    tool_result: ToolResultPart | None = None  # a `tool` message's
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
            "toolCalls": encode_tool_calls(self.tool_calls),
            "toolResult": encode_tool_result(self.tool_result),
            "reasoning": self.reasoning,
            "meta": self.meta,
            "files": [f.meta() for f in self.files],
        }


@dataclass(slots=True)
class StreamingMessage:
    """An assistant message still `streaming` in the store (its turn was cut off)."""

    id: str
    turn_id: str | None
    content: str
    start_seq: int | None  # the session's last seq when the message began (meta.startSeq)


@dataclass(slots=True)
class SessionLog:
    """What a live session needs from its event log when it is loaded, as stored: a turn
    still `running` or a message still `streaming` here was cut off by a crash, and is
    repaired by the sessions service (sessions/repair.py) before the session is used."""

    last_seq: int
    first_seq: int  # oldest seq still held (last_seq + 1 when the log is empty)
    client_turns: dict[str, str]  # clientMessageId -> turnId
    running_turns: list[str] = field(default_factory=list)
    streaming: list[StreamingMessage] = field(default_factory=list)
    messages: int = 0  # how many messages the session holds (a retry elsewhere lowers it)


@dataclass(slots=True)
class SessionActivity:
    """What a session holds, counted by the store (`Store.session_activity`)."""

    messages: int = 0  # messages held
    assistant: int = 0  # assistant messages: one per model call
    tool: int = 0  # tool results
    errors: int = 0  # assistant messages with status `error`
    # Over the `done` events still in the event log with `rounds` > 0 (pruned ones are gone):
    rounds: int = 0  # their model calls (`rounds`)
    llm_ms: float = 0.0  # their model time (`latency.llmMs`)


@dataclass(slots=True)
class NoteRecord:
    """An agent's memory note (`Store.add_note`, `Store.search_notes`)."""

    id: int
    scope: str  # whose note: one agent of one user (ToolContext.memory_scope)
    created_at: str  # UTC, to the second: "2026-01-02T03:04:05Z"
    text: str
    tags: list[str] = field(default_factory=list)


# A notes search looks for at most this many distinct words of its query.
MAX_QUERY_TERMS = 32
_WORD = re.compile(r"\w+")


def query_words(query: str) -> list[str]:
    """The words a notes search looks for: the runs of word characters of `query`, each once,
    at most MAX_QUERY_TERMS. Nothing else of the query is kept, so no user text is ever read
    as search syntax (quotes, operators, prefixes, columns)."""
    words: list[str] = []
    for word in _WORD.findall(query):
        if word not in words:
            words.append(word)
            if len(words) >= MAX_QUERY_TERMS:
                break
    return words


def note_time() -> str:
    """A new note's `created_at`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# An event as logged: (seq, turn id, the frame's JSON text).
EventRow = tuple[int, str | None, str]


# A queued write: awaiting it waits until it is durable (raises if it failed). A caller that
# does not await it loses nothing: the store logs a failed write.
Written = asyncio.Future[None]


class Store(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every queued write is durable."""

    # sessions (core database)
    @abc.abstractmethod
    def create_session(self, record: SessionRecord) -> Written:
        """Queued like the other writes (a new session's first turn does not wait for it).
        A session of that id that exists already is left as it is (client-chosen ids: two
        processes may create the same one at once; the sessions service reads back which)."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def list_sessions(
        self,
        limit: int,
        offset: int,
        agent_id: str | None = None,
        *,
        owner_id: str | None = None,
        query: str | None = None,
        statuses: tuple[str, ...] | None = None,
        order: str = "activity",
    ) -> tuple[list[SessionRecord], int]:
        """Newest activity first (`order` "started": newest started first); `owner_id` None
        means every owner's, `statuses` None every status, `query` a substring of the name
        (case-insensitive)."""

    @abc.abstractmethod
    def update_session(self, session_id: str, **fields: Any) -> Written: ...

    @abc.abstractmethod
    def add_turn_totals(
        self, session_id: str, tokens_in: int, tokens_out: int, cost_usd: float | None, at: str
    ) -> Written: ...

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool: ...

    # agents (core database)
    @abc.abstractmethod
    async def sync_agents(self, agents: list[dict[str, Any]]) -> None: ...

    @abc.abstractmethod
    async def list_custom_agents(self) -> list[dict[str, Any]]:
        """Agents created over the API (rows with `owner_id`)."""

    @abc.abstractmethod
    async def save_agent(self, row: dict[str, Any], owner_id: str) -> None: ...

    @abc.abstractmethod
    async def delete_agent(self, agent_id: str, owner_id: str) -> bool:
        """Agent ids are per user: (owner, id) names a created agent."""

    # users, login sessions, API tokens, preferences, uploads (core database)
    async def data_version(self) -> int:
        """A number that changes when another process (`prismd users|tokens|passwd`) has
        changed the credentials; the server then checks its open sockets again. A store that
        cannot tell answers a constant (changes are then noticed by the periodic check)."""
        return 0

    @abc.abstractmethod
    async def count_users(self) -> int: ...

    @abc.abstractmethod
    async def create_user(self, user: UserRecord) -> None: ...

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def get_user_by_name(self, name: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def list_users(self) -> list[UserRecord]: ...

    @abc.abstractmethod
    async def delete_user(self, user_id: str) -> bool:
        """Also ends the user's login sessions and revokes their tokens."""

    @abc.abstractmethod
    async def set_password(self, user_id: str, password_hash: str) -> None:
        """Also ends the user's login sessions."""

    @abc.abstractmethod
    async def create_login(self, token_hash: str, user_id: str, expires_at: float) -> None: ...

    @abc.abstractmethod
    async def login_user(self, token_hash: str, now: float) -> UserRecord | None:
        """The user of an unexpired login session (expired ones are deleted)."""

    @abc.abstractmethod
    async def delete_login(self, token_hash: str) -> None: ...

    @abc.abstractmethod
    async def create_token(self, token: TokenRecord) -> None: ...

    @abc.abstractmethod
    async def list_tokens(self) -> list[TokenRecord]: ...

    @abc.abstractmethod
    async def revoke_token(self, token_id: str) -> bool: ...

    @abc.abstractmethod
    async def token_user(self, token_hash: str, now: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def get_pref(self, user_id: str, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_pref(self, user_id: str, key: str, value: str | None) -> None: ...

    @abc.abstractmethod
    async def save_upload(self, upload: UploadRecord) -> None: ...

    @abc.abstractmethod
    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        """With its data."""

    # Uploads' lifecycle, daily chat budgets, usage, login sessions (issue 15). A session
    # refers to the uploads sent in its chats (`link_uploads`); an upload no session refers to
    # is removed once old (`prune_uploads`), and a deleted session's uploads go with it
    # (`delete_session_uploads`).

    @abc.abstractmethod
    async def upload_usage(self, user_id: str) -> tuple[int, int]:
        """(bytes, files) of the user's uploads."""

    @abc.abstractmethod
    async def delete_upload(self, upload_id: str) -> bool:
        """Remove an upload (its row, its links and its file)."""

    @abc.abstractmethod
    def link_uploads(self, session_id: str, upload_ids: list[str]) -> Written:
        """The session refers to these uploads (sent in one of its chats): they are kept as
        long as it exists. Queued like the session's other writes (after its creation);
        linking twice is harmless."""

    @abc.abstractmethod
    async def delete_session_uploads(self, session_id: str) -> int:
        """Forget the session's links, and remove the uploads it referred to that no other
        session refers to (rows and files). Returns how many uploads were removed. Called
        when a session is deleted."""

    @abc.abstractmethod
    async def prune_uploads(self, created_before: str) -> int:
        """Remove the uploads created before `created_before` (ISO 8601 UTC, as `created_at`)
        that no session refers to; how many."""

    @abc.abstractmethod
    async def chat_usage(self, user_id: str, day: str) -> tuple[int, int]:
        """(bytes, files) the user's chats sent on `day` (YYYY-MM-DD, UTC), as durable."""

    @abc.abstractmethod
    def add_chat_usage(self, user_id: str, day: str, size: int, files: int) -> Written:
        """Add to the user's totals of `day` (queued like the other writes; the limits are
        checked by the caller, server/uploads.py). Older days of the user may be forgotten."""

    @abc.abstractmethod
    async def usage_totals(self, owner_id: str | None, since: str | None = None) -> UsageTotals:
        """Totals of the turns that ended (with an answer, stopped, or in an error: what
        their model calls used counts) of the owner's sessions (everyone's when None), ended
        at or after `since` (ISO 8601) if given: one SQL aggregate, no message is read."""

    @abc.abstractmethod
    async def list_logins(self, user_id: str | None = None) -> list[LoginRecord]:
        """Unexpired login sessions (of one user if given), newest first."""

    @abc.abstractmethod
    async def get_session_file(self, session_id: str, file_id: str) -> FileRecord | None:
        """One file of a session's messages, with its data."""

    # agents' memory notes (the memory_note and memory_search tools)
    @abc.abstractmethod
    async def add_note(self, scope: str, text: str, tags: list[str]) -> int:
        """Keep a note for `scope` (one agent of one user: ToolContext.memory_scope); returns
        its id once it is durable. Its text and its tags (without commas) are searched."""

    @abc.abstractmethod
    async def search_notes(self, scope: str, query: str, limit: int) -> list[NoteRecord]:
        """At most `limit` of `scope`'s notes (never another scope's) holding any of the
        query's words (`query_words`), the best matches first, the newest first among equals.
        Each word matches as the phrase of the tokens it holds ("foo_bar": "foo" then "bar");
        tokens are runs of letters and digits, compared without case and without the
        diacritics of Latin letters (SQLite FTS5's unicode61 tokenizer, which PostgresStore
        reproduces). A query with no words gives the newest notes. Ranking: bm25 (SQLite),
        ts_rank (PostgreSQL)."""

    # one session's database
    @abc.abstractmethod
    async def open_log(self, session_id: str) -> SessionLog: ...

    @abc.abstractmethod
    async def crashed_sessions(self) -> list[str]:
        """Sessions with a turn still `running` in the store (cut off by a crash, when no
        process runs it)."""

    @abc.abstractmethod
    async def load_messages(
        self, session_id: str, with_file_data: bool = False
    ) -> list[MessageRecord]: ...

    @abc.abstractmethod
    def add_message(self, session_id: str, message: MessageRecord) -> Written: ...

    @abc.abstractmethod
    def update_message(self, session_id: str, message_id: str, **fields: Any) -> Written: ...

    @abc.abstractmethod
    def delete_messages(
        self, session_id: str, message_ids: list[str], forget_turns: list[str] | None = None
    ) -> Written:
        """Queued like the other writes (and so ordered with them). `forget_turns`: turns whose
        clientMessageId is released, so that a resend with the same id runs anew."""

    @abc.abstractmethod
    def append_events(self, session_id: str, events: list[EventRow]) -> Written:
        """Log events (seq strictly increasing, after the session's last)."""

    @abc.abstractmethod
    async def read_events(
        self, session_id: str, after_seq: int, turn_id: str | None = None
    ) -> list[tuple[int, str]]:
        """Durable events with seq > after_seq (of one turn if given), oldest first."""

    @abc.abstractmethod
    async def turn_start_seq(self, session_id: str, turn_id: str) -> int | None:
        """The seq of a turn's first event (its `start`, or a voice turn's `transcribed`)."""

    @abc.abstractmethod
    async def export_session(self, session_id: str, path: str) -> bool:
        """Write one session as a standalone SQLite database in PROTOCOL.md A4's per-session
        layout (`session_messages`, `session_events`, `turns`, `session_files`)."""

    async def session_activity(self, session_id: str) -> SessionActivity:
        """Counts over one session's durable messages and logged `done` events (see
        SessionActivity's fields), for `GET /api/sessions/{id}/stats` and `/enriched`. A store
        should aggregate them in the database (SqliteStore does); this default loads the
        messages and the log. A session with nothing counts zeros."""
        messages = await self.load_messages(session_id)
        activity = SessionActivity(
            len(messages),
            sum(m.role == "assistant" for m in messages),
            sum(m.role == "tool" for m in messages),
            sum(m.role == "assistant" and m.status == "error" for m in messages),
        )
        for _, frame in await self.read_events(session_id, 0):
            if '"type":"done"' not in frame:
                continue
            done = json.loads(frame)
            if done.get("type") == "done" and done.get("rounds"):
                activity.rounds += done["rounds"]
                activity.llm_ms += (done.get("latency") or {}).get("llmMs") or 0
        return activity

    @abc.abstractmethod
    def save_turn(self, session_id: str, turn_id: str, **fields: Any) -> Written: ...

    @abc.abstractmethod
    def prune_events(self, session_id: str, below_seq: int) -> Written: ...
