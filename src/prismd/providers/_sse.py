"""Server-sent events from an SDK's raw streaming response, decoded to JSON dicts.

The SDKs still build, authenticate, retry and send the request, and raise their typed errors
for a failed status; only the per-chunk pydantic models are skipped. Building those models was
most of prismd's CPU time per streamed turn (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, Any]]:
    """(event name, decoded data) for each event; stops at OpenAI's `[DONE]`."""
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if line:
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            continue
        if data:
            payload = "\n".join(data)
            if payload == "[DONE]":
                return
            yield event, json.loads(payload)
        event, data = None, []
    if data and data[0] != "[DONE]":
        yield event, json.loads("\n".join(data))


async def post_stream(
    client: Any, path: str, body: dict[str, Any]
) -> AsyncIterator[tuple[str | None, Any]]:
    """POST `body` through the SDK client's generic `post` (auth, base URL, retries with
    backoff and `Retry-After`, typed status errors) and yield the decoded events.

    The raw response is closed on every exit, including cancellation by `stop`, which closes
    the upstream connection so the model stops generating.
    """
    import httpx2

    response = await client.post(path, cast_to=httpx2.Response, body=body, stream=True)
    try:
        async for item in sse_events(response.aiter_lines()):
            yield item
    finally:
        await response.aclose()
