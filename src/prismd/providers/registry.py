"""Choose and build model providers from the settings.

Selection: the configured provider (`provider` / PRISMD_PROVIDER), else the first of an OpenAI
key, an Anthropic key, a configured local GGUF model, a reachable local Ollama, and the bundled
tiny demo model (the offline default, run by the `local` provider). With none (the demo model
not installed, or `[providers.local] enabled = false`) the server still runs, and a chat gets
`provider_unconfigured` with UNCONFIGURED_HELP.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from ..config import AgentSettings, Settings
from ..protocol import ErrorCode, ProtocolError
from . import local, pricing
from .base import Provider

log = logging.getLogger("prismd.providers")

OLLAMA_URL = "http://127.0.0.1:11434"
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}
FALLBACK_CONTEXT_WINDOW = 8192

UNCONFIGURED_HELP = (
    "No model provider is configured. Set one of: OPENAI_API_KEY (optionally OPENAI_BASE_URL "
    "for any OpenAI-compatible server such as vLLM, llama.cpp or LM Studio), ANTHROPIC_API_KEY, "
    "or run Ollama on 127.0.0.1:11434, or run a GGUF model file in prismd itself "
    "(PRISMD_PROVIDER=local and PRISMD_MODEL=/path/to/model.gguf); or set "
    "PRISMD_PROVIDER=openai|anthropic|ollama|local and PRISMD_MODEL, or the same keys (provider, "
    "model, [providers.<name>]) in $PRISMD_HOME/config.toml. Then restart prismd."
)


def _probe_ollama(base: str) -> list[str] | None:
    """Model names of a reachable Ollama, or None."""
    try:
        resp = httpx.get(f"{base.rstrip('/')}/api/tags", timeout=0.5)
        resp.raise_for_status()
        return [m["name"] for m in resp.json().get("models", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


class ProviderRegistry:
    """Builds one Provider per kind, lazily, and resolves the provider/model of a turn."""

    def __init__(self, settings: Settings, probe_ollama: bool = True) -> None:
        self.settings = settings
        self._providers: dict[str, Provider] = {}
        self._build_lock = threading.Lock()
        self._ollama_models: list[str] | None = None
        self._retired: list[Provider] = []  # replaced by `reconfigure`, closed at shutdown
        self._generation = 0  # counts `reconfigure` calls
        self._local_runtimes = local.RuntimePool()  # shared by every LocalProvider built here
        self.default_kind = self._detect(probe_ollama)
        if self.default_kind:
            log.info("default model provider: %s", self.default_kind)
        else:
            log.warning(UNCONFIGURED_HELP)

    def _detect(self, probe_ollama: bool) -> str | None:
        if self.settings.provider:
            return self.settings.provider
        if self.settings.provider_settings("openai").api_key:
            return "openai"
        if self.settings.provider_settings("anthropic").api_key:
            return "anthropic"
        _, local_default, configured = local.local_models(self.settings)
        if local_default and configured:
            return "local"
        if probe_ollama and self._ollama():
            return "ollama"
        if local_default:  # the bundled demo model: prismd answers offline out of the box
            return "local"
        return None

    def _ollama(self) -> list[str] | None:
        if self._ollama_models is None:
            base = self.settings.provider_settings("ollama").base_url or OLLAMA_URL
            self._ollama_models = _probe_ollama(base.removesuffix("/v1"))
        return self._ollama_models

    def _default_model(self, kind: str) -> str | None:
        if kind == "local":
            return local.local_models(self.settings)[1]
        ps = self.settings.provider_settings(kind)
        if ps.model:
            return ps.model
        if self.settings.model and (self.settings.provider in (None, kind)):
            return self.settings.model
        if kind == "ollama":
            models = self._ollama()
            return models[0] if models else None
        return DEFAULT_MODELS.get(kind)

    def reconfigure(self) -> None:
        """The settings changed at run time (PATCH /api/config): detect the default again and
        build providers anew on next use; turns in flight keep the ones they hold."""
        self._generation += 1
        self._retired.extend(self._providers.values())
        self._providers = {}
        self.default_kind = self._detect(probe_ollama=self._ollama_models is not None)

    def get(self, kind: str) -> Provider:
        provider = self._providers.get(kind)
        if provider is None:
            with self._build_lock:
                provider = self._providers.get(kind)
                if provider is None:
                    generation = self._generation
                    provider = self._build(kind)
                    if generation == self._generation:
                        self._providers[kind] = provider
                    else:  # built from settings that `reconfigure` replaced meanwhile
                        self._retired.append(provider)
        return provider

    def warm_up(self) -> None:
        """Build the default provider (importing its SDK takes a second or two) so that the
        first turn does not pay for it. Runs in a thread at startup."""
        if self.default_kind is None:
            return
        try:
            provider = self.get(self.default_kind)
            provider.warm_up()
        except ProtocolError as exc:
            log.warning("%s", exc.message)

    def _build(self, kind: str) -> Provider:
        # Each SDK is imported on first use, and only the one in use: they take a second or
        # two and 15-40 MB each to load.
        if kind == "local":
            return local.LocalProvider(self.settings, self._local_runtimes)
        ps = self.settings.provider_settings(kind)
        model = self._default_model(kind)
        if model is None:
            raise ProtocolError(
                ErrorCode.PROVIDER_UNCONFIGURED,
                f"No model is configured for provider {kind!r}: set PRISMD_MODEL or "
                f"[providers.{kind}] model in config.toml.",
            )
        if kind == "anthropic":
            if not ps.api_key:
                raise ProtocolError(
                    ErrorCode.PROVIDER_UNCONFIGURED,
                    "Provider 'anthropic' needs ANTHROPIC_API_KEY (or [providers.anthropic] "
                    "api_key in config.toml).",
                )
            from .anthropic import AnthropicProvider

            return AnthropicProvider(ps, model, ps.base_url, ps.api_key)
        from .openai_compat import OpenAICompatProvider

        if kind == "ollama":
            base = (ps.base_url or OLLAMA_URL).rstrip("/")
            base = base if base.endswith("/v1") else base + "/v1"
            return OpenAICompatProvider("ollama", ps, model, base, ps.api_key)
        if not ps.api_key and not ps.base_url:
            raise ProtocolError(
                ErrorCode.PROVIDER_UNCONFIGURED,
                "Provider 'openai' needs OPENAI_API_KEY, or OPENAI_BASE_URL for a local "
                "OpenAI-compatible server.",
            )
        return OpenAICompatProvider("openai", ps, model, ps.base_url, ps.api_key)

    def resolve(self, agent: AgentSettings, model: str | None) -> tuple[Provider, str]:
        """The provider and model of a turn: the chat's `model`, else the agent's, else the
        provider's default."""
        kind = agent.provider or self.default_kind
        if kind is None:
            raise ProtocolError(ErrorCode.PROVIDER_UNCONFIGURED, UNCONFIGURED_HELP)
        provider = self.get(kind)
        return provider, model or agent.model or provider.default_model

    def resolve_spec(self, spec: str) -> tuple[Provider, str]:
        """A provider and model named "provider:model" or "provider" (its default model);
        raises provider_unconfigured as `get` does."""
        kind, _, model = spec.partition(":")
        provider = self.get(kind)
        return provider, model or provider.default_model

    def describe(self, kind: str | None = None, model: str | None = None) -> dict[str, Any]:
        """How to show a provider's model (the default one's by default) to the user:
        `provider`, `model`, `displayName`, `note` (a line to show beside it: the offline demo
        model says what it is and how to connect a real one), `demo`, and for a local model
        `runtime` (its state: loading, ready, failed…, pid, restarts). Does not start it."""
        kind = kind or self.default_kind
        info: dict[str, Any] = {"provider": kind, "model": None, "displayName": None}
        info.update(note=None, demo=False, runtime=None)
        if kind is None:
            info["note"] = UNCONFIGURED_HELP
            return info
        try:
            model = model or self._default_model(kind)
            provider = self.get(kind) if kind == "local" else None
        except ProtocolError as exc:
            info["note"] = exc.message
            return info
        info.update(model=model, displayName=model)
        if isinstance(provider, local.LocalProvider):
            info.update(provider.describe(model))
        return info

    def max_output_tokens(self, kind: str) -> int:
        """The output token limit a provider's requests carry (configured, else its default)."""
        configured = self.settings.provider_settings(kind).max_output_tokens
        if configured:
            return configured
        if kind == "local":
            from .local import LOCAL_OUTPUT_TOKENS

            return LOCAL_OUTPUT_TOKENS
        return Provider.max_output_tokens

    def context_window(self, provider: Provider, model: str) -> int:
        configured = self.settings.provider_settings(provider.kind).context_window
        if configured:
            return configured
        if provider.kind == "local":
            return local.LOCAL_CONTEXT_WINDOW
        known = pricing.context_window(provider.kind, provider.base_url, model)
        return known or FALLBACK_CONTEXT_WINDOW

    async def aclose(self) -> None:
        for provider in [*self._retired, *self._providers.values()]:
            await provider.aclose()
        await self._local_runtimes.aclose()
