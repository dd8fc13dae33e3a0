"""Any OpenAI-compatible chat completions endpoint, through the official `openai` SDK.

Used for OpenAI itself and for Ollama, vLLM, llama.cpp, LM Studio, OpenRouter, Groq, DeepSeek…
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai

from ..config import ProviderSettings
from ._errors import translate
from .base import ModelRequest, Provider, ReasoningDelta, StreamPart, TextDelta, Usage


class OpenAICompatProvider(Provider):
    def __init__(
        self,
        kind: str,
        settings: ProviderSettings,
        default_model: str,
        base_url: str | None,
        api_key: str | None,
    ) -> None:
        self.kind = kind
        self.default_model = default_model
        self.base_url = base_url
        self.vision = settings.vision
        self.max_output_tokens = settings.max_output_tokens
        self._label = f"the {kind} model endpoint" + (f" at {base_url}" if base_url else "")
        self._client = openai.AsyncOpenAI(
            # Local servers (Ollama, llama.cpp…) take no key, but the SDK insists on one.
            api_key=api_key or "no-key",
            base_url=base_url,
            max_retries=settings.max_retries,
            timeout=openai.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
        )

    @staticmethod
    def _message(role: str, text: str, images: list[Any]) -> dict[str, Any]:
        if not images:
            return {"role": role, "content": text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        parts += [
            {"type": "image_url", "image_url": {"url": f"data:{i.mime_type};base64,{i.data_b64}"}}
            for i in images
        ]
        return {"role": role, "content": parts}

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [self._message(m.role, m.text, m.images) for m in request.messages]
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.reasoning_effort:
            kwargs["reasoning_effort"] = request.reasoning_effort
        try:
            # `async with` closes the HTTP response when the consuming task is cancelled, so a
            # `stop` ends the upstream generation instead of letting it run on.
            async with await self._client.chat.completions.create(**kwargs) as stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        details = chunk.usage.completion_tokens_details
                        yield Usage(
                            chunk.usage.prompt_tokens or 0,
                            chunk.usage.completion_tokens or 0,
                            (details.reasoning_tokens or 0) if details else 0,
                        )
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    # DeepSeek/vLLM say `reasoning_content`, Ollama/OpenRouter say `reasoning`.
                    reasoning = getattr(delta, "reasoning_content", None) or getattr(
                        delta, "reasoning", None
                    )
                    if reasoning:
                        yield ReasoningDelta(reasoning)
                    if delta.content:
                        yield TextDelta(delta.content)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a coded ProviderError
            raise translate(exc, self._label, openai) from exc

    async def aclose(self) -> None:
        await self._client.close()
