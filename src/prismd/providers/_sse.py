"""Server-sent events from an SDK's raw streaming response, decoded to JSON dicts.

The SDKs still build, authenticate, retry and send the request, and raise their typed errors
for a failed status; only the per-chunk pydantic models are skipped. Building those models was
most of prismd's CPU time per streamed turn (see docs/benchmarks.md).

Events come out in batches: the events that arrived in one network read. A provider merges the
text deltas of a batch, so when prismd falls behind (many streams on a busy CPU), it sends fewer,
larger `chunk`s instead of falling further behind; at a normal pace every delta is its own read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

Event = tuple[str | None, Any]  # (event name, decoded data)
DONE: Event = ("[DONE]", {})  # appended to the batch in which OpenAI's `data: [DONE]` came


def ended_early(label: str) -> Exception:
    """The body ended cleanly but before the answer's end marker: as good as a broken stream
    (retried if nothing was produced, else a provider_error that keeps the partial text)."""
    return StreamBroken(ConnectionError(f"the response of {label} ended before the answer did"))


class SSEDecoder:
    """Incremental SSE parser over bytes; `[DONE]` ends the stream (OpenAI's convention)."""

    def __init__(self) -> None:
        self._partial = b""
        self._event: str | None = None
        self._data: list[bytes] = []
        self.done = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        if self.done:
            return events
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._dispatch(events)
                if self.done:
                    break
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode()
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._partial:
            self.feed(b"\n")
        self._dispatch(events)
        return events

    def _dispatch(self, events: list[Event]) -> None:
        if self._data and not self.done:
            payload = b"\n".join(self._data)
            if payload.strip() == b"[DONE]":
                self.done = True
            else:
                events.append((self._event, json.loads(payload)))
        self._event, self._data = None, []


class ClientShards:
    """SDK clients that share the concurrent streams of one provider.

    httpcore's connection pool scans all of its connections on every request and release, so
    one pool serving a thousand concurrent streams spends much of the server's CPU there. A new
    client (with its own pool) is added when every client has `per_client` streams in flight,
    up to `max_clients`; an idle server keeps one (each costs ~1 MB and an SSL context).
    """

    def __init__(
        self, factory: Callable[[], Any], per_client: int = 64, max_clients: int = 8
    ) -> None:
        self._factory = factory
        self._per_client = per_client
        self._max = max_clients
        self.clients: list[Any] = [factory()]
        self._inflight = [0]

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        index = min(range(len(self.clients)), key=self._inflight.__getitem__)
        if self._inflight[index] >= self._per_client and len(self.clients) < self._max:
            self.clients.append(self._factory())
            self._inflight.append(0)
            index = len(self.clients) - 1
        self._inflight[index] += 1
        try:
            yield self.clients[index]
        finally:
            self._inflight[index] -= 1


async def post_stream(client: Any, path: str, body: dict[str, Any]) -> AsyncIterator[list[Event]]:
    """POST `body` through the SDK client's generic `post` (auth, base URL, retries with
    backoff and `Retry-After`, typed status errors) and yield batches of decoded events.

    The raw response is closed on every exit, including cancellation by `stop`, which closes
    the upstream connection so the model stops generating.
    """
    import httpx2

    response = await client.post(path, cast_to=httpx2.Response, body=body, stream=True)
    try:
        decoder = SSEDecoder()
        chunks = response.aiter_bytes()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (httpx2.TransportError, httpx2.TimeoutException) as exc:
                raise StreamBroken(exc) from exc
            events = decoder.feed(chunk)
            if decoder.done:
                events.append(DONE)
            if events:
                yield events
            if decoder.done:
                return
        events = decoder.finish()
        if decoder.done:
            events.append(DONE)
        if events:
            yield events
    finally:
        await response.aclose()


class StreamBroken(Exception):
    """The response had started, then the connection failed (reset, truncated, stalled)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
