"""Any OpenAI-compatible chat completions endpoint, through the official `openai` SDK.

Used for OpenAI itself and for Ollama, vLLM, llama.cpp, LM Studio, OpenRouter, Groq, DeepSeek…
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai

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
            # post_stream closes the HTTP response when the consuming task is cancelled: a
            # `stop` ends the upstream generation instead of letting it run on.
            async for _, chunk in post_stream(self._client, "/chat/completions", kwargs):
                if "error" in chunk:
                    raise ProviderError(f"{self._label} reported: {_message(chunk['error'])}")
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("completion_tokens_details") or {}
                    yield Usage(
                        usage.get("prompt_tokens") or 0,
                        usage.get("completion_tokens") or 0,
                        details.get("reasoning_tokens") or 0,
                    )
                choices = chunk.get("choices")
                if not choices:
                    continue
                delta = choices[0].get("delta") or {}
                # DeepSeek/vLLM say `reasoning_content`, Ollama/OpenRouter say `reasoning`.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield ReasoningDelta(reasoning)
                content = delta.get("content")
                if content:
                    yield TextDelta(content)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a coded ProviderError
            raise translate(exc, self._label, openai) from exc

    async def aclose(self) -> None:
        await self._client.close()


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
