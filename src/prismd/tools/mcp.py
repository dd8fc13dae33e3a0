"""MCP client: tools of configured MCP servers (stdio or streamable HTTP), as prismd tools.

`McpManager.start()` starts every enabled server concurrently and returns once each was either
connected (its tools listed) or failed once; a server that cannot be reached is logged and
retried, never fatal. `tools()` returns one `Tool` per MCP tool of the servers that are ready,
named `<server>__<tool>`; `on_change` is called with that list whenever it changes. `status()`
says per server: starting, ready, restarting (with the next attempt's time), failed (not
retried) or disabled, with the last error. `aclose()` closes every session and stops every stdio
server process.

The tool lists stay current:

- a server that announces `notifications/tools/list_changed` is listed again (the SDK's session
  message handler receives the notification). Servers of the 2026-07-28 protocol send it only on
  a `subscriptions/listen` stream, which is opened when the server offers it;
- a server that dies (a stdio server's output ends; a call or a listing finds the connection
  closed) loses its tools at once, and is restarted with a growing delay (RESTART_DELAY_S,
  doubling, at most RESTART_DELAY_MAX_S; back to the start after it was up for HEALTHY_S). A
  missing command, working directory or permission is not retried (`failed`). A tool object
  already handed to a turn stays callable: it answers a clear ToolError while its server is
  down or when the server no longer offers it.

Lifecycle: the SDK's clients are async context managers built on anyio task groups, which must
be entered and exited by the same task. So each connection lives in its own long-lived asyncio
task (`_Attempt._run`) that enters the contexts, publishes the connected client, and serves
relistings until it is stopped; a supervisor task per server (`_Connection._supervise`) starts
attempts one after the other. Other tasks only call methods of the client (the SDK correlates
concurrent requests from any task of the same event loop). Everything must run on the one event
loop that called `start()`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx2
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.session import IncomingMessage
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .. import __version__
from ..auth.redact import mask_text, secrets_of
from .base import Tool, ToolContext, ToolError, ToolSpec

if TYPE_CHECKING:
    from ..config import McpServerSettings

log = logging.getLogger(__name__)
stderr_log = logging.getLogger(__name__ + ".stderr")

MAX_TOOL_NAME = 64
# A server that died or failed to start is started again after RESTART_DELAY_S, then twice as
# long after each failure, at most RESTART_DELAY_MAX_S; a server that was up for HEALTHY_S
# starts the sequence again when it dies.
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 300.0
HEALTHY_S = 60.0
# A `subscriptions/listen` stream that ended is opened again after this (doubling, at most 60 s).
LISTEN_RETRY_S = 1.0
# Time given to a connection task to close its session (and stop its process) before it is
# cancelled. The SDK's stdio shutdown alone may take ~6 s (stdin close, SIGTERM, SIGKILL).
CLOSE_TIMEOUT_S = 10.0
_LIST_PAGES_MAX = 100
_STDERR_TAIL_LINES = 20

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_CONNECTION_ERRORS = (
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    ConnectionError,
    httpx2.TransportError,
)


def mcp_tool_name(server: str, tool: str) -> str:
    """`<server>__<tool>` with characters outside [A-Za-z0-9_-] replaced by `_`, at most 64.

    A name that had to be cut ends with a short hash of the full name, so two long names that
    share a prefix stay distinct.
    """
    raw = f"{server}__{tool}"
    name = _BAD_NAME_CHARS.sub("_", raw)
    if len(name) > MAX_TOOL_NAME:
        name = _hashed(name, raw)
    return name


def _hashed(name: str, raw: str) -> str:
    digest = hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{name[: MAX_TOOL_NAME - 9]}_{digest}"


def _b64_size(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        return len(data) * 3 // 4


def result_to_text(result: mcp_types.CallToolResult) -> str:
    """What the model reads of an MCP tool result.

    Text blocks verbatim; images and audio as `[image: mime, N bytes]`; resource links as
    `[resource: uri]`; embedded text resources as that line followed by their text, embedded
    binary ones as `[resource: uri, mime, N bytes]`. Structured content is added as JSON when
    no text block carries it.
    """
    parts: list[str] = []
    has_text = False
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
            has_text = True
        elif isinstance(block, mcp_types.ImageContent):
            parts.append(f"[image: {block.mime_type}, {_b64_size(block.data)} bytes]")
        elif isinstance(block, mcp_types.AudioContent):
            parts.append(f"[audio: {block.mime_type}, {_b64_size(block.data)} bytes]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource: {block.uri}]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            res = block.resource
            if isinstance(res, mcp_types.TextResourceContents):
                parts.append(f"[resource: {res.uri}]\n{res.text}")
                has_text = True
            else:
                mime = res.mime_type or "application/octet-stream"
                parts.append(f"[resource: {res.uri}, {mime}, {_b64_size(res.blob)} bytes]")
        else:  # a content type newer than this code
            parts.append(f"[{getattr(block, 'type', type(block).__name__)} content]")
    if result.structured_content is not None and not has_text:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return "\n".join(parts)


def _expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else None


def _is_dir(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def _leaf_exception(exc: BaseException) -> BaseException:
    """The first meaningful exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


State = Literal["starting", "ready", "restarting", "failed", "disabled", "stopped"]


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class _WatchedStream:
    """A transport's read stream that reports its end (EOF: a stdio server exited, or the
    transport closed it) as it happens, not when the next call fails. Satisfies the SDK's
    ReadStream protocol by delegation."""

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:  # the SDK reads it with getattr
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@contextlib.asynccontextmanager
async def _watched(transport: Any, on_end: Callable[[], None]) -> Any:
    async with transport as (read_stream, write_stream):
        yield _WatchedStream(read_stream, on_end), write_stream


class _Attempt:
    """One connection to a server: a task that holds the SDK client open until stopped, and
    lists the server's tools again when it says they changed."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.settings = conn.settings
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: Client | None = None
        self.tools: list[mcp_types.Tool] = []
        self.error: str | None = None
        self.permanent = False  # a failure that a retry cannot fix
        self.dead = False
        self.stopping = False
        self.relist = False
        self._wake = asyncio.Event()  # stop or relist
        self.gone = asyncio.Event()  # dead, stopped or ended: its tools are no longer offered
        self.scope: anyio.CancelScope | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_thread: threading.Thread | None = None
        self.task = asyncio.create_task(self._run(), name=f"prismd-mcp-{conn.name}")

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.dead

    def stop(self) -> None:
        self.stopping = True
        self.gone.set()
        self._wake.set()
        if not self.ready.done() and self.scope is not None:
            self.scope.cancel()  # still connecting: give up now

    def request_relist(self) -> None:
        self.relist = True
        self._wake.set()

    async def _run(self) -> None:
        deadline = anyio.current_time() + self.settings.timeout_s
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                self.scope = scope
                async with contextlib.AsyncExitStack() as stack:
                    client = await self._open(stack)
                    tools = await _list_tools(client)
                    scope.deadline = math.inf  # connected: from now on only stop() ends it
                    self.client, self.tools = client, tools
                    self._set_ready()
                    await self._serve(client)
            if scope.cancelled_caught and not self.ready.done() and not self.stopping:
                self.error = f"timed out after {self.settings.timeout_s:g} s while connecting"
        except Exception as exc:  # any failure of a server is reported, not raised
            self.error = await self._describe(exc)
        finally:
            if self.client is not None and not self.stopping:
                # The session ended by itself (transport failure) while prismd still uses it.
                self.conn.mark_dead(self, self.error or "the connection ended")
            if self.dead and self.error is not None and "| stderr:" not in self.error:
                self.error = self.conn.mask(self.error + await self._stderr_tail())
            self.client = None
            if self.error is None and not self.ready.done():
                self.error = "stopped before it was connected"
            self._set_ready()
            self.gone.set()

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    async def _serve(self, client: Client) -> None:
        """Until stopped: list the tools again each time the server says they changed."""
        listener = None
        caps = client.server_capabilities
        if (
            client.protocol_version in MODERN_PROTOCOL_VERSIONS
            and caps is not None
            and caps.tools is not None
            and caps.tools.list_changed
        ):
            listener = asyncio.create_task(
                self._listen(client), name=f"mcp-listen-{self.conn.name}"
            )
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.stopping:
                    return
                if self.relist:
                    self.relist = False
                    await self._relist(client)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.wait({listener})

    async def _relist(self, client: Client) -> None:
        try:
            tools = await _list_tools(client)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self.conn.mark_dead(self, "the connection closed")
            else:
                log.warning(
                    "MCP server %r: listing its changed tools failed: %s",
                    self.conn.name,
                    self.conn.mask(f"MCP error {exc.code}: {exc.message}"),
                )
            return
        except _CONNECTION_ERRORS as exc:
            self.conn.mark_dead(self, f"{type(exc).__name__}: {exc}")
            return
        self.tools = tools
        self.conn.tools_listed(self)

    async def _on_message(self, message: IncomingMessage) -> None:
        """The session's message handler: server notifications and transport errors."""
        if isinstance(message, mcp_types.ToolListChangedNotification):
            log.info("MCP server %r: its tools changed", self.conn.name)
            self.request_relist()
        elif isinstance(message, Exception):
            log.debug("MCP server %r: %s", self.conn.name, self.conn.mask(repr(message)))

    async def _listen(self, client: Client) -> None:
        """Keep a `subscriptions/listen` stream for tool-list changes open (2026-07-28 servers
        send them nowhere else). Its events also reach `_on_message`, which relists. Once the
        stream is open (again) the tools are listed again: a change made before the server
        acknowledged it was sent to no stream."""
        delay = LISTEN_RETRY_S
        while not self.stopping:
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    if not subscription.honored.tools_list_changed:
                        return  # the server declined
                    self.request_relist()
                    delay = LISTEN_RETRY_S
                    async for _event in subscription:
                        pass
            except ListenNotSupportedError:
                return
            except MCPError as exc:
                if exc.code == mcp_types.CONNECTION_CLOSED:
                    self.conn.mark_dead(self, "the connection closed")
                    return
                log.debug("MCP server %r: listen: %s", self.conn.name, exc.message)
            except _CONNECTION_ERRORS as exc:
                self.conn.mark_dead(self, f"{type(exc).__name__}: {exc}")
                return
            except (SubscriptionLost, TimeoutError) as exc:
                log.debug("MCP server %r: listen: %s", self.conn.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    def _on_end(self) -> None:
        what = "the server exited" if self.conn.transport == "stdio" else "the connection closed"
        self.conn.mark_dead(self, what)

    async def _open(self, stack: contextlib.AsyncExitStack) -> Client:
        s = self.settings
        common: dict[str, Any] = {
            "cache": None,
            "client_info": mcp_types.Implementation(name="prismd", version=__version__),
            "read_timeout_seconds": s.timeout_s,
            "message_handler": self._on_message,
        }
        if s.command:
            params = StdioServerParameters(
                command=s.command,
                args=list(s.args),
                env=dict(s.env) or None,
                cwd=_expand(s.cwd),
            )
            errlog = self._stderr_pipe()
            try:
                transport = _watched(stdio_client(params, errlog=errlog), self._on_end)
                return await stack.enter_async_context(Client(transport, **common))
            finally:
                errlog.close()  # the child holds its own copy
        assert s.url
        timeout = httpx2.Timeout(min(30.0, s.timeout_s), read=max(300.0, s.timeout_s))
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=dict(s.headers), timeout=timeout)
        )
        transport = _watched(streamable_http_client(s.url, http_client=http), self._on_end)
        return await stack.enter_async_context(Client(transport, **common))

    def _stderr_pipe(self) -> Any:
        """A file for the child's stderr; a thread keeps the last lines (masked: they reach
        `GET /api/tools`) and logs them masked at DEBUG (a server may print what it was given,
        and the default log is no place for what it prints)."""
        r, w = os.pipe()
        name = self.conn.name
        tail = self.stderr_tail
        mask = self.conn.mask

        def pump() -> None:
            with open(r, "rb", closefd=True) as f:
                for raw in f:
                    line = mask(raw.decode("utf-8", "replace").rstrip()[:2000])
                    if line:
                        tail.append(line)
                        stderr_log.debug("[%s] %s", name, line)

        self._stderr_thread = threading.Thread(target=pump, name=f"mcp-stderr-{name}", daemon=True)
        self._stderr_thread.start()
        return open(w, "w", closefd=True)  # noqa: SIM115 - closed by the caller

    async def _describe(self, exc: BaseException) -> str:
        s = self.settings
        leaf = _leaf_exception(exc)
        if isinstance(leaf, FileNotFoundError) and s.command:
            missing = s.cwd if (s.cwd and not _is_dir(s.cwd)) else None
            reason = (
                f"working directory not found: {missing}"
                if missing
                else f"command not found: {s.command}"
            )
            self.permanent = True
        elif isinstance(leaf, PermissionError) and s.command:
            reason = f"cannot run {s.command}: permission denied"
            self.permanent = True
        elif isinstance(leaf, httpx2.ConnectError):
            reason = f"cannot connect to {s.url}: {leaf}"
        elif isinstance(leaf, httpx2.HTTPStatusError):
            reason = f"HTTP {leaf.response.status_code} from {s.url}"
        elif isinstance(leaf, MCPError) and leaf.code == mcp_types.CONNECTION_CLOSED:
            reason = "the server closed the connection while starting (did it exit?)"
        elif isinstance(leaf, MCPError):
            reason = f"MCP error {leaf.code}: {leaf.message}"
        else:
            reason = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        return self.conn.mask(reason + await self._stderr_tail())

    async def _stderr_tail(self) -> str:
        """` | stderr: …` with the last lines a stdio server printed, or ""."""
        if self._stderr_thread is None:
            return ""
        # Let the pump read what a crashing server printed before it died.
        await asyncio.to_thread(self._stderr_thread.join, 0.5)
        try:
            tail = list(self.stderr_tail)[-5:]
        except RuntimeError:  # the pump appended meanwhile
            tail = []
        return " | stderr: " + " / ".join(tail) if tail else ""

    async def close(self) -> None:
        """Close the session (and stop the process), bounded; cancel the task if it hangs."""
        self.stop()
        if self.task.done():
            return
        done, _ = await asyncio.wait({self.task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.warning("MCP server %r did not close in time; cancelling it", self.conn.name)
            if self.scope is not None:
                self.scope.cancel()
            else:
                self.task.cancel()
            await asyncio.wait({self.task}, timeout=CLOSE_TIMEOUT_S)


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGES_MAX):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _restart_delay(failures: int) -> float:
    return float(min(RESTART_DELAY_S * 2 ** max(failures - 1, 0), RESTART_DELAY_MAX_S))


class _Connection:
    """A configured server: its supervisor (attempts one after the other, with a growing delay
    between failures), its current tools, and its status."""

    def __init__(self, settings: McpServerSettings, changed: Callable[[], None]) -> None:
        self.settings = settings
        self.name = settings.name
        self.transport = "stdio" if settings.command else "http"
        self.state: State = "starting"
        self.attempt: _Attempt | None = None
        self.error: str | None = None  # the last error (masked), kept once it is ready again
        self.error_at: float | None = None  # wall time
        self.next_attempt: float | None = None  # monotonic, while restarting
        self.failures = 0  # consecutive failed attempts (or deaths soon after a start)
        self.tools: list[mcp_types.Tool] = []  # offered (empty unless ready)
        self.closed = False
        self._changed = changed
        self._closing = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._settled = asyncio.Event()  # no attempt under way (see `client`)
        self._task: asyncio.Task[None] | None = None
        self._ever_ready = False
        self._secrets = secrets_of(settings)

    def mask(self, text: str) -> str:
        """`text` without this server's configured secrets nor recognisable ones: what reaches
        the log, tool errors and `GET /api/tools` (auth/redact.py)."""
        return mask_text(text, self._secrets)

    def config_error(self) -> str | None:
        s = self.settings
        if not s.enabled:
            return "disabled"
        if s.command and s.url:
            return "both command (stdio) and url (http) are set; set one"
        if not s.command and not s.url:
            return "neither command (stdio) nor url (http) is set"
        return None

    @property
    def connected(self) -> bool:
        return self.state == "ready" and self.attempt is not None and self.attempt.connected

    def start(self) -> asyncio.Future[None]:
        """Start the supervisor; the future resolves once the first attempt connected or
        failed."""
        problem = self.config_error()
        self._first = asyncio.get_running_loop().create_future()
        if problem is not None:
            if problem == "disabled":
                self.state = "disabled"
            else:
                self.state = "failed"
                self._record(problem)
                log.warning("MCP server %r skipped: %s", self.name, problem)
            self._first.set_result(None)
        else:
            self._task = asyncio.create_task(self._supervise(), name=f"mcp-supervisor-{self.name}")
        return self._first

    def _first_done(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    def _record(self, error: str) -> None:
        self.error = self.mask(error)
        self.error_at = time.time()

    def _offer(self, tools: list[mcp_types.Tool]) -> None:
        if tools != self.tools:
            self.tools = tools
            self._changed()

    async def _supervise(self) -> None:
        try:
            await self._run_attempts()
        except Exception as exc:  # a bug here must not leave the server silently half-up
            log.exception("MCP server %r: its supervisor failed", self.name)
            self.state, self.next_attempt = "failed", None
            self._record(f"internal error: {type(exc).__name__}: {exc}")
            if self.attempt is not None:
                await self.attempt.close()
        finally:
            if self.closed:
                self.state, self.next_attempt = "stopped", None
            self._offer([])
            self._settled.set()
            self._first_done()

    async def _run_attempts(self) -> None:
        """Attempts one after the other, with a growing delay between failures, until closed
        (or a failure that a retry cannot fix)."""
        while not self.closed:
            self.state, self.next_attempt = "starting", None
            self._settled.clear()
            attempt = await self._connect()
            if self.closed:
                return
            if attempt.connected:
                up = time.monotonic()
                self.state = "ready"
                self._offer(attempt.tools)
                log.info(
                    "MCP server %r %s (%s, %d tools)",
                    self.name,
                    "connected again" if self._ever_ready else "connected",
                    self.transport,
                    len(attempt.tools),
                )
                self._ever_ready = True
                self._settled.set()
                self._first_done()
                await attempt.gone.wait()
                if self.closed:
                    return
                # Its tools vanish at once, before the process is reaped.
                self.state = "restarting"
                self._record(attempt.error or "the connection ended")
                self._offer([])
                if time.monotonic() - up >= HEALTHY_S:
                    self.failures = 0
                await attempt.close()  # the process is gone before another starts
                what = "disconnected"
            else:
                what = "could not be restarted" if self._ever_ready else "could not be started"
            self._record(attempt.error or "the connection ended")
            if attempt.permanent:
                self.state = "failed"
                log.warning("MCP server %r %s (not retried): %s", self.name, what, self.error)
                return
            self.failures += 1
            delay = _restart_delay(self.failures)
            self.state, self.next_attempt = "restarting", time.monotonic() + delay
            log.warning(
                "MCP server %r %s: %s; next attempt in %g s", self.name, what, self.error, delay
            )
            self._settled.set()
            self._first_done()
            await attempt.close()  # a timed-out attempt may still be unwinding
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.next_attempt - time.monotonic())):
                    await self._closing.wait()

    async def _connect(self) -> _Attempt:
        attempt = self.attempt = _Attempt(self)
        grace = 0.25  # a failed attempt finishes unwinding (stopping its process) in its task
        await asyncio.wait({attempt.ready}, timeout=self.settings.timeout_s + grace)
        if not attempt.ready.done():
            attempt.error = f"timed out after {self.settings.timeout_s:g} s while connecting"
            attempt.stop()
        return attempt

    def tools_listed(self, attempt: _Attempt) -> None:
        """The attempt listed the tools again (the server said they changed)."""
        if attempt is self.attempt and self.state == "ready" and attempt.connected:
            if attempt.tools != self.tools:
                log.info("MCP server %r: %d tools now", self.name, len(attempt.tools))
            self._offer(attempt.tools)

    def offers(self, mcp_name: str) -> bool:
        return self.connected and any(t.name == mcp_name for t in self.tools)

    def unavailable(self) -> str:
        """Why its tools cannot be called now (a ToolError's text)."""
        prefix = f"MCP server '{self.name}' is not connected"
        error = self.error or "unknown error"
        if self.state == "restarting" and self.next_attempt is not None:
            wait = max(0.0, self.next_attempt - time.monotonic())
            return f"{prefix}: {error}; next attempt in {wait:.0f} s"
        if self.state == "failed":
            return f"{prefix}: {error} (not retried)"
        if self.state == "starting":
            return f"{prefix}: starting ({error})" if self.error else f"{prefix}: starting"
        if self.state in ("disabled", "stopped"):
            return f"{prefix}: {self.state}"
        return f"{prefix}: {error}"

    async def client(self) -> Client:
        """The connected client; waits for an attempt under way (bounded), else ToolError."""
        if self.state == "starting":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout_s + 1.0):
                    await self._settled.wait()
        attempt = self.attempt
        if self.connected and attempt is not None and attempt.client is not None:
            return attempt.client
        raise ToolError(self.unavailable())

    def mark_dead(self, attempt: _Attempt, reason: str) -> None:
        """The attempt's connection broke (its supervisor restarts the server)."""
        if attempt.dead or attempt.stopping:
            return
        attempt.dead = True
        attempt.error = self.mask(reason)
        attempt.stop()  # its task closes what is left (and reaps the process)

    def status(self) -> dict[str, Any]:
        restarting = self.state == "restarting" and self.next_attempt is not None
        client = self.attempt.client if self.connected and self.attempt is not None else None
        return {
            "name": self.name,
            "transport": self.transport,
            "state": self.state,
            "connected": self.connected,
            "tools": len(self.tools) if self.connected else 0,
            "error": self.mask(self.error) if self.error else None,
            "errorAt": _iso(self.error_at),
            "nextAttemptAt": (
                _iso(time.time() + max(0.0, self.next_attempt - time.monotonic()))
                if restarting and self.next_attempt is not None
                else None
            ),
            "failures": self.failures,
            "protocol": client.protocol_version if client is not None else None,
        }

    async def aclose(self) -> None:
        self.closed = True
        self._closing.set()
        if self.attempt is not None:
            await self.attempt.close()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_S)
        self.state, self.next_attempt = "stopped", None


class McpTool(Tool):
    """One tool of an MCP server."""

    def __init__(self, conn: _Connection, tool: mcp_types.Tool, name: str) -> None:
        self.conn = conn
        self.definition = tool
        self.mcp_name = tool.name
        s = conn.settings
        schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
        schema = dict(schema)
        schema.setdefault("type", "object")
        if schema.get("type") == "object":
            schema.setdefault("properties", {})
        description = (tool.description or tool.title or tool.name).strip()
        self.spec = ToolSpec(
            name=name,
            description=f"[{s.name}] {description}",
            parameters=schema,
            needs_approval=any(
                fnmatch.fnmatchcase(tool.name, pat) or fnmatch.fnmatchcase(name, pat)
                for pat in s.approve
            ),
            source=f"mcp:{s.name}",
            # Its process or endpoint acts with the server's credentials for every caller.
            host_level=not s.allow_users,
            data_access=s.data_classification,
        )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        return await self.call(args)

    async def call(self, args: dict[str, Any], *, timeout_s: float | None = None) -> str:
        """Call the tool; `timeout_s` overrides the server's `timeout_s` for this call."""
        conn = self.conn
        timeout = conn.settings.timeout_s if timeout_s is None else timeout_s
        client = await conn.client()
        attempt = conn.attempt
        if not conn.offers(self.mcp_name):
            raise ToolError(
                f"MCP server '{conn.name}' no longer offers the tool '{self.mcp_name}' (its tool "
                "list changed); it is gone from the tools of the next turn"
            )
        label = f"MCP tool '{self.mcp_name}' of server '{conn.name}'"
        try:
            # The SDK's timeout (which sends notifications/cancelled) fires first; this outer one
            # only guards against a transport that blocks before the request is written.
            async with asyncio.timeout(timeout + 5.0):
                result = await client.call_tool(self.mcp_name, args, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(f"{label} timed out after {timeout:g} s") from None
            if exc.code == mcp_types.CONNECTION_CLOSED:
                if attempt is not None:
                    conn.mark_dead(attempt, "the connection closed")
                raise ToolError(
                    f"MCP server '{conn.name}' is not connected: the connection closed"
                ) from None
            raise ToolError(
                conn.mask(f"{label} failed: {exc.message} (MCP error {exc.code})")
            ) from None
        except TimeoutError:
            raise ToolError(f"{label} timed out after {timeout:g} s") from None
        except _CONNECTION_ERRORS as exc:
            if attempt is not None:
                conn.mark_dead(attempt, f"{type(exc).__name__}: {exc}")
            raise ToolError(
                conn.mask(f"MCP server '{conn.name}' is not connected: {exc}")
            ) from None
        except Exception as exc:  # e.g. a result that fails its output schema
            raise ToolError(conn.mask(f"{label} failed: {type(exc).__name__}: {exc}")) from None
        text = result_to_text(result)
        if result.is_error:
            raise ToolError(text or f"{label} reported an error")
        return text if text else "(no output)"


class McpManager:
    """The configured MCP servers and their tools."""

    def __init__(
        self,
        servers: list[McpServerSettings],
        on_change: Callable[[list[Tool]], object] | None = None,
    ) -> None:
        self._conns = [_Connection(s, self._refresh) for s in servers]
        self.on_change = on_change
        self._started = False
        self._tools: list[Tool] = []
        # McpTool objects by (server, MCP name, prismd name): a tool that comes back unchanged
        # (after a restart, a relisting) is the same object, so a view holding it works again.
        self._objects: dict[tuple[str, str, str], McpTool] = {}

    async def start(self) -> None:
        """Start every enabled server concurrently; returns once each connected or failed once
        (failures are logged and retried)."""
        if self._started:
            return
        self._started = True
        await asyncio.gather(*(c.start() for c in self._conns))

    def tools(self) -> list[Tool]:
        """One tool per MCP tool of each ready server, named `<server>__<tool>`."""
        return list(self._tools)

    def _refresh(self) -> None:
        """A server's tools changed: rebuild the list, tell `on_change` if it differs."""
        tools: list[Tool] = []
        seen: set[str] = set()
        objects: dict[tuple[str, str, str], McpTool] = {}
        for conn in self._conns:
            for t in conn.tools:
                name = mcp_tool_name(conn.name, t.name)
                if name in seen:
                    name = _hashed(name, f"{conn.name}__{t.name}")
                if name in seen:
                    log.warning("MCP server %r: duplicate tool %r ignored", conn.name, t.name)
                    continue
                seen.add(name)
                key = (conn.name, t.name, name)
                tool = self._objects.get(key)
                if tool is None or tool.definition != t:
                    tool = McpTool(conn, t, name)
                objects[key] = tool
                tools.append(tool)
        self._objects.update(objects)
        if len(tools) == len(self._tools) and all(
            a is b for a, b in zip(tools, self._tools, strict=True)
        ):
            return
        self._tools = tools
        if self.on_change is not None:
            try:
                self.on_change(list(tools))
            except Exception:  # the servers go on; the next change tries again
                log.exception("MCP tools changed, but the change could not be applied")

    def status(self) -> list[dict[str, Any]]:
        """Per server: name, transport ("stdio"/"http"), state, connected, tools (count),
        error (the last one, masked), errorAt, nextAttemptAt (while restarting), failures
        (in a row), protocol (the MCP version spoken, while ready)."""
        return [c.status() for c in self._conns]

    async def aclose(self) -> None:
        """Close every session and stop every stdio server process."""
        await asyncio.gather(*(c.aclose() for c in self._conns), return_exceptions=True)
