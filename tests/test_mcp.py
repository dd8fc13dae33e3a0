"""MCP client: the fixture server (tests/mcp_fixture_server.py) over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import mcp_types
import psutil
import pytest

from prismd.config import McpServerSettings, ToolsSettings
from prismd.tools.base import ToolContext, ToolError
from prismd.tools.mcp import McpManager, McpTool, mcp_tool_name, result_to_text

from .conftest import free_port

FIXTURE = str(Path(__file__).resolve().parent / "mcp_fixture_server.py")

pytestmark = pytest.mark.timeout(60)


def stdio_server(name: str = "fx", approve: list[str] | None = None) -> McpServerSettings:
    return McpServerSettings(
        name=name,
        command=sys.executable,
        args=[FIXTURE, "stdio"],
        timeout_s=20,
        approve=approve or [],
    )


def fixture_children() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if FIXTURE in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, count: int = 1) -> None:
    for _ in range(100):
        if sum(text in r.getMessage() for r in caplog.records) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} times: {caplog.text}")


def by_name(manager: McpManager) -> dict[str, McpTool]:
    tools = {}
    for t in manager.tools():
        assert isinstance(t, McpTool)
        tools[t.spec.name] = t
    return tools


def test_stdio_tools_calls_timeout_cancel_and_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prismd.tools.mcp.stderr")  # logged at DEBUG
    ctx = ToolContext("s1", "a1", tmp_path, tmp_path, ToolsSettings())

    async def main() -> None:
        manager = McpManager([stdio_server(approve=["add", "sl*"])])
        try:
            await manager.start()
            assert manager.status() == [
                {"name": "fx", "transport": "stdio", "connected": True, "error": None, "tools": 5}
            ]
            tools = by_name(manager)
            assert sorted(tools) == ["fx__add", "fx__echo", "fx__fail", "fx__image", "fx__slow"]
            add = tools["fx__add"]
            assert add.spec.source == "mcp:fx"
            assert add.spec.description.startswith("[fx] ")
            assert add.spec.parameters["type"] == "object"
            assert set(add.spec.parameters["properties"]) == {"a", "b"}
            assert add.spec.parameters["required"] == ["a", "b"]
            approvals = {n: t.spec.needs_approval for n, t in tools.items()}
            assert approvals == {
                "fx__add": True,
                "fx__echo": False,
                "fx__fail": False,
                "fx__image": False,
                "fx__slow": True,
            }

            assert await add.run({"a": 2, "b": 3}, ctx) == "5"
            assert await tools["fx__echo"].run({"text": "héllo\nworld"}, ctx) == "héllo\nworld"
            with pytest.raises(ToolError, match="went wrong"):
                await tools["fx__fail"].run({"message": "it went wrong"}, ctx)
            assert await tools["fx__image"].run({}, ctx) == "[image: image/png, 70 bytes]"

            # Calls from several tasks at once share the session.
            results = await asyncio.gather(*(add.call({"a": i, "b": 1}) for i in range(5)))
            assert results == ["1", "2", "3", "4", "5"]

            started = time.monotonic()
            with pytest.raises(ToolError, match="timed out after 0.5 s"):
                await tools["fx__slow"].call({"seconds": 10}, timeout_s=0.5)
            assert time.monotonic() - started < 5

            # A stopped turn cancels the call's task: the cancellation propagates, the request is
            # cancelled, and the session stays usable.
            task = asyncio.create_task(tools["fx__slow"].run({"seconds": 10}, ctx))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await add.run({"a": 20, "b": 22}, ctx) == "42"
            await wait_for_log(caplog, "[fx] slow: cancelled", count=2)  # the timeout, the cancel
            assert manager.status()[0]["connected"] is True

            assert len(fixture_children()) == 1
        finally:
            await manager.aclose()
        assert fixture_children() == []
        assert manager.status()[0]["connected"] is False
        with pytest.raises(ToolError, match="not connected"):
            await by_name(manager)["fx__add"].call({"a": 1, "b": 1})

    asyncio.run(main())


def test_stdio_server_that_dies_is_reported_then_reconnected() -> None:
    async def main() -> None:
        manager = McpManager([stdio_server()])
        try:
            await manager.start()
            add = by_name(manager)["fx__add"]
            assert await add.call({"a": 1, "b": 1}) == "2"
            (child,) = fixture_children()
            child.kill()
            child.wait(5)
            with pytest.raises(ToolError, match="MCP server 'fx' is not connected"):
                await add.call({"a": 1, "b": 1})
            assert manager.status()[0]["connected"] is False
            # The next call reconnects once.
            assert await add.call({"a": 2, "b": 2}) == "4"
            assert manager.status()[0]["connected"] is True
        finally:
            await manager.aclose()
        assert fixture_children() == []

    asyncio.run(main())


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"fixture server exited: {log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"fixture server did not listen on {port}: {log.read_text()}")


def test_streamable_http(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "http.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, FIXTURE, "http", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc, log)

        async def main() -> None:
            url = f"http://127.0.0.1:{port}/mcp"
            settings = McpServerSettings(
                name="web", url=url, headers={"X-Test": "1"}, approve=["*"], timeout_s=10
            )
            manager = McpManager([settings])
            try:
                await manager.start()
                (status,) = manager.status()
                assert status["transport"] == "http" and status["connected"] is True
                assert status["error"] is None and status["tools"] == 5
                tools = by_name(manager)
                assert "web__echo" in tools
                assert all(t.spec.needs_approval for t in tools.values())
                assert await tools["web__echo"].call({"text": "over http"}) == "over http"
                assert await tools["web__add"].call({"a": 2, "b": 3}) == "5"
                task = asyncio.create_task(tools["web__slow"].call({"seconds": 10}))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await tools["web__add"].call({"a": 1, "b": 1}) == "2"
            finally:
                await manager.aclose()

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(10)


def test_unreachable_servers_are_skipped_and_the_others_work() -> None:
    dead_port = free_port()

    async def main() -> None:
        manager = McpManager(
            [
                McpServerSettings(name="nocmd", command="/nonexistent/prismd-mcp-server"),
                McpServerSettings(name="nohttp", url=f"http://127.0.0.1:{dead_port}/mcp"),
                McpServerSettings(
                    name="crash",
                    command=sys.executable,
                    args=["-c", "import sys; print('bad config file', file=sys.stderr); exit(3)"],
                ),
                McpServerSettings(name="off", command="/bin/true", enabled=False),
                stdio_server(),
            ]
        )
        try:
            started = time.monotonic()
            await manager.start()
            assert time.monotonic() - started < 15
            status = {s["name"]: s for s in manager.status()}
            assert status["fx"]["connected"] is True
            for name in ("nocmd", "nohttp", "crash", "off"):
                assert status[name]["connected"] is False
                assert status[name]["tools"] == 0
            assert status["nocmd"]["transport"] == "stdio"
            assert "command not found: /nonexistent/prismd-mcp-server" in status["nocmd"]["error"]
            assert status["nohttp"]["transport"] == "http"
            dead_url = f"http://127.0.0.1:{dead_port}/mcp"
            assert f"cannot connect to {dead_url}" in status["nohttp"]["error"]
            assert "bad config file" in status["crash"]["error"]
            assert status["off"]["error"] == "disabled"
            tools = by_name(manager)
            assert {n.split("__")[0] for n in tools} == {"fx"}
            assert await tools["fx__add"].call({"a": 2, "b": 3}) == "5"
        finally:
            await manager.aclose()
        assert fixture_children() == []

    asyncio.run(main())


def test_tool_names_are_sanitised_and_bounded() -> None:
    assert mcp_tool_name("gh", "create_issue") == "gh__create_issue"
    assert mcp_tool_name("gh", "repo.list/all") == "gh__repo_list_all"
    long_a = mcp_tool_name("server", "x" * 80 + "a")
    long_b = mcp_tool_name("server", "x" * 80 + "b")
    assert len(long_a) == 64 and len(long_b) == 64 and long_a != long_b
    assert long_a.startswith("server__xxx")


def test_result_text_summarises_non_text_content() -> None:
    result = mcp_types.CallToolResult(
        content=[
            mcp_types.TextContent(text="hello"),
            mcp_types.ImageContent(data="AAAA", mime_type="image/jpeg"),
            mcp_types.ResourceLink(uri="file:///tmp/a.txt", name="a"),
            mcp_types.EmbeddedResource(
                resource=mcp_types.TextResourceContents(uri="mem://note", text="note text")
            ),
            mcp_types.EmbeddedResource(
                resource=mcp_types.BlobResourceContents(
                    uri="mem://bin", blob="AAAAAA==", mime_type="application/zip"
                )
            ),
        ]
    )
    assert result_to_text(result).split("\n") == [
        "hello",
        "[image: image/jpeg, 3 bytes]",
        "[resource: file:///tmp/a.txt]",
        "[resource: mem://note]",
        "note text",
        "[resource: mem://bin, application/zip, 4 bytes]",
    ]
    structured = mcp_types.CallToolResult(content=[], structured_content={"n": 1, "ok": True})
    assert result_to_text(structured) == '{"n": 1, "ok": true}'
