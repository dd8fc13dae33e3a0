"""MCP client: the fixture server (tests/mcp_fixture_server.py) over stdio and streamable HTTP;
tool lists that change (list_changed, a server that dies and is restarted), the tool registry
that follows them, and `GET /api/tools` over a real prismd."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mcp_types
import psutil
import pytest

from prismd.auth.service import Principal
from prismd.config import AgentSettings, McpServerSettings, Settings, ToolsSettings
from prismd.testing.fake_models import Reply
from prismd.tools import mcp as mcp_module
from prismd.tools.base import Tool, ToolContext, ToolError, ToolSpec
from prismd.tools.mcp import McpManager, McpTool, mcp_tool_name, result_to_text
from prismd.tools.registry import ToolRegistry

from .conftest import free_port, of_type, openai_env
from .test_compat_rest import Api
from .waiting import until, wait_for

FIXTURE = str(Path(__file__).resolve().parent / "mcp_fixture_server.py")

pytestmark = pytest.mark.timeout(60)
CTX = ToolContext("s1", "assistant", Path("/nonexistent"), Path("/nonexistent"), ToolsSettings())


FIXTURE_TOOLS = ["add", "echo", "fail", "grow", "image", "shrink", "slow"]


def stdio_server(
    name: str = "fx", approve: list[str] | None = None, extra: list[str] | None = None, **more
) -> McpServerSettings:
    return McpServerSettings(
        name=name,
        command=sys.executable,
        args=[FIXTURE, "stdio", *(extra or [])],
        timeout_s=20,
        approve=approve or [],
        **more,
    )


@pytest.fixture
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests restart servers after 50 ms, 100 ms, at most 200 ms."""
    monkeypatch.setattr(mcp_module, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(mcp_module, "RESTART_DELAY_MAX_S", 0.2)


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
    await until(
        lambda: sum(text in r.getMessage() for r in caplog.records) >= count,
        f"{text!r} logged {count} times",
        detail=lambda: caplog.text,
    )


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
                {
                    "name": "fx",
                    "transport": "stdio",
                    "state": "ready",
                    "connected": True,
                    "tools": len(FIXTURE_TOOLS),
                    "error": None,
                    "errorAt": None,
                    "nextAttemptAt": None,
                    "failures": 0,
                    "protocol": "2026-07-28",
                }
            ]
            tools = by_name(manager)
            assert sorted(tools) == [f"fx__{t}" for t in FIXTURE_TOOLS]
            add = tools["fx__add"]
            assert add.spec.source == "mcp:fx"
            assert add.spec.description.startswith("[fx] ")
            assert add.spec.parameters["type"] == "object"
            assert set(add.spec.parameters["properties"]) == {"a", "b"}
            assert add.spec.parameters["required"] == ["a", "b"]
            approvals = {n: t.spec.needs_approval for n, t in tools.items()}
            assert approvals == {f"fx__{t}": t in ("add", "slow") for t in FIXTURE_TOOLS}

            assert await add.run({"a": 2, "b": 3}, ctx) == "5"
            assert await tools["fx__echo"].run({"text": "héllo\nworld"}, ctx) == "héllo\nworld"
            with pytest.raises(ToolError, match="went wrong"):
                await tools["fx__fail"].run({"message": "it went wrong"}, ctx)
            assert await tools["fx__image"].run({}, ctx) == "[image: image/png, 70 bytes]"

            # Calls from several tasks at once share the session.
            results = await asyncio.gather(*(add.call({"a": i, "b": 1}) for i in range(5)))
            assert results == ["1", "2", "3", "4", "5"]

            # The call would not return by itself (pytest's timeout): the timeout ends it.
            with pytest.raises(ToolError, match="timed out after 0.5 s"):
                await tools["fx__slow"].call({"seconds": 1000}, timeout_s=0.5)

            # A stopped turn cancels the call's task: the cancellation propagates, the request is
            # cancelled, and the session stays usable.
            task = asyncio.create_task(tools["fx__slow"].run({"seconds": 1000}, ctx))
            await wait_for_log(caplog, "[fx] slow: started", count=2)  # the timed out, this one
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
        assert manager.status()[0]["state"] == "stopped"
        assert manager.status()[0]["connected"] is False
        assert manager.tools() == []
        with pytest.raises(ToolError, match="MCP server 'fx' is not connected: stopped"):
            await add.call({"a": 1, "b": 1})

    asyncio.run(main())


def test_a_server_that_dies_loses_its_tools_and_is_restarted(
    tmp_path: Path, quick_restarts: None
) -> None:
    """Killed: its tools vanish at once (the registry's `on_change`), a held tool answers why,
    it is restarted with a growing delay while it cannot start, and its tools come back (the
    same objects: a view that holds them works again)."""
    hold = tmp_path / "hold"
    published: list[list[str]] = []

    async def main() -> None:
        manager = McpManager(
            [stdio_server(extra=["--hold-file", str(hold)])],
            on_change=lambda tools: published.append([t.spec.name for t in tools]),
        )
        try:
            await manager.start()
            assert [sorted(p) for p in published] == [[f"fx__{t}" for t in FIXTURE_TOOLS]]
            add = by_name(manager)["fx__add"]
            assert await add.call({"a": 1, "b": 1}) == "2"
            hold.touch()  # the restarts fail until the test removes it
            (child,) = fixture_children()
            child.kill()
            await until(lambda: manager.tools() == [], "its tools to vanish")
            assert published[-1] == []
            await until(lambda: manager.status()[0]["failures"] >= 2, "two failed restarts")
            status = manager.status()[0]
            assert status["state"] in ("restarting", "starting")
            assert status["connected"] is False and status["tools"] == 0
            assert "held: " in status["error"] and status["errorAt"].endswith("Z")
            await until(lambda: manager.status()[0]["state"] == "restarting", "a planned restart")
            assert manager.status()[0]["nextAttemptAt"].endswith("Z")
            with pytest.raises(ToolError, match=r"MCP server 'fx' is not connected: .*held: "):
                await add.call({"a": 1, "b": 1})
            hold.unlink()
            await until(lambda: manager.status()[0]["state"] == "ready", "the restart")
            assert by_name(manager)["fx__add"] is add  # the same object comes back
            assert await add.call({"a": 2, "b": 2}) == "4"
            status = manager.status()[0]
            assert status["tools"] == len(FIXTURE_TOOLS) and status["nextAttemptAt"] is None
            assert "held: " in status["error"]  # the last error stays, with its time
            assert sorted(published[-1]) == [f"fx__{t}" for t in FIXTURE_TOOLS]
            assert len(fixture_children()) == 1
        finally:
            await manager.aclose()
        assert fixture_children() == []

    asyncio.run(main())


@pytest.mark.parametrize("legacy", [False, True], ids=["2026-07-28", "2025-11-25"])
def test_list_changed_lists_the_tools_again(legacy: bool) -> None:
    """A server that announces tools/list_changed is listed again: at 2026-07-28 through the
    `subscriptions/listen` stream prismd opened, before it on the connection. A removed tool
    held by a turn answers that it is gone."""
    published: list[list[str]] = []

    async def main() -> None:
        manager = McpManager(
            [stdio_server(extra=["--legacy"] if legacy else [])],
            on_change=lambda tools: published.append([t.spec.name for t in tools]),
        )
        try:
            await manager.start()
            status = manager.status()[0]
            assert status["protocol"] == ("2025-11-25" if legacy else "2026-07-28")
            tools = by_name(manager)
            assert await tools["fx__grow"].call({"name": "late"}) == "added late"
            await until(lambda: "fx__late" in by_name(manager), "the new tool")
            assert "fx__late" in published[-1]
            late = by_name(manager)["fx__late"]
            assert late.spec.description == "[fx] A tool added at run time (late)."
            assert await late.call({}) == "late is here"
            assert manager.status()[0]["tools"] == len(FIXTURE_TOOLS) + 1
            assert await tools["fx__shrink"].call({"name": "late"}) == "removed late"
            await until(lambda: "fx__late" not in by_name(manager), "the tool to go")
            with pytest.raises(ToolError, match="no longer offers the tool 'late'"):
                await late.call({})
            assert tools["fx__add"] is by_name(manager)["fx__add"]  # unchanged: kept
        finally:
            await manager.aclose()

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
                assert status["state"] == "ready" and status["protocol"] == "2026-07-28"
                assert status["error"] is None and status["tools"] == len(FIXTURE_TOOLS)
                tools = by_name(manager)
                assert "web__echo" in tools
                assert all(t.spec.needs_approval for t in tools.values())
                assert await tools["web__echo"].call({"text": "over http"}) == "over http"
                assert await tools["web__add"].call({"a": 2, "b": 3}) == "5"
                task = asyncio.create_task(tools["web__slow"].call({"seconds": 1000}))
                await until(lambda: "slow: started" in log.read_text(), "the call to start")
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
                McpServerSettings(
                    name="nohttp", url=f"http://127.0.0.1:{dead_port}/mcp", timeout_s=3600
                ),
                McpServerSettings(
                    name="crash",
                    command=sys.executable,
                    args=["-c", "import sys; print('bad config file', file=sys.stderr); exit(3)"],
                    timeout_s=3600,
                ),
                McpServerSettings(name="off", command="/bin/true", enabled=False),
                stdio_server(),
            ]
        )
        try:
            # Their failures end the start at once: it waits for none of their (hour-long)
            # timeouts, or it would not end (pytest's timeout).
            await manager.start()
            status = {s["name"]: s for s in manager.status()}
            assert status["fx"]["connected"] is True and status["fx"]["state"] == "ready"
            for name in ("nocmd", "nohttp", "crash", "off"):
                assert status[name]["connected"] is False
                assert status[name]["tools"] == 0
            assert status["nocmd"]["transport"] == "stdio"
            assert "command not found: /nonexistent/prismd-mcp-server" in status["nocmd"]["error"]
            # A missing command is not retried; the others are, later.
            assert status["nocmd"]["state"] == "failed"
            assert status["nocmd"]["nextAttemptAt"] is None
            assert status["nohttp"]["transport"] == "http"
            dead_url = f"http://127.0.0.1:{dead_port}/mcp"
            assert f"cannot connect to {dead_url}" in status["nohttp"]["error"]
            assert "bad config file" in status["crash"]["error"]
            for name in ("nohttp", "crash"):
                assert status[name]["failures"] >= 1
                assert status[name]["state"] in ("restarting", "starting")
            assert status["off"]["state"] == "disabled" and status["off"]["error"] is None
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


def test_a_change_before_the_listen_stream_is_open_is_not_lost(tmp_path: Path) -> None:
    """At 2026-07-28 a change is sent only on a listen stream: one made while prismd's stream
    is still being opened (here acknowledged only once the test opens a gate, after the
    change) is found by listing again once it is."""
    gate = tmp_path / "listen-gate"

    async def main() -> None:
        manager = McpManager([stdio_server(extra=["--listen-gate", str(gate)])])
        try:
            await manager.start()
            assert await by_name(manager)["fx__grow"].call({"name": "early"}) == "added early"
            assert "fx__early" not in by_name(manager)  # no stream has told prismd yet
            gate.touch()
            await until(lambda: "fx__early" in by_name(manager), "the tool added early")
        finally:
            await manager.aclose()

    asyncio.run(main())


class Named(Tool):
    def __init__(self, name: str, host_level: bool = False) -> None:
        self.spec = ToolSpec(name, f"the {name} tool", {"type": "object"}, host_level=host_level)

    async def run(self, args: dict, ctx: ToolContext) -> str:
        return self.spec.name


ADMIN = Principal("u1", "alice", True, "cookie")
USER = Principal("u2", "bob", False, "cookie")
GRANTED = Principal("u3", "carol", False, "cookie")


def test_registry_follows_changes_and_keeps_its_access_policy() -> None:
    """A changed group bumps the version and drops the cached views; a view already handed
    out is a snapshot; tools that appear later get the same policy (host-level: admins, or
    granted); a name already taken keeps its tool."""
    settings = Settings.model_validate({"tools": {"grants": {"carol": ["mcp__shared_*"]}}})
    agent = AgentSettings(id="assistant", name="Assistant")
    builtin = Named("current_time")
    registry = ToolRegistry(settings, [builtin])
    v0 = registry.version
    before = registry.view(agent, USER)
    assert registry.view(agent, USER) is before  # cached
    host, shared, safe = (
        Named("mcp__host_x", True),
        Named("mcp__shared_y", True),
        Named("mcp__safe_z"),
    )
    assert registry.set_group("mcp", [host, shared, safe]) is True
    assert registry.version > v0
    assert set(before.tools) == {"current_time"}  # the old view is unchanged
    views = {who.name: registry.view(agent, who) for who in (ADMIN, USER, GRANTED)}
    assert set(views["alice"].tools) == {
        "current_time",
        "mcp__host_x",
        "mcp__shared_y",
        "mcp__safe_z",
    }
    assert set(views["bob"].tools) == {"current_time", "mcp__safe_z"}
    assert set(views["carol"].tools) == {"current_time", "mcp__shared_y", "mcp__safe_z"}
    assert all(v.version == registry.version for v in views.values())
    assert registry.access(agent, USER, "mcp__host_x").allowed is False
    assert "granted to carol" in registry.access(agent, GRANTED, "mcp__shared_y").why
    # The same objects again: nothing changes, the cached views stay.
    version = registry.version
    assert registry.set_group("mcp", [host, shared, safe]) is False
    assert registry.version == version and registry.view(agent, USER) is views["bob"]
    # A tool goes, another comes; a name clash keeps the built-in.
    impostor = Named("current_time")
    registry.set_group("mcp", [safe, Named("mcp__host_w", True), impostor])
    assert registry.view(agent, USER) is not views["bob"]
    assert set(registry.view(agent, USER).tools) == {"current_time", "mcp__safe_z"}
    assert set(registry.view(agent, ADMIN).tools) == {"current_time", "mcp__safe_z", "mcp__host_w"}
    assert registry.view(agent, ADMIN).tools["current_time"] is builtin
    assert registry.access(agent, ADMIN, "mcp__host_x").why == "no such tool"
    assert "mcp__host_x" in views["alice"].tools  # still in the view a turn holds


def test_a_turn_holding_a_view_gets_clear_errors_for_tools_that_went(
    tmp_path: Path, quick_restarts: None
) -> None:
    """The registry follows the MCP manager; a view taken before a change keeps its tools:
    one the server removed answers that it is gone, one of a dead server that it is not
    connected; the next view has neither, and the tools of a restarted server again."""

    hold = tmp_path / "hold"

    async def main() -> None:
        settings = Settings.model_validate({})
        registry = ToolRegistry(settings, [Named("current_time")])
        agent = AgentSettings(id="assistant", name="Assistant")
        manager = McpManager(
            [stdio_server(allow_users=True, extra=["--hold-file", str(hold)])],
            lambda tools: registry.set_group("mcp", tools),
        )
        try:
            await manager.start()
            grow = registry.view(agent, USER).tools["fx__grow"]
            assert await grow.run({"name": "late"}, CTX) == "added late"
            await until(lambda: "fx__late" in registry.view(agent, USER).tools, "the new tool")
            held = registry.view(agent, USER)  # a turn's view
            assert held.validate("fx__late", {}) == {}
            await held.tools["fx__shrink"].run({"name": "late"}, CTX)
            await until(lambda: "fx__late" not in registry.view(agent, USER).tools, "its removal")
            with pytest.raises(ToolError, match="no longer offers the tool 'late'"):
                await held.tools["fx__late"].run({}, CTX)
            hold.touch()  # it cannot be restarted until the file is gone
            (child,) = fixture_children()
            child.kill()
            await until(lambda: "fx__add" not in registry.view(agent, USER).tools, "the death")
            assert set(registry.view(agent, USER).tools) == {"current_time"}
            with pytest.raises(ToolError, match="MCP server 'fx' is not connected"):
                await held.tools["fx__add"].run({"a": 1, "b": 2}, CTX)
            hold.unlink()
            await until(lambda: "fx__add" in registry.view(agent, USER).tools, "the restart")
            assert await held.tools["fx__add"].run({"a": 1, "b": 2}, CTX) == "3"
        finally:
            await manager.aclose()

    asyncio.run(main())


# ------------------------------------------------------------------ over a real prismd


def _call(name: str, args: dict, call_id: str = "call_1") -> dict:
    return {"id": call_id, "name": name, "arguments": json.dumps(args)}


def _offered(request: dict) -> set[str]:
    return {t["function"]["name"] for t in request.get("tools", [])}


def test_the_models_tools_follow_the_servers(tmp_path: Path, make_server, fake_openai) -> None:
    """Over a real prismd and the fake model: a tool a server adds (and announces) is offered
    in the next turn and runs; a server killed mid-session loses its tools (the next turn's
    model does not see them) while `GET /api/tools` says it is restarting, when, and why; once
    it can start again its tools come back. A server whose command is missing is `failed`."""
    hold = tmp_path / "hold"
    config = f"""
[[mcp_servers]]
name = "fx"
command = {json.dumps(sys.executable)}
args = [{json.dumps(FIXTURE)}, "stdio", "--hold-file", {json.dumps(str(hold))}]
timeout_s = 20

[[mcp_servers]]
name = "gone"
command = "/nonexistent/prismd-mcp-server"
"""
    srv = make_server(openai_env(fake_openai), config)
    http = httpx.Client(base_url=srv.url, timeout=15)
    api = Api(srv)  # every /api/tools body checked against the OpenAPI schema

    def tools_now() -> tuple[set[str], dict[str, dict]]:
        body = api.get("/api/tools").json()
        return {t["name"] for t in body["tools"]}, {s["name"]: s for s in body["mcpServers"]}

    def wait_until(condition, what: str) -> tuple[set[str], dict[str, dict]]:
        seen: list[object] = [None]

        def now() -> tuple[set[str], dict[str, dict]] | None:
            names, servers = seen[0] = tools_now()
            return (names, servers) if condition(names, servers) else None

        return wait_for(now, what, detail=lambda: seen[0])

    def turn(*replies: Reply) -> list[dict]:
        before = len(fake_openai.requests)
        for reply in replies:
            reply.times = 1
            fake_openai.script(reply)
        with srv.client() as c:
            frames = c.turn(message="go", sessionId=sid)
        assert of_type(frames, "done"), frames
        return fake_openai.requests[before:]

    try:
        names, servers = tools_now()
        assert {f"fx__{t}" for t in FIXTURE_TOOLS} <= names
        assert servers["fx"]["state"] == "ready" and servers["fx"]["tools"] == 7
        gone = servers["gone"]
        assert gone["state"] == "failed" and gone["nextAttemptAt"] is None
        assert "command not found: /nonexistent/prismd-mcp-server" in gone["error"]
        sid = "sess_mcp_follow"

        turn(Reply(tool_calls=[_call("fx__grow", {"name": "late"})]), Reply(text=["grown"]))
        wait_until(lambda names, _: "fx__late" in names, "the new tool in /api/tools")
        requests = turn(Reply(tool_calls=[_call("fx__late", {})]), Reply(text=["used"]))
        assert "fx__late" in _offered(requests[0])  # the next turn's model sees it
        tool = [m for m in http.get(f"/api/sessions/{sid}/messages").json() if m["role"] == "tool"]
        assert tool[-1]["content"] == "late is here"

        hold.touch()  # it cannot start again until the test removes the file
        (child,) = fixture_children()
        child.kill()
        names, servers = wait_until(
            lambda names, servers: (
                servers["fx"]["failures"] >= 2 and servers["fx"]["state"] == "restarting"
            ),
            "a failed restart",
        )
        assert not any(n.startswith("fx__") for n in names)
        fx = servers["fx"]
        assert fx["connected"] is False and fx["tools"] == 0
        assert fx["nextAttemptAt"].endswith("Z") and fx["errorAt"].endswith("Z")
        assert "held: " in fx["error"] and str(tmp_path) in fx["error"]
        requests = turn(Reply(text=["no tools of fx"]))
        offered = _offered(requests[0])
        assert "current_time" in offered and not any(n.startswith("fx__") for n in offered)

        hold.unlink()
        names, servers = wait_until(lambda _, servers: servers["fx"]["state"] == "ready", "ready")
        assert {f"fx__{t}" for t in FIXTURE_TOOLS} <= names and "fx__late" not in names
        assert servers["fx"]["nextAttemptAt"] is None and servers["fx"]["tools"] == 7
        requests = turn(Reply(tool_calls=[_call("fx__add", {"a": 2, "b": 3})]), Reply(text=["5"]))
        assert "fx__add" in _offered(requests[0])
        tool = [m for m in http.get(f"/api/sessions/{sid}/messages").json() if m["role"] == "tool"]
        assert tool[-1]["content"] == "5"
    finally:
        http.close()
        api.http.close()
