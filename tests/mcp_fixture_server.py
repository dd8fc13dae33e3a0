"""A small MCP server for the MCP client tests, written with the official SDK (mcp 2.x).

python tests/mcp_fixture_server.py stdio
python tests/mcp_fixture_server.py http --port P     # streamable HTTP on 127.0.0.1:P/mcp
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

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


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="transport", required=True)
    sub.add_parser("stdio")
    http = sub.add_parser("http")
    http.add_argument("--port", type=int, required=True)
    opts = parser.parse_args()
    if opts.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=opts.port)


if __name__ == "__main__":
    main()
