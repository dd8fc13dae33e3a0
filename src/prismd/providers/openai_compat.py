"""Any OpenAI-compatible chat completions endpoint: OpenAI itself, Ollama, vLLM, llama.cpp,
LM Studio, OpenRouter, Groq, DeepSeek…

The request is the one the official `openai` SDK sends; its streamed bytes are read by
providers/_http.py (see there why not through the SDK).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..config import ProviderSettings
from ._errors import translate
from ._http import StreamClient, ended_early
from .base import (
    ChatMessage,
    Finish,
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    ToolCall,
    ToolDef,
    Usage,
    coalesce,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAICompatProvider(Provider):
    def __init__(
        self,
        kind: str,
        settings: ProviderSettings,
        default_model: str,
        base_url: str | None,
        api_key: str | None,
        label: str | None = None,
        extra_body: dict[str, Any] | None = None,
        max_tokens_field: str | None = None,
    ) -> None:
        """`extra_body`: fields added to every request (a server's own sampling options);
        `max_tokens_field`: the field that carries the request's `max_output_tokens` (not sent
        when None: OpenAI's reasoning models refuse `max_tokens`)."""
        self._settings = settings
        self._api_key = api_key
        self._tools_cache: tuple[list[ToolDef], list[dict[str, Any]]] | None = None
        self.kind = kind
        self.default_model = default_model
        self.base_url = base_url
        self.vision = settings.vision
        self.max_output_tokens = settings.max_output_tokens or Provider.max_output_tokens
        self._label = label or f"the {kind} model endpoint" + (
            f" at {base_url}" if base_url else ""
        )
        self._extra_body = extra_body or {}
        self._max_tokens_field = max_tokens_field
        # Local servers (Ollama, llama.cpp…) take no key.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = StreamClient(
            base_url or OPENAI_BASE_URL,
            headers,
            label=self._label,
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            max_retries=settings.max_retries,
        )

    def _tool_defs(self, tools: list[ToolDef]) -> list[dict[str, Any]]:
        """The tools in the API's shape; built once per list (a turn's tool view hands the
        same list to every request)."""
        cached = self._tools_cache
        if cached is not None and cached[0] is tools:
            return cached[1]
        defs = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in tools
        ]
        self._tools_cache = (tools, defs)
        return defs

    @staticmethod
    def _message(m: ChatMessage) -> dict[str, Any]:
        if m.role == "tool":
            return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.text}
        if m.tool_calls:
            return {
                "role": "assistant",
                "content": m.text or None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in m.tool_calls
                ],
            }
        if not m.images:
            return {"role": m.role, "content": m.text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.text}] if m.text else []
        parts += [
            {"type": "image_url", "image_url": {"url": f"data:{i.mime_type};base64,{i.data_b64}"}}
            for i in m.images
        ]
        return {"role": m.role, "content": parts}

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [self._message(m) for m in request.messages]
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._extra_body,
        }
        if self._max_tokens_field:
            kwargs[self._max_tokens_field] = request.max_output_tokens
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.reasoning_effort:
            kwargs["reasoning_effort"] = request.reasoning_effort
        if request.tools:
            kwargs["tools"] = self._tool_defs(request.tools)
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments so far]
        try:
            # The stream closes the HTTP response when the consuming task is cancelled: a
            # `stop` ends the upstream generation instead of letting it run on.
            finished = False
            async for batch in self._http.stream("/chat/completions", kwargs):
                for part in coalesce(self._parts(batch, calls)):
                    yield part
                finished = finished or any(
                    name == "[DONE]" or _finish_reason(chunk) for name, chunk in batch
                )
            if not finished:
                raise ended_early(self._label)
            for index in sorted(calls):
                call_id, name, arguments = calls[index]
                yield ToolCall(call_id or f"call_{index}", name, arguments or "{}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a coded ProviderError
            raise translate(exc, self._label) from exc

    def _parts(self, batch: list[Any], calls: dict[int, list[str]]) -> list[StreamPart]:
        """The stream parts of a batch of chunks; tool-call fragments accumulate in `calls`."""
        parts: list[StreamPart] = []
        for _, chunk in batch:
            if "error" in chunk:
                raise ProviderError(f"{self._label} reported: {_message(chunk['error'])}")
            usage = chunk.get("usage")
            if usage:
                details = usage.get("completion_tokens_details") or {}
                parts.append(
                    Usage(
                        usage.get("prompt_tokens") or 0,
                        usage.get("completion_tokens") or 0,
                        details.get("reasoning_tokens") or 0,
                    )
                )
            choices = chunk.get("choices")
            if not choices:
                continue
            delta = choices[0].get("delta") or {}
            # DeepSeek/vLLM say `reasoning_content`, Ollama/OpenRouter say `reasoning`.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                parts.append(ReasoningDelta(reasoning))
            content = delta.get("content")
            if content:
                parts.append(TextDelta(content))
            for tc in delta.get("tool_calls") or ():
                slot = calls.setdefault(tc.get("index", len(calls)), ["", "", ""])
                fn = tc.get("function") or {}
                slot[0] = tc.get("id") or slot[0]
                slot[1] += fn.get("name") or ""
                slot[2] += fn.get("arguments") or ""
            reason = choices[0].get("finish_reason")
            if reason:
                parts.append(Finish(reason))
        return parts

    async def list_models(self) -> list[str]:
        import openai  # ~40 MB: loaded only when someone asks for the list

        client = openai.AsyncOpenAI(
            # Local servers (Ollama, llama.cpp…) take no key, but the SDK insists on one.
            api_key=self._api_key or "no-key",
            base_url=self.base_url,
            max_retries=self._settings.max_retries,
            timeout=openai.Timeout(
                self._settings.timeout_s, connect=self._settings.connect_timeout_s
            ),
        )
        async with client:
            page = await client.models.list()
            return sorted({m.id for m in page.data})

    async def aclose(self) -> None:
        await self._http.aclose()


def _finish_reason(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return bool(choices and choices[0].get("finish_reason"))


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
