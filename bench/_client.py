"""The benchmark's clients: lean, and measuring prismd and the direct floor the same way.

Two connection types on plain asyncio Protocols, so that the client costs little CPU on a
2-core machine it shares with prismd and the fake model:

- :class:`WSConn`: a minimal WebSocket client (RFC 6455: text frames, no extensions, masked
  sends, ping answered, close handshake) for prismd's ``/ws``.
- :class:`HTTPConn`: a keep-alive HTTP/1.1 client that streams a server-sent-events response,
  parsed by ``httptools`` (the C parser uvicorn uses; it undoes the chunked encoding), for the
  direct requests to the fake model.

Both take one timestamp per read from the socket (``time.monotonic()``, the machine-wide
monotonic clock the fake model stamps its answers with) and hand every message to a callback
synchronously: no queue, task or future per message on the measured path. On both sides every
text message (a ``chunk`` frame, an SSE ``data:`` line) is decoded with ``json.loads``, so the
client does the same work per piece through prismd and direct.

:class:`Schedule` turns the text of an answer into the lag of each piece: the fake model
(``--stamp``) starts the answer with ``"@<t0> "``; piece i (counted from the text length, so
merged deltas count right) was due at ``t0 + i / rate``; its lag is its arrival time minus
that. A piece that arrives inside a merged delta gets the arrival time of that delta.

The measured figures in bench/load.py were taken with these clients; the heavier
alternatives (the ``websockets`` client, ``aiohttp``) are kept beside them for comparison.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools

now = time.monotonic
_loads = json.loads
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Closed(ConnectionError):
    """The connection is closed (by either side)."""


# ------------------------------------------------------------------------------- WebSocket


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WSConn(asyncio.Protocol):
    """One client WebSocket. Text messages go to ``on_text(text, arrival)`` when it is set,
    else to a queue read by :meth:`recv`."""

    def __init__(self, key: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self._key = key
        self._buf = b""
        self._open = False
        self._frag: list[bytes] | None = None
        self._close_sent = False
        self._queue: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.on_text: Callable[[str, float], None] | None = None
        self.on_close: Callable[[], None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = now()
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._open:
            i = data.find(b"\r\n\r\n")
            if i < 0:
                self._buf = data
                return
            self._check_handshake(data[:i])
            if not self._open:
                return
            data = data[i + 4 :]
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1]
            hl = 2
            if ln > 125:
                if ln & 0x80:
                    self._fail("masked frame from the server")
                    return
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                    hl = 4
                else:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    hl = 10
            end = pos + hl + ln
            if end > n:
                break
            payload = data[pos + hl : end]
            pos = end
            op = b0 & 0x0F
            if op == 1 and b0 & 0x80:
                self._deliver(payload.decode(), t)
            else:
                self._control(b0, op, payload, t)
        if pos < n:
            self._buf = data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.handshake.done():
            self.handshake.set_exception(Closed(f"connection lost during the handshake: {exc}"))
        self._wake()
        if self.on_close is not None:
            self.on_close()

    # -- frames

    def _check_handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        accept = base64.b64encode(hashlib.sha1(self._key + _WS_GUID).digest())
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            self._fail(f"no upgrade: {lines[0].decode(errors='replace')}")
        elif headers.get(b"sec-websocket-accept") != accept:
            self._fail("bad Sec-WebSocket-Accept")
        else:
            self._open = True
            self.handshake.set_result(None)

    def _control(self, b0: int, op: int, payload: bytes, t: float) -> None:
        if op == 9:  # ping
            self._write(_ws_frame(0xA, payload))
        elif op == 8:  # close: answer it, then the server closes the TCP connection
            if not self._close_sent:
                self._close_sent = True
                self._write(_ws_frame(0x8, payload[:2]))
            self.closed = True
            self._wake()
        elif op in (1, 2) and not b0 & 0x80:  # first fragment
            self._frag = [payload]
        elif op == 0 and self._frag is not None:  # continuation
            self._frag.append(payload)
            if b0 & 0x80:
                whole, self._frag = b"".join(self._frag), None
                self._deliver(whole.decode(errors="replace"), t)
        elif op == 2:
            self._deliver(payload.decode(errors="replace"), t)

    def _deliver(self, text: str, t: float) -> None:
        cb = self.on_text
        if cb is not None:
            cb(text, t)
            return
        self._queue.append(text)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(Closed(why))
        if self.transport is not None:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.write(data)

    # -- API

    def send_text(self, text: str) -> None:
        if self.closed:
            raise Closed("websocket closed")
        self._write(_ws_frame(0x1, text.encode()))

    async def send(self, text: str) -> None:
        self.send_text(text)

    async def recv(self) -> str:
        while not self._queue:
            if self.closed:
                raise Closed("websocket closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def drain_queue(self) -> None:
        self._queue.clear()

    async def close(self, wait_s: float = 2.0) -> None:
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        if not self._close_sent:
            self._close_sent = True
            self._write(_ws_frame(0x8, (1000).to_bytes(2, "big")))
        try:
            async with asyncio.timeout(wait_s):
                while not tr.is_closing() and not self._lost():
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except TimeoutError:
            pass
        tr.close()

    def _lost(self) -> bool:
        return self.closed and (self.transport is None or self.transport.is_closing())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def ws_connect(host: str, port: int, path: str = "/ws", wait_s: float = 15.0) -> WSConn:
    """Open a WebSocket (TCP connect + upgrade)."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    async with asyncio.timeout(wait_s):
        _, proto = await loop.create_connection(lambda: WSConn(key), host, port)
        assert proto.transport is not None
        proto.transport.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        try:
            await proto.handshake
        except BaseException:
            proto.abort()
            raise
    return proto


async def ws_open(host: str, port: int, wait_s: float = 15.0) -> WSConn:
    """A prismd connection: the upgrade, then its `connected` greeting."""
    ws = await ws_connect(host, port, "/ws", wait_s)
    try:
        async with asyncio.timeout(wait_s):
            hello = await ws.recv()
        if '"connected"' not in hello:
            raise RuntimeError(f"unexpected greeting: {hello[:200]}")
    except BaseException:
        ws.abort()
        raise
    return ws


# ------------------------------------------------------------------------------- HTTP + SSE


class HTTPConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; :meth:`request` streams a response whose SSE
    ``data:`` payloads go to ``on_data(payload, arrival)``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: Any = None
        self._t = 0.0
        self._sse = b""
        self._on_data: Callable[[bytes, float], None] | None = None
        self._fut: asyncio.Future[float] | None = None
        self.status = 0
        self._err = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._t = now()
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(Closed(f"connection lost: {exc}"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self._err += body[:2000]
            return
        buf = self._sse + body if self._sse else body
        start = 0
        cb = self._on_data
        t = self._t
        while True:
            i = buf.find(b"\n\n", start)
            if i < 0:
                break
            ev = buf[start:i]
            start = i + 2
            if ev.startswith(b"data: ") and b"\n" not in ev:  # the usual one-line event
                if cb is not None:
                    cb(ev[6:], t)
                continue
            for line in ev.split(b"\n"):
                if line.startswith(b"data:") and cb is not None:
                    cb(line[5:].lstrip(), t)
        self._sse = buf[start:]

    def on_message_complete(self) -> None:
        keep_alive = self._parser.should_keep_alive()
        if self.status != 200:
            self._finish(RuntimeError(f"HTTP {self.status}: {bytes(self._err[:300])!r}"))
        else:
            self._finish(None)
        if not keep_alive and self.transport is not None:
            self.transport.close()

    def _finish(self, exc: BaseException | None) -> None:
        fut = self._fut
        self._fut = None
        self._parser = None
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(self._t)
            else:
                fut.set_exception(exc)

    def request(
        self, path: bytes, body: bytes, on_data: Callable[[bytes, float], None]
    ) -> asyncio.Future[float]:
        """Send a POST; the future resolves to the arrival time of the response's end."""
        if self.closed or self.transport is None:
            raise Closed("connection closed")
        if self._fut is not None:
            raise RuntimeError("one request at a time per connection")
        self._parser = httptools.HttpResponseParser(self)
        self._sse = b""
        self._err.clear()
        self.status = 0
        self._on_data = on_data
        self._fut = fut = asyncio.get_running_loop().create_future()
        self.transport.write(
            b"POST " + path + b" HTTP/1.1\r\nHost: " + f"{self.host}:{self.port}".encode() + b"\r\n"
            b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        return fut

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def http_connect(host: str, port: int, wait_s: float = 15.0) -> HTTPConn:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(wait_s):
        _, proto = await loop.create_connection(lambda: HTTPConn(host, port), host, port)
    return proto


class HTTPPool:
    """A pooled connection for sequential requests: reconnects when the server closed it
    (uvicorn drops idle keep-alive connections after 5 s)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn: HTTPConn | None = None

    async def get(self) -> HTTPConn:
        if self.conn is None or self.conn.closed:
            self.conn = await http_connect(self.host, self.port)
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


# ------------------------------------------------------------------------------- one turn


class Schedule:
    """The lag of each piece of one stamped answer (see the module docstring)."""

    __slots__ = ("interval", "plen", "lags", "at", "t0", "head", "chars", "n", "unstamped")

    def __init__(self, rate: float, piece_len: int, lags: array, at: array | None = None):
        self.interval = 1.0 / rate
        self.plen = piece_len
        self.lags = lags  # shared by all turns of a phase, or the turn's own
        self.at = at  # arrival times, parallel to lags (soak: windows by arrival)
        self.t0: float | None = None
        self.head = ""
        self.chars = 0
        self.n = 0
        self.unstamped = False

    def feed(self, text: str, t: float) -> None:
        if self.t0 is None:
            if self.unstamped:
                return
            self.head += text
            if not self.head.startswith("@"):
                self.unstamped = True
                return
            i = self.head.find(" ")
            if i < 0:
                return
            try:
                self.t0 = float(self.head[1:i])
            except ValueError:
                self.unstamped = True
                return
            text = self.head[i + 1 :]
            self.head = ""
        self.chars += len(text)
        n = self.chars // self.plen
        if n > self.n:
            t0, iv, lags = self.t0, self.interval, self.lags
            for j in range(self.n, n):
                lags.append(t - t0 - j * iv)
            if self.at is not None:
                self.at.extend([t] * (n - self.n))
            self.n = n


@dataclass
class TurnResult:
    t_send: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    error: str | None = None
    chunks: int = 0  # chunk frames (prismd) or content deltas (direct)
    pieces: int = 0  # pieces whose lag was measured (stamped answers; lags: the Schedule's)
    latency: dict[str, Any] | None = None  # prismd's own `done.latency`
    stop_reason: str | None = None  # prismd's `done.stopReason` (end, stopped, interrupted...)


USAGE_WAIT_S = 1.0  # after `done`, how long chat_turn waits for `context_usage`


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def chat_turn(
    ws: WSConn,
    frame: str,
    wait_s: float,
    *,
    schedule: Schedule | None = None,
    wait_usage: bool = True,
) -> TurnResult:
    """Send one `chat` frame to prismd and read its events until `done` (then, with
    wait_usage, its `context_usage`, so the next turn starts clean) or `error`."""
    res = TurnResult()
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(text: str, t: float) -> None:
        d = _loads(text)
        typ = d.get("type")
        if typ == "chunk":
            res.chunks += 1
            if res.t_first is None:
                res.t_first = t
            if schedule is not None:
                schedule.feed(d.get("delta") or "", t)
        elif typ == "done":
            res.t_done = t
            res.latency = d.get("latency")
            res.stop_reason = d.get("stopReason")
            if not wait_usage:
                _finish(fut)
            else:  # context_usage follows at once; a server that stopped sending it is not hung
                asyncio.get_running_loop().call_later(USAGE_WAIT_S, _finish, fut)
        elif typ == "context_usage":
            if res.t_done is not None:
                _finish(fut)
        elif typ == "error":
            res.error = d.get("code") or "error"
            _finish(fut)

    def on_close() -> None:
        res.error = res.error or "closed"
        _finish(fut)

    ws.drain_queue()  # frames left over from an earlier exchange are not this turn's
    ws.on_text, ws.on_close = on_text, on_close
    try:
        async with asyncio.timeout(wait_s):
            res.t_send = now()
            ws.send_text(frame)
            await fut
    except TimeoutError:
        res.error = res.error or ("timeout_after_done" if res.t_done else "timeout")
    except Closed:
        res.error = res.error or "closed"
    finally:
        ws.on_text = ws.on_close = None
    if schedule is not None:
        res.pieces = schedule.n
        if schedule.unstamped and res.error is None:
            res.error = "unstamped_answer"
    return res


async def direct_turn(
    conn: HTTPConn,
    path: bytes,
    body: bytes,
    wait_s: float,
    *,
    schedule: Schedule | None = None,
) -> TurnResult:
    """Send one streamed chat-completions request straight to the model server and read it
    to its end; every SSE event is decoded like prismd's chunk frames are."""
    res = TurnResult()

    def on_data(payload: bytes, t: float) -> None:
        if payload == b"[DONE]":
            return
        ev = _loads(payload)
        ch = ev.get("choices")
        if ch:
            text = ch[0].get("delta", {}).get("content")
            if text:
                res.chunks += 1
                if res.t_first is None:
                    res.t_first = t
                if schedule is not None:
                    schedule.feed(text, t)

    try:
        async with asyncio.timeout(wait_s):
            res.t_send = now()
            res.t_done = await conn.request(path, body, on_data)
    except TimeoutError:
        res.error = "timeout"
        conn.abort()
    except Exception as exc:  # noqa: BLE001 - closed, HTTP error, unparsable stream
        res.error = type(exc).__name__ + (f": {exc}" if isinstance(exc, RuntimeError) else "")
    if schedule is not None:
        res.pieces = schedule.n
        if schedule.unstamped and res.error is None:
            res.error = "unstamped_answer"
    return res


async def aiohttp_turn(session: Any, url: str, body: bytes, wait_s: float) -> TurnResult:
    """The same request through aiohttp (for comparison with :func:`direct_turn`)."""
    res = TurnResult()
    try:
        async with asyncio.timeout(wait_s):
            res.t_send = now()
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    ch = _loads(line[6:]).get("choices")
                    if ch and ch[0].get("delta", {}).get("content"):
                        res.chunks += 1
                        if res.t_first is None:
                            res.t_first = now()
            res.t_done = now()
    except Exception as exc:  # noqa: BLE001
        res.error = type(exc).__name__
    return res


# ------------------------------------------------------------------------------- many


NEW_SESSION = json.dumps({"type": "new_session"})


async def new_session(ws: WSConn, wait_s: float = 10.0) -> None:
    ws.drain_queue()
    ws.send_text(NEW_SESSION)
    async with asyncio.timeout(wait_s):
        while '"session_ended"' not in await ws.recv():
            pass


async def open_many(opener: Callable[[], Any], n: int, batch: int = 100) -> tuple[list[Any], int]:
    """Open n connections in batches (so the listen backlog never overflows)."""
    conns: list[Any] = []
    failed = 0
    for i in range(0, n, batch):
        got = await asyncio.gather(
            *(opener() for _ in range(min(batch, n - i))), return_exceptions=True
        )
        for r in got:
            if isinstance(r, BaseException):
                failed += 1
            else:
                conns.append(r)
    return conns, failed


async def close_many(conns: list[Any], wait_s: float = 20.0) -> None:
    for i in range(0, len(conns), 250):
        part = conns[i : i + 250]
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.gather(*(c.close() for c in part), return_exceptions=True)
        except TimeoutError:
            for c in part:
                c.abort()
