"""A model provider driven by a Python function, for in-process tests of the agent loop (like
Pydantic AI's FunctionModel): no network, no server; the function sees each request and returns
(or yields, or async-yields) the parts of the answer.

    def model(request: ModelRequest) -> list[StreamPart]:
        if not any(m.role == "tool" for m in request.messages):
            return [ToolCall("c1", "current_time", "{}")]
        return [TextDelta("It is late."), Usage(10, 3)]
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from ..providers.base import ModelRequest, Provider, StreamPart

ModelFunction = Callable[[ModelRequest], Iterable[StreamPart] | AsyncIterable[StreamPart]]


class FunctionProvider(Provider):
    kind = "function"
    base_url = None

    def __init__(self, fn: ModelFunction, model: str = "function-model") -> None:
        self.fn = fn
        self.default_model = model
        self.requests: list[ModelRequest] = []

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        self.requests.append(request)
        parts: Any = self.fn(request)
        if inspect.isawaitable(parts):
            parts = await parts
        if hasattr(parts, "__aiter__"):
            async for part in parts:
                yield part
        else:
            for part in parts:
                yield part
