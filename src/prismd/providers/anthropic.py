"""Anthropic's Messages API: the request the official `anthropic` SDK sends, its streamed
bytes read by providers/_http.py (see there why not through the SDK)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..config import ProviderSettings
from ._errors import translate
from ._http import StreamClient, ended_early
from .base import (
    ChatMessage,
    ModelRequest,
    Provider,
    ProviderError,
    ReasoningDelta,
    StreamPart,
    TextDelta,
    ThinkingBlock,
    ToolCall,
    Usage,
    coalesce,
)

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
_EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384}


@dataclass
class _StreamState:
    input_tokens: int = 0
    finished: bool = False  # message_stop seen
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, input JSON]
    thinking: dict[int, ThinkingBlock] = field(default_factory=dict)  # index -> block so far


class AnthropicProvider(Provider):
    kind = "anthropic"

    def __init__(
        self, settings: ProviderSettings, default_model: str, base_url: str | None, api_key: str
    ) -> None:
        self._settings = settings
        self._api_key = api_key
        self.default_model = default_model
        self.base_url = base_url
        self.vision = settings.vision
        self.max_output_tokens = settings.max_output_tokens or Provider.max_output_tokens
        self._label = "the Anthropic API" + (f" at {base_url}" if base_url else "")
        self._http = StreamClient(
            base_url or ANTHROPIC_BASE_URL,
            {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION},
            label=self._label,
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            max_retries=settings.max_retries,
        )

    @staticmethod
    def _blocks(m: ChatMessage) -> list[dict[str, Any]]:
        if m.role == "tool":
            return [
                {
                    "type": "tool_result",
                    "tool_use_id": m.tool_call_id,
                    "content": m.text,
                    "is_error": m.is_error,
                }
            ]
        blocks: list[dict[str, Any]] = [
            {"type": "redacted_thinking", "data": t.redacted}
            if t.redacted is not None
            else {"type": "thinking", "thinking": t.thinking, "signature": t.signature}
            for t in m.thinking
        ]
        blocks += [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": i.mime_type, "data": i.data_b64},
            }
            for i in m.images
        ]
        if m.text:
            blocks.append({"type": "text", "text": m.text})
        for c in m.tool_calls:
            try:
                args = json.loads(c.arguments or "{}")
            except ValueError:
                args = {}
            blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": args})
        return blocks

    @classmethod
    def _messages(cls, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """Anthropic wants alternating roles; tool results travel in the user's turn."""
        out: list[dict[str, Any]] = []
        for m in messages:
            role = "assistant" if m.role == "assistant" else "user"
            simple = m.role != "tool" and not m.images and not m.tool_calls and not m.thinking
            if out and out[-1]["role"] == role:
                prev = out[-1]
                if isinstance(prev["content"], str):
                    prev["content"] = [{"type": "text", "text": prev["content"]}]
                prev["content"].extend(cls._blocks(m))
            else:
                out.append({"role": role, "content": m.text if simple else cls._blocks(m)})
        return out

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        max_tokens = request.max_output_tokens
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": max_tokens,
            "messages": self._messages(request.messages),
            "stream": True,
        }
        if request.system:
            kwargs["system"] = request.system
        if request.tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
        # With thinking on, the assistant message that asked for the tools whose results this
        # request carries must begin with its signed thinking blocks (kept with the message,
        # passed back unchanged); one recorded without them (thinking was off) turns it off.
        last = next((m for m in reversed(request.messages) if m.role == "assistant"), None)
        unsigned = last is not None and bool(last.tool_calls) and not last.thinking
        if request.reasoning_effort and not unsigned:
            budget = _EFFORT_BUDGET[request.reasoning_effort]
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
            kwargs["max_tokens"] = max(max_tokens, budget + 1024)
        elif request.temperature is not None:
            kwargs["temperature"] = request.temperature
        state = _StreamState()
        calls = state.calls
        try:
            async for batch in self._http.stream("/v1/messages", kwargs):
                for part in coalesce(self._parts(batch, state)):
                    yield part
            if not state.finished:
                raise ended_early(self._label)
            for index in sorted(calls):
                call_id, name, arguments = calls[index]
                yield ToolCall(call_id, name, arguments or "{}")
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, self._label) from exc

    def _parts(self, batch: list[Any], state: _StreamState) -> list[StreamPart]:
        parts: list[StreamPart] = []
        calls = state.calls
        for name, event in batch:
            kind = event.get("type", name)
            if kind == "content_block_delta":
                delta = event["delta"]
                dtype = delta.get("type")
                if dtype == "text_delta":
                    parts.append(TextDelta(delta["text"]))
                elif dtype == "thinking_delta":
                    parts.append(ReasoningDelta(delta["thinking"]))
                    if event.get("index") in state.thinking:
                        state.thinking[event["index"]].thinking += delta["thinking"]
                elif dtype == "signature_delta" and event.get("index") in state.thinking:
                    state.thinking[event["index"]].signature += delta.get("signature") or ""
                elif dtype == "input_json_delta" and event.get("index") in calls:
                    calls[event["index"]][2] += delta.get("partial_json") or ""
            elif kind == "content_block_stop":
                done = state.thinking.pop(event.get("index", -1), None)
                if done is not None:
                    parts.append(done)
            elif kind == "content_block_start":
                block = event.get("content_block") or {}
                btype = block.get("type")
                if btype == "thinking":
                    state.thinking[event.get("index", -1)] = ThinkingBlock()
                elif btype == "redacted_thinking":
                    parts.append(ThinkingBlock(redacted=str(block.get("data") or "")))
                if btype == "tool_use":
                    calls[event.get("index", len(calls))] = [
                        block.get("id") or f"toolu_{len(calls)}",
                        block.get("name") or "",
                        "",
                    ]
            elif kind == "message_start":
                usage = event["message"].get("usage") or {}
                state.input_tokens = (
                    (usage.get("input_tokens") or 0)
                    + (usage.get("cache_creation_input_tokens") or 0)
                    + (usage.get("cache_read_input_tokens") or 0)
                )
            elif kind == "message_stop":
                state.finished = True
            elif kind == "message_delta":
                usage = event.get("usage") or {}
                parts.append(Usage(state.input_tokens, usage.get("output_tokens") or 0))
            elif kind == "error":
                error = event.get("error") or {}
                raise ProviderError(f"{self._label} reported: {error.get('message') or error}")
        return parts

    async def list_models(self) -> list[str]:
        import anthropic  # loaded only when someone asks for the list

        client = anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=self._settings.max_retries,
            timeout=anthropic.Timeout(
                self._settings.timeout_s, connect=self._settings.connect_timeout_s
            ),
        )
        async with client:
            page = await client.models.list()
            return sorted({m.id for m in page.data})

    async def aclose(self) -> None:
        await self._http.aclose()
