"""The wire protocol: every client message, every server event, every error code.

The tables in PROTOCOL.md (parts A and B) and this module are meant to be read side by side.
Client messages are pydantic models, so a validation failure names the field. Server events are
TypedDicts (one per `type`, the `ServerEvent` union at the bottom): typed where they are built
and checked by mypy, and plain dicts at run time, because they are produced on the hot path.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, NotRequired, cast, get_args, get_type_hints

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

# typing_extensions: pydantic validates these TypedDicts (tests do) only from it on Python 3.11.
from typing_extensions import TypedDict

PROTOCOL_VERSION = 1
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    EMPTY_MESSAGE = "empty_message"
    TURN_IN_PROGRESS = "turn_in_progress"
    AGENT_NOT_FOUND = "agent_not_found"
    INVALID_SESSION_ID = "invalid_session_id"
    SESSION_NOT_FOUND = "session_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    PROVIDER_UNCONFIGURED = "provider_unconfigured"
    PROVIDER_ERROR = "provider_error"
    PROVIDER_TIMEOUT = "provider_timeout"
    TOOL_ERROR = "tool_error"
    STT_UNAVAILABLE = "stt_unavailable"
    TTS_UNAVAILABLE = "tts_unavailable"
    TRANSCRIPTION_FAILED = "transcription_failed"
    RESUME_GAP = "resume_gap"
    STORE_UNAVAILABLE = "store_unavailable"
    BUS_UNAVAILABLE = "bus_unavailable"
    INTERNAL = "internal"


class PrismdError(Exception):
    """The root of prismd's failures (as HTTPX's exceptions): each subclass says what failed
    and carries the error code a client is told (PROTOCOL.md B4). Subclasses: ProtocolError
    (a refused request), providers' ProviderError, tools' ToolError, the store's
    StoreUnavailable, voice's VoiceError, auth's RateLimited."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ProtocolError(PrismdError):
    """A request the server refuses; becomes an `error` frame with a code (no seq)."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message, code)
        self.details = details


# ---------------------------------------------------------------- client -> server


class _Msg(BaseModel):
    # Unknown extra fields are ignored (forward compatibility), types are strict enough to
    # reject a number where a string belongs.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


SessionId = Annotated[str, Field(max_length=256)]


class FileIn(_Msg):
    # Either inline (`filename` and base64 `data`) or a file uploaded before with
    # `POST /api/upload` (`fileId`; its name and type come from the upload).
    filename: Annotated[str, Field(min_length=1, max_length=255)] = "file"
    mimeType: str = "application/octet-stream"
    data: str | None = None  # base64
    fileId: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @model_validator(mode="after")
    def _data_or_file_id(self) -> FileIn:
        if (self.data is None) == (self.fileId is None):
            raise ValueError("give either `data` (base64) or `fileId`")
        return self


class Ping(_Msg):
    type: Literal["ping"]


class Chat(_Msg):
    type: Literal["chat"]
    message: str = ""
    sessionId: SessionId | None = None
    agentId: str | None = None
    model: str | None = None
    modelMode: Literal["manual", "auto"] | None = None
    reasoningEffort: Literal["low", "medium", "high"] | None = None
    files: list[FileIn] = Field(default_factory=list)
    clientMessageId: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    speak: bool = False  # speak the answer (`audio` events, sentence by sentence)
    voice: Annotated[str, Field(max_length=128)] | None = None


class Stop(_Msg):
    type: Literal["stop"]


class NewSession(_Msg):
    type: Literal["new_session"]


class SelectAgent(_Msg):
    type: Literal["select_agent"]
    agentId: str


class Resume(_Msg):
    type: Literal["resume"]
    sessionId: SessionId
    lastSeq: Annotated[int, Field(ge=0)] | None = None


class ApprovalResponse(_Msg):
    type: Literal["approval_response"]
    requestId: str
    approved: bool


class AudioChunk(_Msg):
    type: Literal["audio_chunk"]
    data: str = ""
    format: Annotated[str, Field(max_length=32)] | None = None
    sampleRate: Annotated[int, Field(ge=4000, le=192_000)] | None = None
    session: Any = None


class AudioEnd(_Msg):
    type: Literal["audio_end"]
    session: Any = None
    sessionId: SessionId | None = None
    agentId: str | None = None
    model: str | None = None
    language: Annotated[str, Field(max_length=16)] | None = None
    speak: bool = False
    voice: Annotated[str, Field(max_length=128)] | None = None


class VoiceStream(_Msg):
    """Hands-free mode: PCM frames (binary, or base64 `audio_chunk`s) after `start`; the
    server finds the end of each utterance with VAD and starts the turn itself."""

    type: Literal["voice_stream"]
    action: Literal["start", "stop"]
    format: Literal["pcm16"] = "pcm16"
    sampleRate: Annotated[int, Field(ge=8000, le=48_000)] = 16_000
    sessionId: SessionId | None = None
    agentId: str | None = None
    model: str | None = None
    speak: bool = True
    voice: Annotated[str, Field(max_length=128)] | None = None
    silenceMs: Annotated[int, Field(ge=100, le=10_000)] | None = None


class Speak(_Msg):
    type: Literal["speak"]
    text: str
    voice: str | None = None


class VoiceState(_Msg):
    type: Literal["voice_state"]
    speaking: bool | None = None
    enabled: bool | None = None


ClientMessage = Annotated[
    Ping
    | Chat
    | Stop
    | NewSession
    | SelectAgent
    | Resume
    | ApprovalResponse
    | AudioChunk
    | AudioEnd
    | Speak
    | VoiceState
    | VoiceStream,
    Field(discriminator="type"),
]
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (
        Ping,
        Chat,
        Stop,
        NewSession,
        SelectAgent,
        Resume,
        ApprovalResponse,
        AudioChunk,
        AudioEnd,
        Speak,
        VoiceState,
        VoiceStream,
    )
)


def parse_client_message(text: str) -> ClientMessage:
    """Parse one text frame. Raises ProtocolError with the right code."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # The text is CortexPrism's exactly; the parser's detail goes in `details`.
        raise ProtocolError(
            ErrorCode.INVALID_JSON, "Invalid JSON", {"field": "", "reason": str(exc)}
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "A message must be a JSON object with a string `type`",
            {"field": "", "reason": f"expected an object, got {type(raw).__name__}"},
        )
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "A message needs a string `type`",
            {"field": "type", "reason": "missing or not a string"},
        )
    if kind not in CLIENT_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"Unknown message type {clean_text(kind[:64])!r}"
        )
    if _SURROGATE_ESCAPE.search(text):  # only an escape can smuggle in a lone surrogate
        where = _lone_surrogate(raw, "")
        if where is not None:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"Invalid `{kind}` message: {where or 'message'}: contains an unpaired "
                "UTF-16 surrogate (not valid Unicode text)",
                {"field": where, "reason": "unpaired surrogate"},
            )
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in err["loc"][1:])  # drop the discriminator tag
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"Invalid `{kind}` message: {field or 'message'}: {err['msg']}",
            {"field": field, "reason": err["msg"]},
        ) from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, any surrogate left is unpaired


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding an unpaired surrogate, else None."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if not _encodable(key):
                return path or "(key)"
            found = _lone_surrogate(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(text: str) -> str:
    """Text safe to store and send: unpaired surrogates (from a model's or a tool's escaped
    JSON) become U+FFFD."""
    if _encodable(text):
        return text
    return _SURROGATE.sub("\ufffd", text)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID_RE.match(session_id):
        raise ProtocolError(
            ErrorCode.INVALID_SESSION_ID,
            "Invalid session id: use 1-128 characters from A-Z, a-z, 0-9, '_' and '-'",
        )
    return session_id


# ---------------------------------------------------------------- server -> client


class _Routed(TypedDict, total=False):
    """What the sessions service adds to a session event when it logs it (PROTOCOL.md A2)."""

    sessionId: str
    turnId: str
    seq: int


class ConnectedEvent(_Routed):
    type: Literal["connected"]
    protocol: int
    server: str
    connectionId: str


class PongEvent(_Routed):
    type: Literal["pong"]


class SessionEvent(_Routed):
    type: Literal["session"]
    agentId: str | None
    agentName: str | None
    lastSeq: NotRequired[int]  # on `resume`
    turnRunning: NotRequired[bool]


class SessionEndedEvent(_Routed):
    type: Literal["session_ended"]
    reason: NotRequired[str]


class AgentSelectedEvent(_Routed):
    type: Literal["agent_selected"]
    agentId: str
    agentName: str


class StartEvent(_Routed):
    type: Literal["start"]


class ChunkEvent(_Routed):
    type: Literal["chunk"]
    delta: str


class ReasoningEvent(_Routed):
    type: Literal["reasoning"]
    content: str


class ToolStartEvent(_Routed):
    type: Literal["tool_start"]
    id: str
    name: str
    input: Any


class ToolEndEvent(_Routed):
    type: Literal["tool_end"]
    id: str
    name: str
    status: str  # "success" | "error" | "denied"
    output: str
    durationMs: float


class ApprovalRequestBody(TypedDict):
    tool: str
    query: str
    requestReason: str
    sessionId: str
    agentId: str
    dataClassification: str


class ApprovalRequestEvent(_Routed):
    type: Literal["approval_request"]
    requestId: str
    toolCallId: str
    reasoning: str
    request: ApprovalRequestBody


class ApprovalResolvedEvent(_Routed):
    type: Literal["approval_resolved"]
    requestId: str
    approved: bool


class StoppedEvent(_Routed):
    type: Literal["stopped"]
    turnRunning: NotRequired[bool]  # sent to the asker alone when no turn was running


class TranscribedEvent(_Routed):
    type: Literal["transcribed"]
    text: str
    confidence: float
    language: str | None
    durationMs: int


class AudioEvent(_Routed):
    type: Literal["audio"]
    data: str  # base64 WAV
    format: str
    sampleRate: int
    durationMs: int
    index: NotRequired[int]  # a spoken reply's sentence, in order
    text: NotRequired[str]


class SpeechErrorEvent(_Routed):
    type: Literal["speech_error"]
    code: str
    error: str


class Latency(TypedDict):
    firstTokenMs: float | None
    llmMs: float
    toolMs: float
    totalMs: float


class DoneEvent(_Routed):
    type: Literal["done"]
    tokensIn: int
    tokensOut: int
    costUsd: float | None
    durationMs: int
    model: str | None
    reasoningEffort: str | None
    finalContent: str
    requestedModelMode: str
    resolvedProvider: str | None
    resolvedModel: str | None
    autoFallback: bool
    autoFallbackReason: str | None
    stopReason: str
    costSource: dict[str, Any] | None
    usageEstimated: bool
    rounds: NotRequired[int]
    latency: NotRequired[Latency]
    modelChoice: NotRequired[str]  # modelMode "auto": the rule that chose
    interruptedReason: NotRequired[str]  # a turn cut off by a crash


class ContextBreakdown(TypedDict):
    systemPrompt: int
    userMessages: int
    assistantMessages: int
    reasoningOverhead: int


class ContextUsageEvent(_Routed):
    type: Literal["context_usage"]
    usedTokens: int
    maxContext: int
    percentage: float
    breakdown: ContextBreakdown


class ErrorEvent(_Routed):
    type: Literal["error"]
    error: str
    code: str
    details: NotRequired[dict[str, Any]]
    retryAfterMs: NotRequired[int]


class VoiceStateEvent(_Routed):
    type: Literal["voice_state"]
    speaking: bool


class VoiceStreamEvent(_Routed):
    type: Literal["voice_stream"]
    action: Literal["started", "stopped"]
    active: bool
    format: NotRequired[str]
    sampleRate: NotRequired[int]
    silenceMs: NotRequired[int]


# Every server frame (PROTOCOL.md A2 and B), in the order of the protocol's table.
ServerEvent = (
    ConnectedEvent
    | PongEvent
    | SessionEvent
    | SessionEndedEvent
    | AgentSelectedEvent
    | StartEvent
    | ChunkEvent
    | ReasoningEvent
    | ToolStartEvent
    | ToolEndEvent
    | ApprovalRequestEvent
    | ApprovalResolvedEvent
    | StoppedEvent
    | TranscribedEvent
    | AudioEvent
    | SpeechErrorEvent
    | DoneEvent
    | ContextUsageEvent
    | ErrorEvent
    | VoiceStateEvent
    | VoiceStreamEvent
)

# Every `type` a server frame may have, read from the union above. The web app's
# /static/js/protocol.js is generated from these, the client types and ErrorCode
# (server/web.py), so the app never spells a name by hand.
EVENT_TYPES: tuple[str, ...] = tuple(
    get_args(get_type_hints(event)["type"])[0] for event in get_args(ServerEvent)
)


def error_frame(code: ErrorCode | str, message: str, **extra: Any) -> ErrorEvent:
    """An `error` event; `extra` (details, retryAfterMs, sessionId…) without its None values."""
    frame: dict[str, Any] = {"type": "error", "error": message, "code": str(code)}
    frame.update({k: v for k, v in extra.items() if v is not None})
    return cast(ErrorEvent, frame)


def dumps(frame: ServerEvent | dict[str, Any]) -> str:
    """A frame's JSON text (orjson: this runs once per event on the hot path)."""
    try:
        return orjson.dumps(frame).decode()
    except (orjson.JSONEncodeError, TypeError):
        # A lone surrogate slipped in (orjson refuses them): escape it rather than fail to
        # send the frame.
        return json.dumps(frame, ensure_ascii=True, separators=(",", ":"))
