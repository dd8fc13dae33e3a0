"""Configuration: a TOML file, overridden by environment variables, overridden by flags.

`$PRISMD_HOME/config.toml` (PRISMD_HOME defaults to ~/.prismd). A bad file is reported as a
ConfigError whose message names the key and the problem; the CLI prints it without a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
)

ProviderKind = Literal["openai", "anthropic", "ollama", "local"]
# "provider:model" (the model may hold colons: "ollama:llama3:8b") or "provider" alone.
ModelSpec = Annotated[
    str, Field(pattern=r"^(openai|anthropic|ollama|local)(:.{1,200})?$", max_length=220)
]
PROVIDER_KINDS: tuple[str, ...] = ("openai", "anthropic", "ollama", "local")

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant running inside prismd, a self-hosted AI server. "
    "Answer clearly and concisely; use Markdown where it helps."
)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


# Bounds of every agent field, in one place: the config file's agents and those users create
# over REST (server/rest.py's AgentIn/AgentPatch use the same types). Nothing a user sends can
# make an agent that costs the server more than these (issue 11: a 40,000-pattern tool list).
AgentId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
AgentName = Annotated[str, Field(min_length=1, max_length=100)]
AgentDescription = Annotated[str, Field(max_length=2_000)]
ModelName = Annotated[str, Field(min_length=1, max_length=200)]
SystemPrompt = Annotated[str, Field(max_length=100_000)]
ToolPattern = Annotated[str, Field(min_length=1, max_length=128)]
ToolPatterns = Annotated[list[ToolPattern], Field(max_length=256)]


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network") from None


IpNetwork = Annotated[str, AfterValidator(_network)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 3000
    data_dir: Path | None = None
    # A text frame larger than this gets `payload_too_large` (the socket stays open). Frames over
    # `hard_frame_bytes` are refused by the WebSocket layer itself (close code 1009).
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    hard_frame_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    max_files: Annotated[int, Field(ge=0)] = 10
    max_file_bytes: Annotated[int, Field(ge=1)] = 10 * 1024 * 1024
    # A connection with this many frames waiting while its socket takes no more bytes (it reads
    # slower than its frames come, by this many, or not at all) is dropped (server/ws.py).
    send_queue_frames: Annotated[int, Field(ge=16)] = 10_000
    # …or this many bytes of frames (pieces that arrive together are merged into one frame, so
    # a client that does not read may hold few, large frames).
    send_queue_bytes: Annotated[int, Field(ge=65536)] = 16 * 1024 * 1024
    # Events kept per session for `resume`; older ones are pruned (a resume before them gets
    # `resume_gap`).
    max_events_per_session: Annotated[int, Field(ge=100)] = 50_000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Frames a connection may send: a token bucket of `rate_burst` frames refilled at
    # `rate_messages_per_s`. Frames over it get `rate_limited` and are dropped.
    rate_messages_per_s: Annotated[float, Field(gt=0)] = 100.0
    rate_burst: Annotated[int, Field(ge=1)] = 300
    # Concurrent WebSocket connections per client address (0 = unlimited). Loopback clients
    # are exempt unless `limit_loopback` (a local user already has the machine).
    max_connections_per_client: Annotated[int, Field(ge=0)] = 64
    # On shutdown (SIGTERM), wait this long for running turns to finish before they are cut
    # off (kept as far as they streamed, marked interrupted). Default: 30 s when several
    # processes share the sessions (a rolling restart loses no answer: the clients reconnect
    # to another process and resume), 0 for one process.
    drain_s: Annotated[float, Field(ge=0)] | None = None
    limit_loopback: bool = False
    # Reverse proxies (addresses or networks, e.g. "127.0.0.1", "10.0.0.0/8") whose
    # X-Forwarded-For / X-Forwarded-Proto are believed. None by default: the client address
    # (login limits, connection limits) is the socket's peer and the scheme is the socket's.
    trusted_proxies: list[IpNetwork] = Field(default_factory=list)


class StoreSettings(_Section):
    # PostgreSQL for everything durable ("postgresql://user:pass@host:5432/db"), shared by
    # every prismd process and machine; unset: the embedded SQLite database in data_dir.
    url: str | None = None
    # Connections for reads, per process (the writer has one of its own).
    pool_size: Annotated[int, Field(ge=1, le=100)] = 10
    # A statement, or a connection attempt, that takes longer fails with store_unavailable.
    timeout_s: Annotated[float, Field(gt=0)] = 5.0

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user:password@host:port/database URL")
        return url or None


class ProviderSettings(_Section):
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    # Idle time allowed between two pieces of a stream (and for the response headers).
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Retries with backoff on 429/5xx/connection errors, only before the first token.
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    context_window: Annotated[int, Field(gt=0)] | None = None
    vision: bool = True
    # How tools reach the model: the API's native tool calling, or the text protocol
    # (<tool_call>{"tool": …, "args": …}</tool_call>) for models without it. "auto": native,
    # except for a local model whose chat template declares no tool support.
    tool_calling: Literal["auto", "native", "text"] = "auto"
    # Models of this provider that need the text protocol (fnmatch patterns).
    text_tool_models: list[str] = Field(default_factory=list)
    # The longest answer asked of the model; default 4096 (1024 for a `local` model).
    max_output_tokens: Annotated[int, Field(gt=0)] | None = None
    # The `local` provider only (GGUF models run by prismd's own llama.cpp runtime):
    # false: never start a local runtime (no offline default model either).
    enabled: bool = True
    # More GGUF models by name: {qwen = "/path/qwen.gguf"}; `model` may name one of them.
    models: dict[str, str] = Field(default_factory=dict)
    # Threads of llama.cpp; 0: half the CPUs (at least one), which leaves room for prismd: on a
    # busy machine llama.cpp's spinning threads slow down many times over (docs/benchmarks.md).
    threads: Annotated[int, Field(ge=0)] = 0
    # Streams generated at once (continuous batching); they share `context_window` tokens.
    parallel: Annotated[int, Field(ge=1, le=64)] = 4
    repeat_penalty: Annotated[float, Field(ge=0)] = 1.1
    seed: Annotated[int, Field(ge=0)] | None = None
    # How long a chat waits for the model to load before `provider_timeout`.
    load_timeout_s: Annotated[float, Field(gt=0)] = 300.0


# Keys of ProviderSettings that only the `local` provider reads.
LOCAL_ONLY_KEYS = frozenset(
    {"enabled", "models", "threads", "parallel", "repeat_penalty", "seed", "load_timeout_s"}
)


class ShellSettings(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_output_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    memory_mb: Annotated[int, Field(ge=64)] = 2048
    max_processes: Annotated[int, Field(ge=8)] = 256
    # Who runs in the sandbox (tools/builtins/sandbox.py): "untrusted" callers only (non-admin
    # users of a server with users; trusted callers get the host shell in the workspace), or
    # "always". In the sandbox the network is cut unless `network`.
    sandbox: Literal["untrusted", "always"] = "untrusted"
    network: bool = False


class CodeExecSettings(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    cpu_s: Annotated[int, Field(ge=1)] = 30
    memory_mb: Annotated[int, Field(ge=64)] = 512
    max_output_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    # Let the process reach the network (it is cut by default: an empty network namespace);
    # see the README for what isolation is in force.
    network: bool = False


class WebFetchSettings(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 20.0
    max_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024 * 1024
    max_redirects: Annotated[int, Field(ge=0)] = 5
    # Loopback, private and link-local addresses are refused unless this is true.
    allow_private: bool = False


class McpServerSettings(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
    # stdio: a command (and args/env); streamable HTTP: a url (and headers).
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # Tools of this server that need the user's approval ("*" for all).
    approve: list[str] = Field(default_factory=list)
    # Its tools act with the server's credentials for every caller, so in a server with users
    # only admins get them, unless this is true (the server is safe to share: it keeps each
    # user apart itself) or a grant names them (tools.grants, an agent's `grant`).
    allow_users: bool = False
    # What its tools' data is, for approval requests' `dataClassification` (None: "restricted"
    # for a server only admins may use, else "internal").
    data_classification: Literal["public", "internal", "confidential", "restricted"] | None = None


class ToolsSettings(_Section):
    # Give every session its own workspace under the agent's, instead of one per agent.
    workspace_per_session: bool = False
    max_rounds: Annotated[int, Field(ge=1, le=100)] = 12
    # Tool output sent to the model is cut at this many characters, with a note.
    max_output_chars: Annotated[int, Field(ge=256)] = 16_000
    # Tool output shown in `tool_end` is cut at this many characters.
    display_output_chars: Annotated[int, Field(ge=64)] = 2_000
    approval_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Host-level tools (`shell`, MCP servers not marked allow_users) that non-admin users may
    # use, by user name: {alice = ["shell"]} (names or fnmatch patterns). Admins need none.
    grants: dict[str, list[str]] = Field(default_factory=dict)
    shell: ShellSettings = Field(default_factory=ShellSettings)
    code_exec: CodeExecSettings = Field(default_factory=CodeExecSettings)
    web_fetch: WebFetchSettings = Field(default_factory=WebFetchSettings)


class AgentSettings(_Section):
    id: AgentId
    name: AgentName
    description: AgentDescription = ""
    provider: ProviderKind | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    # Tools this agent may use: names or fnmatch patterns ("file_*", "github__*", "*").
    tools: ToolPatterns = Field(default_factory=lambda: ["*"])
    # Tools that need the user's approval in addition to those that need it by default…
    approve: ToolPatterns = Field(default_factory=list)
    # …and tools this agent may run without asking (e.g. "shell" for a trusted agent).
    auto_approve: ToolPatterns = Field(default_factory=list)
    # Host-level tools this agent may use for every user, admin or not (config file only:
    # agents created over the API cannot carry grants).
    grant: ToolPatterns = Field(default_factory=list)
    # Models to fall back to, in order, when this agent's fails before its first token (after
    # its retries) or is not configured: "provider:model" or "provider" (its default model).
    # None: the server's `fallback` list.
    fallback: list[ModelSpec] | None = None


BUILTIN_AGENT = AgentSettings(
    id="assistant",
    name="Assistant",
    description="A general-purpose assistant (built in).",
)


class AuthSettings(_Section):
    # A static API token (`Authorization: Bearer …`, or `?token=` on the /ws upgrade) that acts
    # as the admin; users and their tokens are managed with `prismd users` / `prismd tokens`.
    token: Annotated[str, Field(min_length=16)] | None = None
    # Login sessions (the `prismd_session` cookie) expire after this many hours.
    session_ttl_hours: Annotated[float, Field(gt=0)] = 168.0
    # Origins (scheme://host[:port]) besides the server's own whose pages may change things
    # (unsafe methods) or open a WebSocket with the login cookie; other origins get 403.
    allowed_origins: list[str] = Field(default_factory=list)
    # Failed logins allowed per client address within a minute (then 429 until the oldest is a
    # minute old), and per username before each further attempt for that name must wait…
    login_attempts_per_minute: Annotated[int, Field(ge=1)] = 5
    # …1 s, doubling with every failure, up to this (the name's real owner waits at most
    # this long, instead of being locked out).
    login_delay_max_s: Annotated[float, Field(ge=1, le=3600)] = 30.0


class SttSettings(_Section):
    # "whisper": faster-whisper, locally; "openai": an OpenAI-compatible
    # /v1/audio/transcriptions endpoint (base_url, api_key, openai_model).
    engine: Literal["whisper", "openai"] = "whisper"
    # A faster-whisper model directory or name; default: the bundled Whisper tiny.en.
    model: str | None = None
    # Let faster-whisper download a model given by name (off by default: offline).
    download: bool = False
    compute_type: str = "int8"
    threads: Annotated[int, Field(ge=0)] = 0  # 0: one per CPU (at most 8)
    beam_size: Annotated[int, Field(ge=1, le=10)] = 1
    # The encoder window for utterances shorter than it (30 = standard Whisper; shorter is
    # faster on a CPU and a little less accurate).
    window_s: Annotated[float, Field(ge=4, le=30)] = 10.0
    language: str | None = "en"
    base_url: str | None = None
    api_key: str | None = None
    openai_model: str = "whisper-1"
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class TtsSettings(_Section):
    # "piper": Piper, locally (GPL-3.0-or-later); "openai": an OpenAI-compatible
    # /v1/audio/speech endpoint.
    engine: Literal["piper", "openai"] = "piper"
    # The default Piper voice (.onnx, its .onnx.json next to it); default: the bundled voice.
    voice: str | None = None
    # More Piper voices by name: {name = "/path/voice.onnx"}.
    voices: dict[str, str] = Field(default_factory=dict)
    # Voice names a client may ask for (e.g. OpenAI's "alloy") -> the voice used.
    voice_map: dict[str, str] = Field(default_factory=dict)
    length_scale: Annotated[float, Field(gt=0.2, le=4)] | None = None
    base_url: str | None = None
    api_key: str | None = None
    openai_model: str = "tts-1"
    openai_voice: str = "alloy"
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class VoiceSettings(_Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # false: voice messages are refused (stt_unavailable / tts_unavailable), nothing loads.
    enabled: bool = True
    # Speak every answer (sentence by sentence while it streams); a client may also ask
    # per message with `"speak": true`.
    auto_speak: bool = Field(default=False, alias="autoSpeak")
    # Load the engines at startup instead of at first use.
    preload: bool = False
    # A recording (audio_chunk buffer or upload) larger than this gets payload_too_large.
    max_audio_bytes: Annotated[int, Field(ge=1024)] = 25 * 1024 * 1024
    max_audio_seconds: Annotated[int, Field(ge=1)] = 300
    # Voice activity detection: speech probability threshold, the silence that ends a
    # hands-free utterance, and the least speech that counts as speech.
    vad_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    silence_ms: Annotated[int, Field(ge=100, le=10_000)] = 500
    min_speech_ms: Annotated[int, Field(ge=32, le=5_000)] = 250
    # Hands-free: start transcribing halfway through that silence, so the transcript is ready
    # when the utterance ends (a wasted transcription if the user speaks again).
    speculative: bool = True
    # Push-to-talk: transcribe the recording while it arrives, a segment at each pause, so
    # that at audio_end only the last segment is left (local Whisper only).
    incremental: bool = True
    # Bounds per user: speech requests in progress (recordings, transcriptions, hands-free
    # streams; and `speak`/synthesis requests), seconds of audio waiting to be transcribed,
    # and recorded audio held in memory; and the recorded audio held by all connections.
    # Over a bound a request gets rate_limited; other users' speech keeps its turn.
    max_user_transcriptions: Annotated[int, Field(ge=1)] = 4
    max_user_syntheses: Annotated[int, Field(ge=1)] = 8
    max_user_queued_s: Annotated[float, Field(ge=1)] = 600.0
    max_user_audio_bytes: Annotated[int, Field(ge=1024)] = 50 * 1024 * 1024
    max_buffered_audio_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    stt: SttSettings = Field(default_factory=SttSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)


class UploadsSettings(_Section):
    """What one user may store and send, so that no user can fill the disk (0: no limit).

    Uploads (`POST /api/upload`) count against a quota of bytes and files per user; those no
    session refers to are removed after `max_age_days` (by the server every
    `prune_interval_s`, or `prismd uploads prune`); a deleted session's uploads go with it.
    Chat messages (text and files, inline or uploaded) count against a daily budget per user
    (UTC days)."""

    max_bytes_per_user: Annotated[int, Field(ge=0)] = 1024 * 1024 * 1024
    max_files_per_user: Annotated[int, Field(ge=0)] = 1000
    max_age_days: Annotated[float, Field(ge=0)] = 7.0
    prune_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    chat_bytes_per_day: Annotated[int, Field(ge=0)] = 512 * 1024 * 1024
    chat_files_per_day: Annotated[int, Field(ge=0)] = 1000


class BusSettings(_Section):
    # Redis (redis://[:password@]host:6379/0): the live event bus and coordination between
    # several prismd processes (`prismd serve --workers N`, several machines). Needs the
    # PostgreSQL store. Unset: one process, the in-process bus.
    url: str | None = None


class RoutingSettings(_Section):
    """`modelMode: "auto"`: prismd picks the model of each turn. A turn goes to `large` when
    its message (with its files' text) is longer than `large_above_tokens` (estimated), when it
    carries attachments (`large_for_attachments`), or when its agent has tools
    (`large_for_tools`); else to `small`. Unset (either model): auto means the agent's model."""

    small: ModelSpec | None = None
    large: ModelSpec | None = None
    large_above_tokens: Annotated[int, Field(ge=0)] = 2000
    large_for_attachments: bool = True
    large_for_tools: bool = False


class Settings(_Section):
    home: Path = Path("~/.prismd")
    provider: ProviderKind | None = None
    model: str | None = None
    default_agent: str = "assistant"
    server: ServerSettings = Field(default_factory=ServerSettings)
    providers: dict[ProviderKind, ProviderSettings] = Field(default_factory=dict)
    agents: list[AgentSettings] = Field(default_factory=list)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)
    mcp_servers: list[McpServerSettings] = Field(default_factory=list)
    voice: VoiceSettings = Field(default_factory=VoiceSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    uploads: UploadsSettings = Field(default_factory=UploadsSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    bus: BusSettings = Field(default_factory=BusSettings)
    # Models every agent falls back to (see AgentSettings.fallback).
    fallback: list[ModelSpec] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    # Tests only: PRISMD_TEST_CLOCK_OFFSET_S (see TEST_CLOCK_ENV), never the file or REST.
    _test_clock_offset_s: float = PrivateAttr(default=0.0)

    @property
    def test_clock_offset_s(self) -> float:
        return self._test_clock_offset_s

    @property
    def data_dir(self) -> Path:
        return (self.server.data_dir or self.home / "data").expanduser()

    @field_validator("providers")
    @classmethod
    def _local_keys_only_for_local(
        cls, providers: dict[str, ProviderSettings]
    ) -> dict[str, ProviderSettings]:
        for kind, section in providers.items():
            misplaced = (
                sorted(LOCAL_ONLY_KEYS & section.model_fields_set) if kind != "local" else []
            )
            if misplaced:
                raise ValueError(f"{kind}.{misplaced[0]} is a setting of [providers.local] only")
        return providers

    @field_serializer("providers", mode="wrap")
    def _dump_local_keys_only_for_local(
        self, providers: dict[str, ProviderSettings], handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(providers)
        for kind, section in dumped.items():
            if kind != "local" and isinstance(section, dict):
                for key in LOCAL_ONLY_KEYS:
                    section.pop(key, None)
        return dumped

    def provider_settings(self, kind: str) -> ProviderSettings:
        return self.providers.get(kind, ProviderSettings())  # type: ignore[call-overload]

    def all_agents(self) -> list[AgentSettings]:
        configured = {a.id: a for a in self.agents}
        builtin = [] if BUILTIN_AGENT.id in configured else [BUILTIN_AGENT]
        return builtin + list(configured.values())


# Environment variables that override the file: name -> path of keys in the settings dict.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "PRISMD_HOST": ("server", "host"),
    "PRISMD_PORT": ("server", "port"),
    "PRISMD_DATA_DIR": ("server", "data_dir"),
    "PRISMD_LOG_LEVEL": ("server", "log_level"),
    "PRISMD_PROVIDER": ("provider",),
    "PRISMD_MODEL": ("model",),
    "PRISMD_DEFAULT_AGENT": ("default_agent",),
    "PRISMD_TOKEN": ("auth", "token"),
    "PRISMD_DATABASE_URL": ("store", "url"),
    "PRISMD_REDIS_URL": ("bus", "url"),
    # The SDKs' own variables, so that detection and the SDK agree.
    "OPENAI_BASE_URL": ("providers", "openai", "base_url"),
    "OPENAI_API_KEY": ("providers", "openai", "api_key"),
    "ANTHROPIC_BASE_URL": ("providers", "anthropic", "base_url"),
    "ANTHROPIC_API_KEY": ("providers", "anthropic", "api_key"),
    "OLLAMA_BASE_URL": ("providers", "ollama", "base_url"),
    # "false": no local runtime, hence no offline default model.
    "PRISMD_LOCAL_ENABLED": ("providers", "local", "enabled"),
}

# Tests only: the login-session clock (auth/service.py) runs this many seconds ahead, so that a
# test sees a login expire without waiting out its TTL (tests/test_auth.py). Ahead only: it can
# end logins sooner, never keep one longer. Read from the environment alone (not a key of the
# file, not shown or changed by /api/config), and the server logs a warning when it is set.
TEST_CLOCK_ENV = "PRISMD_TEST_CLOCK_OFFSET_S"


def home_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return Path(env.get("PRISMD_HOME") or "~/.prismd").expanduser()


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"Invalid configuration ({source}):"]
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[tuple[str, ...], Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Read the file (if any), then environment variables, then `overrides` (from flags)."""
    env = dict(os.environ) if env is None else env
    home = home_dir(env)
    path = Path(config_file).expanduser() if config_file else home / "config.toml"
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Invalid configuration ({path}): not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"Cannot read configuration file {path}: {exc}") from None
    elif config_file:
        raise ConfigError(f"Configuration file not found: {path}")
    sources = [str(path) if path.exists() else "defaults"]
    for name, key_path in ENV_OVERRIDES.items():
        value = env.get(name)
        if value:
            _set(tree, key_path, value)
            sources.append(name)
    for key_path, value in (overrides or {}).items():
        if value is not None:
            _set(tree, key_path, value)
    tree.setdefault("home", str(home))
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, ", ".join(sources))) from None
    ids = [a.id for a in settings.agents]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"Invalid configuration ({path}): agents: duplicate id {dupes[0]!r}")
    if settings.default_agent not in {a.id for a in settings.all_agents()}:
        raise ConfigError(
            f"Invalid configuration ({path}): default_agent: no agent with id "
            f"{settings.default_agent!r}"
        )
    offset = env.get(TEST_CLOCK_ENV)
    if offset:
        try:
            seconds = float(offset)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(
                f"Invalid configuration ({TEST_CLOCK_ENV}): seconds >= 0 (the clock may only run "
                f"ahead), not {offset!r}"
            )
        settings._test_clock_offset_s = seconds
    return settings
