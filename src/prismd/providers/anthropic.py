"""Anthropic's Messages API through the official `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic

from ..config import ProviderSettings
from ._errors import translate
from ._sse import post_stream
from .base import (
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    Usage,
)

_EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384}


class AnthropicProvider(Provider):
    kind = "anthropic"

    def __init__(
        self, settings: ProviderSettings, default_model: str, base_url: str | None, api_key: str
    ) -> None:
        self.default_model = default_model
        self.base_url = base_url
        self.vision = settings.vision
        self.max_output_tokens = settings.max_output_tokens
        self._label = "the Anthropic API" + (f" at {base_url}" if base_url else "")
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=settings.max_retries,
            timeout=anthropic.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
        )

    @staticmethod
    def _message(role: str, text: str, images: list[Any]) -> dict[str, Any]:
        if not images:
            return {"role": role, "content": text}
        blocks: list[dict[str, Any]] = [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": i.mime_type, "data": i.data_b64},
            }
            for i in images
        ]
        if text:
            blocks.append({"type": "text", "text": text})
        return {"role": role, "content": blocks}

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        max_tokens = request.max_output_tokens
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": max_tokens,
            "messages": [self._message(m.role, m.text, m.images) for m in request.messages],
            "stream": True,
        }
        if request.system:
            kwargs["system"] = request.system
        if request.reasoning_effort:
            budget = _EFFORT_BUDGET[request.reasoning_effort]
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
            kwargs["max_tokens"] = max(max_tokens, budget + 1024)
        elif request.temperature is not None:
            kwargs["temperature"] = request.temperature
        input_tokens = 0
        try:
            async for kind, event in post_stream(self._client, "/v1/messages", kwargs):
                kind = event.get("type", kind)
                if kind == "content_block_delta":
                    delta = event["delta"]
                    if delta.get("type") == "text_delta":
                        yield TextDelta(delta["text"])
                    elif delta.get("type") == "thinking_delta":
                        yield ReasoningDelta(delta["thinking"])
                elif kind == "message_start":
                    usage = event["message"].get("usage") or {}
                    input_tokens = (
                        (usage.get("input_tokens") or 0)
                        + (usage.get("cache_creation_input_tokens") or 0)
                        + (usage.get("cache_read_input_tokens") or 0)
                    )
                elif kind == "message_delta":
                    usage = event.get("usage") or {}
                    yield Usage(input_tokens, usage.get("output_tokens") or 0)
                elif kind == "error":
                    error = event.get("error") or {}
                    raise ProviderError(f"{self._label} reported: {error.get('message') or error}")
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, self._label, anthropic) from exc

    async def aclose(self) -> None:
        await self._client.close()
