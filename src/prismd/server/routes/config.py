"""`/api/config` (admins): the settings in CortexPrism's config shape, and run-time changes.

CortexPrism's client reads `defaultProvider`, `defaultAgent`, `providers[kind].model` and
`voice.enabled`; prismd adds its own settings as they are written in config.toml (`settings`,
secrets masked) and the keys `PATCH` accepts (`runtimeKeys`). See config_api.py for what may
change at run time.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body
from pydantic import Field

from ...config import PROVIDER_KINDS
from ...core import Prismd
from ...protocol import ErrorCode
from .. import config_api
from ..limits import ENVELOPE_BYTES
from .common import Admin, ApiError, Core, Open, api_router, doc
from .providers import provider_info

router = api_router(tags=["config"])


class ProviderConfig(Open):
    kind: str
    model: str
    baseUrl: str | None = Field(description="Credentials in the URL masked")
    apiKey: str | None = Field(description='Masked: "sk-abc...wxyz", or •••• when short')


class VoiceConfig(Open):
    enabled: bool
    sttProvider: str
    ttsProvider: str
    sttModel: str
    ttsModel: str
    defaultVoice: str
    autoTTS: bool
    language: str


class ServerConfig(Open):
    maxBodyBytes: int
    host: str
    port: int


class ConfigOut(Open):
    defaultProvider: str | None
    defaultAgent: str
    providers: dict[str, ProviderConfig] = Field(description="The configured providers")
    voice: VoiceConfig
    server: ServerConfig
    settings: dict[str, Any] = Field(
        description="prismd: the effective settings as in config.toml, secrets as ••••"
    )
    runtimeKeys: list[str] = Field(description="prismd: dotted keys PATCH /api/config accepts")


def mask_key(key: str | None) -> str | None:
    if not key:
        return None
    # Long keys as CortexPrism shows them; a short secret would be nearly whole that way.
    return f"{key[:6]}...{key[-4:]}" if len(key) >= 20 else config_api.MASK


async def config_body(core: Prismd) -> dict[str, Any]:
    settings = core.settings
    effective = config_api.effective(settings)
    masked = effective["config"].get("providers", {})
    providers = {}
    for kind in PROVIDER_KINDS:
        info = await provider_info(core, kind)
        if info["configured"]:
            ps = settings.provider_settings(kind)
            providers[kind] = {
                "kind": kind,
                "model": info["model"] or "",
                "baseUrl": (masked.get(kind) or {}).get("base_url"),
                "apiKey": mask_key(ps.api_key),
                "contextWindow": ps.context_window,
                "maxTokens": core.providers.max_output_tokens(kind),
            }
    voice = settings.voice
    stt_model = voice.stt.openai_model if voice.stt.engine == "openai" else voice.stt.model
    tts_model = voice.tts.openai_model if voice.tts.engine == "openai" else "piper"
    return {
        "defaultProvider": core.providers.default_kind,
        "defaultAgent": settings.default_agent,
        "providers": providers,
        "voice": {
            "enabled": voice.enabled,
            "sttProvider": voice.stt.engine,
            "ttsProvider": voice.tts.engine,
            "sttModel": stt_model or "tiny.en",
            "ttsModel": tts_model,
            "defaultVoice": voice.tts.openai_voice if voice.tts.engine == "openai" else "default",
            "autoTTS": voice.auto_speak,
            "language": voice.stt.language or "",
        },
        "server": {
            "maxBodyBytes": max(settings.server.max_file_bytes, voice.max_audio_bytes)
            + ENVELOPE_BYTES,
            "host": settings.server.host,
            "port": settings.server.port,
        },
        "settings": effective["config"],
        "runtimeKeys": effective["runtimeKeys"],
    }


@router.get(
    "/config",
    summary="The settings (admins; secrets masked)",
    responses=doc(ConfigOut, 403),
)
async def get_config(core: Core, admin: Admin) -> dict[str, Any]:
    # Admins only: besides the masked secrets it shows the server's paths, MCP commands and
    # endpoints, which are not every user's business.
    return await config_body(core)


@router.patch(
    "/config",
    summary="Change settings at run time (admins; written to $PRISMD_HOME/config.toml)",
    description='The body is a partial configuration in config.toml\'s keys, nested (`{"tools": '
    '{"max_rounds": 5}}`) or dotted (`{"tools.max_rounds": 5}`); only the keys in '
    "`runtimeKeys` are accepted. `null` removes a key. Answers the new configuration.",
    responses=doc(ConfigOut, 403, 422),
)
async def patch_config(
    core: Core, admin: Admin, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    try:
        await config_api.apply(core, body)
    except config_api.ConfigChangeError as exc:
        raise ApiError(
            422,
            ErrorCode.INVALID_MESSAGE,
            str(exc),
            details={"field": exc.key, "reason": exc.reason},
        ) from None
    return await config_body(core)
