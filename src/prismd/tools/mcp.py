"""MCP client: tools of configured MCP servers (stdio or streamable HTTP), as prismd tools.

`McpManager.start()` connects to every enabled server concurrently and lists its tools; a server
that cannot be reached is logged and skipped (see `status()`), never fatal. `tools()` returns one
`Tool` per MCP tool, named `<server>__<tool>`. `aclose()` closes every session and stops every
stdio server process (its whole process group).

Lifecycle: the SDK's clients are async context managers built on anyio task groups, which must
be entered and exited by the same task. So each connection lives in its own long-lived asyncio
task (`_Attempt._run`) that enters the contexts, publishes the connected client, and waits for a
stop event; other tasks only call methods of the client (the SDK correlates concurrent requests
from any task of the same event loop). Everything must run on the one event loop that called
`start()`.
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
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from .. import __version__
from ..auth.redact import mask_text, secrets_of
from .base import Tool, ToolContext, ToolError, ToolSpec

if TYPE_CHECKING:
    from ..config import McpServerSettings

log = logging.getLogger(__name__)
stderr_log = logging.getLogger(__name__ + ".stderr")

MAX_TOOL_NAME = 64
# After a failed reconnect, calls fail fast for this long before the next attempt.
RECONNECT_BACKOFF_S = 30.0
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


class _Attempt:
    """One connection to a server: a task that holds the SDK client open until stopped."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.settings = conn.settings
        self.stop = asyncio.Event()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: Client | None = None
        self.tools: list[mcp_types.Tool] = []
        self.error: str | None = None
        self.dead = False
        self.scope: anyio.CancelScope | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_thread: threading.Thread | None = None
        self.task = asyncio.create_task(self._run(), name=f"prismd-mcp-{conn.name}")

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.dead

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
                    await self.stop.wait()
            if scope.cancelled_caught and not self.ready.done():
                self.error = f"timed out after {self.settings.timeout_s:g} s while connecting"
        except Exception as exc:  # any failure of a server is reported, not raised
            self.error = await self._describe(exc)
        finally:
            if self.client is not None and not self.stop.is_set():
                # The session ended by itself (transport failure) while prismd still uses it.
                self.conn.mark_dead(self, self.error or "the connection ended")
            self.client = None
            if self.error is None and not self.ready.done():
                self.error = "stopped before it was connected"
            self._set_ready()

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    async def _open(self, stack: contextlib.AsyncExitStack) -> Client:
        s = self.settings
        common: dict[str, Any] = {
            "cache": None,
            "client_info": mcp_types.Implementation(name="prismd", version=__version__),
            "read_timeout_seconds": s.timeout_s,
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
                transport = stdio_client(params, errlog=errlog)
                return await stack.enter_async_context(Client(transport, **common))
            finally:
                errlog.close()  # the child holds its own copy
        assert s.url
        timeout = httpx2.Timeout(min(30.0, s.timeout_s), read=max(300.0, s.timeout_s))
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=dict(s.headers), timeout=timeout)
        )
        transport = streamable_http_client(s.url, http_client=http)
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
        elif isinstance(leaf, PermissionError) and s.command:
            reason = f"cannot run {s.command}: permission denied"
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
        if self._stderr_thread is not None:
            # Let the pump read what a crashing server printed before it died.
            await asyncio.to_thread(self._stderr_thread.join, 0.5)
            try:
                tail = list(self.stderr_tail)[-5:]
            except RuntimeError:  # the pump appended meanwhile
                tail = []
            if tail:
                reason += " | stderr: " + " / ".join(tail)
        return self.conn.mask(reason)

    async def close(self) -> None:
        """Close the session (and stop the process), bounded; cancel the task if it hangs."""
        self.stop.set()
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


class _Connection:
    """A configured server: its current attempt, reconnection, and status."""

    def __init__(self, settings: McpServerSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.transport = "stdio" if settings.command else "http"
        self.attempt: _Attempt | None = None
        self.old_attempts: list[_Attempt] = []
        self.error: str | None = None
        self.tools: list[mcp_types.Tool] = []
        self.closed = False
        self._lock = asyncio.Lock()
        self._next_reconnect = 0.0
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
        return self.attempt is not None and self.attempt.connected

    async def connect(self) -> bool:
        if self.closed:
            return False
        reconnect = self.attempt is not None
        if self.attempt is not None:
            self.old_attempts.append(self.attempt)
            await self.attempt.close()
        attempt = self.attempt = _Attempt(self)
        grace = 0.25  # a failed attempt finishes unwinding (stopping its process) in the background
        await asyncio.wait({attempt.ready}, timeout=self.settings.timeout_s + grace)
        if not attempt.ready.done():
            attempt.error = f"timed out after {self.settings.timeout_s:g} s while connecting"
            attempt.stop.set()
            if attempt.scope is not None:
                attempt.scope.cancel()
        if attempt.connected:
            self.error = None
            self.tools = attempt.tools
            log.info(
                "MCP server %r connected (%s, %d tools)",
                self.name,
                self.transport,
                len(attempt.tools),
            )
            return True
        self.error = attempt.error or "not connected"
        self._next_reconnect = time.monotonic() + RECONNECT_BACKOFF_S
        what = "could not be reconnected" if reconnect else "could not be started (skipped)"
        log.warning("MCP server %r %s: %s", self.name, what, self.error)
        return False

    async def client(self) -> Client:
        """The connected client; reconnects once if the server died (with a backoff)."""
        attempt = self.attempt
        if attempt is not None and attempt.connected and attempt.client is not None:
            return attempt.client
        async with self._lock:
            attempt = self.attempt
            if attempt is not None and attempt.connected and attempt.client is not None:
                return attempt.client
            reason = (attempt.error if attempt else None) or self.error or "not started"
            if self.closed or attempt is None or time.monotonic() < self._next_reconnect:
                raise ToolError(f"MCP server '{self.name}' is not connected: {reason}")
            log.info("MCP server %r: reconnecting (%s)", self.name, reason)
            if await self.connect() and self.attempt is not None and self.attempt.client:
                return self.attempt.client
            raise ToolError(f"MCP server '{self.name}' is not connected: {self.error}")

    def mark_dead(self, attempt: _Attempt, reason: str) -> None:
        if attempt.dead:
            return
        reason = self.mask(reason)
        attempt.dead = True
        attempt.error = reason
        self.error = reason
        self._next_reconnect = 0.0  # the next call tries once to reconnect
        log.warning("MCP server %r disconnected: %s", self.name, reason)
        attempt.stop.set()  # let its task close what is left (and reap the process)

    def status(self) -> dict[str, Any]:
        connected = self.connected
        error = None if connected else (self.error or (self.attempt and self.attempt.error))
        return {
            "name": self.name,
            "transport": self.transport,
            "connected": connected,
            "error": self.mask(error) if error else error,
            "tools": len(self.tools) if connected else 0,
        }

    async def aclose(self) -> None:
        self.closed = True
        attempts = [*self.old_attempts, *([self.attempt] if self.attempt else [])]
        for a in attempts:
            a.stop.set()
        await asyncio.gather(*(a.close() for a in attempts), return_exceptions=True)


class McpTool(Tool):
    """One tool of an MCP server."""

    def __init__(self, conn: _Connection, tool: mcp_types.Tool, name: str) -> None:
        self.conn = conn
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
        )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        return await self.call(args)

    async def call(self, args: dict[str, Any], *, timeout_s: float | None = None) -> str:
        """Call the tool; `timeout_s` overrides the server's `timeout_s` for this call."""
        conn = self.conn
        timeout = conn.settings.timeout_s if timeout_s is None else timeout_s
        client = await conn.client()
        attempt = conn.attempt
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

    def __init__(self, servers: list[McpServerSettings]) -> None:
        self._conns = [_Connection(s) for s in servers]
        self._started = False
        self._tools: list[Tool] | None = None

    async def start(self) -> None:
        """Connect to every enabled server concurrently; failures are logged and skipped."""
        if self._started:
            return
        self._started = True
        todo: list[_Connection] = []
        for conn in self._conns:
            problem = conn.config_error()
            if problem is None:
                todo.append(conn)
            else:
                conn.error = problem
                if problem != "disabled":
                    log.warning("MCP server %r skipped: %s", conn.name, problem)
        await asyncio.gather(*(c.connect() for c in todo))
        self._tools = None

    def tools(self) -> list[Tool]:
        """One tool per MCP tool of each connected server, named `<server>__<tool>`."""
        if self._tools is not None:
            return list(self._tools)
        tools: list[Tool] = []
        seen: set[str] = set()
        for conn in self._conns:
            if not conn.connected:
                continue
            for t in conn.tools:
                name = mcp_tool_name(conn.name, t.name)
                if name in seen:
                    name = _hashed(name, f"{conn.name}__{t.name}")
                if name in seen:
                    log.warning("MCP server %r: duplicate tool %r ignored", conn.name, t.name)
                    continue
                seen.add(name)
                tools.append(McpTool(conn, t, name))
        if self._started:
            self._tools = tools
        return list(tools)

    def status(self) -> list[dict[str, Any]]:
        """Per server: name, transport ("stdio"/"http"), connected, error, tools (count)."""
        return [c.status() for c in self._conns]

    async def aclose(self) -> None:
        """Close every session and stop every stdio server process."""
        await asyncio.gather(*(c.aclose() for c in self._conns), return_exceptions=True)
