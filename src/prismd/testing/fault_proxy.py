"""A fault-injecting TCP proxy for tests: put it between prismd and a fake model server.

The proxy listens on a free 127.0.0.1 port (asyncio streams on an event loop of its own, in
a background daemon thread, the way :class:`~prismd.testing.fake_models.FakeModelServer`
runs uvicorn) and relays every connection byte for byte to ``upstream_host:upstream_port``::

    with FakeModelServer("openai") as fake, FaultProxy("127.0.0.1", fake.port) as proxy:
        env = {"OPENAI_BASE_URL": proxy.url_for("/v1"), ...}      # prismd talks to the proxy
        proxy.set_fault(Fault.reset_after_events(2), times=1)     # RST after the first token
        ...                                                       # proxy.connections, ...

A fault applies to the next ``times`` *new* connections (``None``: every new connection until
it is replaced or cleared), then the proxy passes through again. HTTP clients keep connections
alive, so :meth:`FaultProxy.set_fault` first closes every connection that is open (a pooled
idle connection would otherwise carry the next request past the fault; ``drop=False`` keeps
them, e.g. to fault a second stream while a first one runs); the client notices the closed
idle connection and opens a fresh one. :meth:`FaultProxy.reset` also zeroes the counters.

Faults act on the response (upstream -> client) direction; the request always goes through.
The point where a fault acts is ``n`` response bytes, counted from the first byte of the HTTP
status line, or, with ``events=k``, ``n`` bytes after the end of the k-th server-sent event of
the body (an event ends with a blank line, ``\\n\\n``; with the OpenAI fake, event 1 is the
role chunk and event 2 carries the first token). A fault acts when the upstream's response
reaches that point, so with ``n = 0`` it acts on the first response byte: the upstream has
read (and the fake has recorded) the request by then.

Faults (build them with the class methods of :class:`Fault`):

- ``refuse()``: accept, then reset (RST) at once, before reading a byte; nothing reaches the
  upstream. A refused connect (nothing listening) cannot be counted per connection, so the
  proxy accepts and resets instead: the client's connect fails with ``ECONNRESET`` (httpx
  raises ``ConnectError``), as it would against a server that is not there.
- ``reset_before_response()``: forward the request, then RST the client socket
  (``SO_LINGER`` 0) as the response starts, before any response byte reaches the client.
- ``reset_after_bytes(n)`` / ``reset_after_events(k, n=0)``: pass the response through up to
  the point, then RST.
- ``stall_after_bytes(n)`` / ``stall_after_events(k, n=0)``: pass up to the point, then send
  nothing and keep the connection open until the client goes away.
- ``trickle(bytes_per_s, chunk=1)``: forward the whole response ``chunk`` bytes at a time,
  paced at ``bytes_per_s``.
- ``truncate_after_bytes(n)`` / ``truncate_after_events(k, n=0)``: pass up to the point, then
  close cleanly (FIN): a truncated chunked body / SSE stream.
- ``end_body_after_events(k)``: pass up to the end of the k-th SSE event, then finish the
  chunked body properly (``\\r\\n0\\r\\n\\r\\n``) and close: a well-formed HTTP response whose
  SSE stream was cut short (no ``finish_reason``, no ``[DONE]``), the way a gateway that gives
  up on its upstream can end a response. It assumes that the event ends an HTTP chunk (true of
  the fakes: uvicorn sends one chunk per piece).

When the client closes its side, the proxy closes the upstream connection too (so the fake
sees the client go away); when the upstream closes, the proxy closes the client side. HTTP
clients never half-close, so a one-sided close ends the relay.

HTTP-level faults (a 429 with ``Retry-After``, a 500, invalid JSON in an event) belong to the
fake model server (``Reply.status``, ``Reply.headers``, ``Reply.bad_json_after``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from dataclasses import dataclass

__all__ = ["Fault", "FaultKind", "FaultProxy"]

_HEADER_END = b"\r\n\r\n"
_EVENT_END = b"\n\n"
_READ_SIZE = 65536


class FaultKind(enum.Enum):
    REFUSE = "refuse"
    RESET = "reset"  # RST at the point (n = 0: reset_before_response)
    STALL = "stall"
    TRICKLE = "trickle"
    TRUNCATE = "truncate"  # FIN at the point
    END_BODY = "end_body"  # terminate the chunked body at the point, then FIN


@dataclass(frozen=True)
class Fault:
    """One fault; build it with the class methods."""

    kind: FaultKind
    n: int = 0  # response bytes passed through before the fault acts (after `events`)
    events: int = 0  # count `n` from the end of this SSE event of the body (0: from byte 0)
    bytes_per_s: float = 0.0  # trickle pace
    chunk: int = 1  # trickle: bytes per write

    def __post_init__(self) -> None:
        if self.n < 0 or self.events < 0:
            raise ValueError("n and events must be >= 0")
        if self.kind is FaultKind.TRICKLE and (self.bytes_per_s <= 0 or self.chunk < 1):
            raise ValueError("trickle needs bytes_per_s > 0 and chunk >= 1")
        if self.kind is FaultKind.END_BODY and (self.events < 1 or self.n):
            raise ValueError("end_body acts at the end of an event: events >= 1, n = 0")

    @classmethod
    def refuse(cls) -> Fault:
        return cls(FaultKind.REFUSE)

    @classmethod
    def reset_before_response(cls) -> Fault:
        return cls(FaultKind.RESET)

    @classmethod
    def reset_after_bytes(cls, n: int, *, events: int = 0) -> Fault:
        return cls(FaultKind.RESET, n=n, events=events)

    @classmethod
    def reset_after_events(cls, events: int, n: int = 0) -> Fault:
        return cls(FaultKind.RESET, n=n, events=events)

    @classmethod
    def stall_after_bytes(cls, n: int, *, events: int = 0) -> Fault:
        return cls(FaultKind.STALL, n=n, events=events)

    @classmethod
    def stall_after_events(cls, events: int, n: int = 0) -> Fault:
        return cls(FaultKind.STALL, n=n, events=events)

    @classmethod
    def trickle(cls, bytes_per_s: float, chunk: int = 1) -> Fault:
        return cls(FaultKind.TRICKLE, bytes_per_s=bytes_per_s, chunk=chunk)

    @classmethod
    def truncate_after_bytes(cls, n: int, *, events: int = 0) -> Fault:
        return cls(FaultKind.TRUNCATE, n=n, events=events)

    @classmethod
    def truncate_after_events(cls, events: int, n: int = 0) -> Fault:
        return cls(FaultKind.TRUNCATE, n=n, events=events)

    @classmethod
    def end_body_after_events(cls, events: int) -> Fault:
        return cls(FaultKind.END_BODY, events=events)

    def point(self, seen: bytes) -> int | None:
        """Offset in the response where the fault acts, or None while it is not known yet."""
        if not self.events:
            return self.n
        body = seen.find(_HEADER_END)
        if body < 0:
            return None
        pos = body + len(_HEADER_END)
        for _ in range(self.events):
            end = seen.find(_EVENT_END, pos)
            if end < 0:
                return None
            pos = end + len(_EVENT_END)
        return pos + self.n


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: SO_LINGER on, timeout 0, then close without flushing."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.transport.is_closing():
        writer.close()


class FaultProxy:
    """A TCP relay on 127.0.0.1 that injects one :class:`Fault` into chosen connections."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._times: int | None = None
        self._connections = 0
        self._faulted = 0
        self._active = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def url_for(self, path: str = "/v1") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # -- state ---------------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Client connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def faulted(self) -> int:
        """Connections a fault was applied to so far."""
        with self._lock:
            return self._faulted

    @property
    def active(self) -> int:
        """Client connections open right now."""
        with self._lock:
            return self._active

    def set_fault(
        self, fault: Fault | None, times: int | None = None, *, drop: bool = True
    ) -> None:
        """Apply `fault` to the next `times` new connections (None: until changed). With
        `drop` (the default), first close every open connection, so that the next request
        needs a new one; `drop=False` leaves running streams alone."""
        if drop:
            self.drop_connections()
        with self._lock:
            self._fault = fault
            self._times = times if fault is not None else None

    def clear(self) -> None:
        """No fault any more (open connections are closed)."""
        self.set_fault(None)

    def reset(self) -> None:
        """No fault, no open connection, and the counters back to zero (between tests)."""
        self.set_fault(None)
        with self._lock:
            self._connections = self._faulted = 0

    def drop_connections(self) -> None:
        """Close every open connection (FIN) and wait until that is done."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def drop() -> None:
            for writer in list(self._writers):
                _close(writer)
            await asyncio.sleep(0)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(drop(), loop).result(timeout=5)

    def _take_fault(self) -> Fault | None:
        """Count a new connection (accepted and active, atomically) and pick its fault."""
        with self._lock:
            self._connections += 1
            self._active += 1
            fault = self._fault
            if fault is None:
                return None
            if self._times is not None:
                self._times -= 1
                if self._times <= 0:
                    self._fault, self._times = None, None
            self._faulted += 1
            return fault

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, sock=self._sock, limit=_READ_SIZE)
                )
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"fault proxy failed to start: {failure}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            self._sock.close()
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = self._loop = self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FaultProxy(127.0.0.1:{self.port} -> {self.upstream_host}:{self.upstream_port})"

    # -- relaying ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self._take_fault()
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if fault is not None and fault.kind is FaultKind.REFUSE:
                _rst(writer)
                return
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port, limit=_READ_SIZE
                )
            except OSError:
                _rst(writer)
                return
            # Flush every write to the kernel before the next step (exact byte points).
            writer.transport.set_write_buffer_limits(0)
            requests = asyncio.create_task(self._pump(reader, up_writer))
            responses = asyncio.create_task(self._respond(up_reader, writer, fault))
            done, pending = await asyncio.wait(
                {requests, responses}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:  # an exception in a relay is a connection going away
                task.exception()
        finally:
            _close(up_writer)
            _close(writer)
            self._writers.discard(writer)
            with self._lock:
                self._active -= 1

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client -> upstream, unchanged, until the client closes."""
        while data := await reader.read(_READ_SIZE):
            writer.write(data)
            await writer.drain()

    async def _respond(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: Fault | None
    ) -> None:
        """Upstream -> client, with the fault applied."""
        if fault is None:
            await self._pump(up, writer)
            return
        if fault.kind is FaultKind.TRICKLE:
            delay = fault.chunk / fault.bytes_per_s
            while data := await up.read(_READ_SIZE):
                for i in range(0, len(data), fault.chunk):
                    writer.write(data[i : i + fault.chunk])
                    await writer.drain()
                    await asyncio.sleep(delay)
            return

        seen = b""
        sent = 0
        while True:
            data = await up.read(_READ_SIZE)
            if not data:
                return  # the upstream ended before the point: nothing to inject
            seen += data
            point = fault.point(seen)
            end = len(seen) if point is None else min(point, len(seen))
            if end > sent:
                writer.write(seen[sent:end])
                await writer.drain()
                sent = end
            if point is not None and sent >= point:
                break

        if fault.kind is FaultKind.RESET:
            _rst(writer)
        elif fault.kind is FaultKind.TRUNCATE:
            writer.close()
        elif fault.kind is FaultKind.END_BODY:
            if b"transfer-encoding: chunked" in seen[: seen.find(_HEADER_END)].lower():
                writer.write(b"\r\n0\r\n\r\n")  # end of the current chunk, then the last one
                await writer.drain()
            writer.close()
        elif fault.kind is FaultKind.STALL:
            await asyncio.get_running_loop().create_future()  # until the client goes away
