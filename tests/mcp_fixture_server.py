"""A small MCP server for the MCP client tests, written with the official SDK (mcp 2.x).

python tests/mcp_fixture_server.py stdio [--legacy] [--hold-file F] [--listen-gate F]
python tests/mcp_fixture_server.py http --port P     # streamable HTTP on 127.0.0.1:P/mcp

`grow` adds a tool and `shrink` removes one, each announcing `notifications/tools/list_changed`
(on a `subscriptions/listen` stream at the 2026-07-28 protocol, on the connection before it).
`--legacy` serves only the protocol before 2026-07-28 (the `initialize` handshake, which most
servers speak): the client's `server/discover` probe is refused and it falls back.
`--hold-file F`: while F exists, the server exits at start with an error (a server that cannot
be restarted until the test says so). `--listen-gate F`: a `subscriptions/listen` request is
acknowledged only once F exists (changes meanwhile reach no stream: a client must list again
once its stream is open). `slow` says on stderr when it starts and when it is cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.runner import _serve_legacy_stream
from mcp.server.stdio import stdio_server

# A 1x1 transparent PNG.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

server = MCPServer("prismd-fixture", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def fail(message: str) -> str:
    """Always fail with the given message."""
    raise ToolError(message)


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep for the given number of seconds, then answer."""
    print("slow: started", file=sys.stderr, flush=True)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        # The client's notifications/cancelled reached us; the tests read this on stderr.
        print("slow: cancelled", file=sys.stderr, flush=True)
        raise
    return f"slept {seconds}"


@server.tool()
def image() -> Image:
    """Return a tiny PNG image."""
    return Image(data=TINY_PNG, format="png")


async def _tools_changed(ctx: Context) -> None:
    await ctx.notify_tools_changed()  # listen streams (2026-07-28)
    await ctx.session.send_tool_list_changed()  # the connection (before 2026-07-28)


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    """Add a tool `name` that answers "<name> is here", and announce the change."""

    def added() -> str:
        return f"{name} is here"

    server.add_tool(added, name=name, description=f"A tool added at run time ({name}).")
    await _tools_changed(ctx)
    return f"added {name}"


@server.tool()
async def shrink(name: str, ctx: Context) -> str:
    """Remove the tool `name`, and announce the change."""
    server.remove_tool(name)
    await _tools_changed(ctx)
    return f"removed {name}"


async def _run_legacy_stdio() -> None:
    """The SDK serves the era the client opens with; this serves only the handshake era (the
    client's `server/discover` probe is refused, and it falls back to `initialize`)."""
    low = server._lowlevel_server
    options = low.create_initialization_options(NotificationOptions(tools_changed=True))
    async with stdio_server() as (read_stream, write_stream), low.lifespan(low) as state:
        try:
            await _serve_legacy_stream(
                low,
                read_stream,
                write_stream,
                lifespan_state=state,
                session_id=None,
                init_options=options,
                raise_exceptions=False,
            )
        finally:
            await write_stream.aclose()


def _gate_listen(gate: Path) -> None:
    low = server._lowlevel_server
    entry = low.get_request_handler("subscriptions/listen")
    assert entry is not None

    async def handler(ctx: Any, params: Any) -> Any:
        for _ in range(3000):  # at most a minute: a test that never opens it has failed
            if await anyio.Path(gate).exists():
                break
            await asyncio.sleep(0.02)
        return await entry.handler(ctx, params)

    low.add_request_handler("subscriptions/listen", entry.params_type, handler)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="transport", required=True)
    stdio = sub.add_parser("stdio")
    stdio.add_argument("--legacy", action="store_true")
    stdio.add_argument("--hold-file")
    stdio.add_argument("--listen-gate")
    http = sub.add_parser("http")
    http.add_argument("--port", type=int, required=True)
    opts = parser.parse_args()
    if opts.transport == "stdio":
        if opts.hold_file and Path(opts.hold_file).exists():
            print(f"held: {opts.hold_file} exists", file=sys.stderr, flush=True)
            sys.exit(3)
        if opts.listen_gate:
            _gate_listen(Path(opts.listen_gate))
        if opts.legacy:
            anyio.run(_run_legacy_stdio)
        else:
            server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=opts.port)


if __name__ == "__main__":
    main()
