"""Streamed model requests over aiohttp: pooled connections, one idle watchdog per stream,
server-sent events read in whatever bytes are available and split in one pass, orjson.

Why not the SDKs' own HTTP stack: measured on this project's 2-core machine, streaming through
httpx (which both SDKs use) cost 140-270 µs of CPU per streamed piece against 30-80 µs for
aiohttp, mostly per-read timeout scopes and per-chunk iteration; at a few hundred concurrent
streams that decides whether prismd keeps up (docs/benchmarks.md). The request itself is what
the SDKs send (the same JSON body, authentication headers, retries with backoff on 408/409/429/
5xx and connection errors, `Retry-After` honoured), and a failure becomes the same coded
ProviderError. The SDKs are still used for everything else (listing models, speech).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from .. import __version__
from ..protocol import ErrorCode
from .base import ProviderError

Event = tuple[str | None, Any]  # (event name, decoded data)
DONE: Event = ("[DONE]", {})  # appended to the batch in which OpenAI's `data: [DONE]` came

RETRY_STATUSES = frozenset({408, 409, 429})
INITIAL_BACKOFF_S, MAX_BACKOFF_S, MAX_RETRY_AFTER_S = 0.5, 8.0, 60.0


def ended_early(label: str) -> ProviderError:
    """The body ended cleanly but before the answer's end marker: as good as a broken stream
    (retried if nothing was produced, else a provider_error that keeps the partial text)."""
    return ProviderError(
        f"The connection to {label} broke during its answer: the response ended before the "
        "answer did",
        retryable=True,
    )


class SSEDecoder:
    """Incremental server-sent-events parser over bytes; `[DONE]` ends the stream (OpenAI's
    convention). An event is a block of lines ended by a blank line."""

    def __init__(self) -> None:
        self._partial = b""
        self.done = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self.done:
            return []
        data = self._partial + chunk if self._partial else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        blocks = data.split(b"\n\n")
        self._partial = blocks.pop()
        events: list[Event] = []
        for block in blocks:
            if self._dispatch(block, events):
                break
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._partial and not self.done:
            self._dispatch(self._partial, events)
        self._partial = b""
        return events

    def _dispatch(self, block: bytes, events: list[Event]) -> bool:
        """Parse one event block; True once `[DONE]` was seen."""
        if block.startswith(b"data: ") and b"\n" not in block:
            name, payload = None, block[6:]  # the common case: one data line
        else:
            name, lines = None, []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    lines.append(value[1:] if value.startswith(b" ") else value)
                elif line.startswith(b"event:"):
                    name = line[6:].strip().decode()
            if not lines:
                return False
            payload = b"\n".join(lines)
        if payload.strip() == b"[DONE]":
            self.done = True
            return True
        events.append((name, orjson.loads(payload)))
        return False


class _Idle:
    """One watchdog per stream: closes the response when nothing arrived for `timeout_s`
    (a timer rescheduled once per period, not a timeout scope per read)."""

    def __init__(self, timeout_s: float, response: aiohttp.ClientResponse) -> None:
        self.timeout_s = timeout_s
        self.response = response
        self.fired = False
        self.last = time.monotonic()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(timeout_s, self._check)

    def touch(self) -> None:
        self.last = time.monotonic()

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if idle >= self.timeout_s:
            self.fired = True
            self.response.close()
        else:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self.timeout_s - idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class StreamClient:
    """POSTs streamed requests to one model endpoint and yields batches of decoded events."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        label: str,
        timeout_s: float,
        connect_timeout_s: float,
        max_retries: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": f"prismd/{__version__}",
            **headers,
        }
        self.label = label
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.connect_timeout_s, sock_connect=self.connect_timeout_s
                ),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                auto_decompress=True,
            )
        return self._session

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[Event]]:
        """The events of the response, a batch per network read. The response is closed on
        every exit, including cancellation by `stop`, which closes the upstream connection so
        that the model stops generating."""
        response = await self._open(path, orjson.dumps(body))
        idle = _Idle(self.timeout_s, response)
        try:
            decoder = SSEDecoder()
            content = response.content
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, OSError) as exc:
                    raise self._broken(idle, exc) from exc
                if not chunk:
                    if idle.fired:
                        raise self._broken(idle, None)
                    break
                idle.touch()
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
            idle.cancel()
            response.close()

    def _broken(self, idle: _Idle, exc: BaseException | None) -> ProviderError:
        if idle.fired:
            return ProviderError(
                f"{self.label} stopped sending in the middle of its answer (timed out)",
                ErrorCode.PROVIDER_TIMEOUT,
                retryable=True,
            )
        return ProviderError(
            f"The connection to {self.label} broke during its answer: {_describe(exc)}",
            retryable=True,
        )

    async def _open(self, path: str, data: bytes) -> aiohttp.ClientResponse:
        """Send the request, retrying what the SDKs retry before a response has begun."""
        url = self.base_url + path
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await self._client().post(url, data=data, headers=self.headers)
            except TimeoutError:
                error = ProviderError(
                    f"{self.label} did not answer in time (timed out)", ErrorCode.PROVIDER_TIMEOUT
                )
            except (aiohttp.ClientError, OSError) as exc:
                error = ProviderError(f"Cannot reach {self.label}: {_describe(exc)}")
            else:
                if response.status < 400:
                    return response
                error = await self._status_error(response)
                should = response.headers.get("x-should-retry")
                retryable = (
                    should == "true"
                    if should in ("true", "false")
                    else response.status in RETRY_STATUSES or response.status >= 500
                )
                retry_after = _retry_after(response.headers)
                response.release()
                if not retryable:
                    raise error
            if attempt >= self.max_retries:
                raise error
            await asyncio.sleep(_backoff(attempt, retry_after))
            attempt += 1

    async def _status_error(self, response: aiohttp.ClientResponse) -> ProviderError:
        try:
            text = (await response.read())[:4000].decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError):
            text = ""
        detail = text.strip() or response.reason or ""
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            if message:
                detail = str(message)
        return ProviderError(f"{self.label} returned HTTP {response.status}: {detail}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return email.utils.mktime_tz(parsed) - time.time()


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER_S:
        return retry_after
    delay = min(INITIAL_BACKOFF_S * 2**attempt, MAX_BACKOFF_S)
    return delay * (1 - 0.25 * random.random())


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "the connection closed"
    return str(exc) or type(exc).__name__
