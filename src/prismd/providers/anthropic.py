"""Anthropic's Messages API through the official `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic

from ..config import ProviderSettings
from ._errors import translate
from .base import ModelRequest, Provider, ReasoningDelta, StreamPart, TextDelta, Usage

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
            async with await self._client.messages.create(**kwargs) as stream:
                async for event in stream:
                    kind = event.type
                    if kind == "content_block_delta":
                        delta = event.delta
                        if delta.type == "text_delta":
                            yield TextDelta(delta.text)
                        elif delta.type == "thinking_delta":
                            yield ReasoningDelta(delta.thinking)
                    elif kind == "message_start":
                        usage = event.message.usage
                        input_tokens = (
                            (usage.input_tokens or 0)
                            + (usage.cache_creation_input_tokens or 0)
                            + (usage.cache_read_input_tokens or 0)
                        )
                    elif kind == "message_delta":
                        yield Usage(input_tokens, event.usage.output_tokens or 0)
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, self._label, anthropic) from exc

    async def aclose(self) -> None:
        await self._client.close()
