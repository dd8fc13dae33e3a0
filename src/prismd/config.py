"""Configuration: a TOML file, overridden by environment variables, overridden by flags.

`$PRISMD_HOME/config.toml` (PRISMD_HOME defaults to ~/.prismd). A bad file is reported as a
ConfigError whose message names the key and the problem; the CLI prints it without a traceback.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ProviderKind = Literal["openai", "anthropic", "ollama"]
PROVIDER_KINDS: tuple[str, ...] = ("openai", "anthropic", "ollama")

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant running inside prismd, a self-hosted AI server. "
    "Answer clearly and concisely; use Markdown where it helps."
)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


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
    # Frames queued for one connection before it is considered stuck and dropped.
    send_queue_frames: Annotated[int, Field(ge=16)] = 10_000
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
    limit_loopback: bool = False


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
    # (<tool_call>{"tool": …, "args": …}</tool_call>) for models without it.
    tool_calling: Literal["native", "text"] = "native"
    # Models of this provider that need the text protocol (fnmatch patterns).
    text_tool_models: list[str] = Field(default_factory=list)
    max_output_tokens: Annotated[int, Field(gt=0)] = 4096


class ShellSettings(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_output_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    memory_mb: Annotated[int, Field(ge=64)] = 2048
    max_processes: Annotated[int, Field(ge=8)] = 256


class CodeExecSettings(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    cpu_s: Annotated[int, Field(ge=1)] = 30
    memory_mb: Annotated[int, Field(ge=64)] = 512
    max_output_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    # Cut the process off the network where the machine allows it (an unshared network
    # namespace); see the README for what isolation is in force.
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


class ToolsSettings(_Section):
    # Give every session its own workspace under the agent's, instead of one per agent.
    workspace_per_session: bool = False
    max_rounds: Annotated[int, Field(ge=1, le=100)] = 12
    # Tool output sent to the model is cut at this many characters, with a note.
    max_output_chars: Annotated[int, Field(ge=256)] = 16_000
    # Tool output shown in `tool_end` is cut at this many characters.
    display_output_chars: Annotated[int, Field(ge=64)] = 2_000
    approval_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    shell: ShellSettings = Field(default_factory=ShellSettings)
    code_exec: CodeExecSettings = Field(default_factory=CodeExecSettings)
    web_fetch: WebFetchSettings = Field(default_factory=WebFetchSettings)


class AgentSettings(_Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    name: str
    description: str = ""
    provider: ProviderKind | None = None
    model: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    # Tools this agent may use: names or fnmatch patterns ("file_*", "github__*", "*").
    tools: list[str] = Field(default_factory=lambda: ["*"])
    # Tools that need the user's approval in addition to those that need it by default…
    approve: list[str] = Field(default_factory=list)
    # …and tools this agent may run without asking (e.g. "shell" for a trusted agent).
    auto_approve: list[str] = Field(default_factory=list)


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
    # Origins (scheme://host[:port]) besides the server's own that may open a WebSocket with the
    # login cookie; a cookie-authenticated upgrade from any other Origin is refused.
    allowed_origins: list[str] = Field(default_factory=list)
    # Failed logins allowed per username and per client address within a minute.
    login_attempts_per_minute: Annotated[int, Field(ge=1)] = 5


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

    @property
    def data_dir(self) -> Path:
        return (self.server.data_dir or self.home / "data").expanduser()

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
    # The SDKs' own variables, so that detection and the SDK agree.
    "OPENAI_BASE_URL": ("providers", "openai", "base_url"),
    "OPENAI_API_KEY": ("providers", "openai", "api_key"),
    "ANTHROPIC_BASE_URL": ("providers", "anthropic", "base_url"),
    "ANTHROPIC_API_KEY": ("providers", "anthropic", "api_key"),
    "OLLAMA_BASE_URL": ("providers", "ollama", "base_url"),
}


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
    return settings
