"""The built-in tools, called directly with a ToolContext on a temporary workspace."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from prismd.config import ToolsSettings
from prismd.store.base import Store, query_words
from prismd.store.postgres import note_query
from prismd.store.sqlite import SqliteStore, fts_query
from prismd.tools.base import Tool, ToolContext, ToolError
from prismd.tools.builtins import (
    builtin_tools,
    check_address,
    files,
    isolation,
    sandbox,
)
from prismd.tools.builtins.web_fetch import WebFetch

from .test_store import HOSTILE_QUERIES, new_store  # noqa: F401 - a fixture: both stores
from .waiting import until, wait_for

TOOLS = {t.spec.name: t for t in builtin_tools()}

# The server runs under uvloop when it is installed (uvicorn's default): the process handling
# (timeouts, cancellation, kills) is tested under both loops.
try:
    import uvloop

    RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
except ImportError:  # pragma: no cover
    RUNNERS = {"asyncio": asyncio.run}


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return ToolContext(
        session_id="s1",
        agent_id="agent-a",
        workspace=workspace.resolve(),
        data_dir=tmp_path / "data",
        settings=ToolsSettings(),
        extra={},
    )


def force_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the sandboxed tools as on a machine without bubblewrap."""
    probed = {**sandbox.probe(), "bwrap": None, "bwrap_error": "not installed (test)"}
    monkeypatch.setattr(sandbox, "_probed", probed)


def run(name: str, ctx: ToolContext, **args: Any) -> str:
    return asyncio.run(TOOLS[name].run(args, ctx))


def refused(name: str, ctx: ToolContext, **args: Any) -> str:
    with pytest.raises(ToolError) as info:
        run(name, ctx, **args)
    return str(info.value)


def test_registry_and_specs() -> None:
    names = [t.spec.name for t in builtin_tools()]
    assert names == [
        "file_read",
        "file_write",
        "file_edit",
        "file_list",
        "file_search",
        "shell",
        "code_exec",
        "web_fetch",
        "memory_note",
        "memory_search",
        "current_time",
    ]
    for tool in builtin_tools():
        assert isinstance(tool, Tool)
        params = tool.spec.parameters
        assert params["type"] == "object"
        assert params["additionalProperties"] is False
        assert set(params["required"]) <= set(params["properties"])
        assert len(tool.spec.description) > 40
    assert TOOLS["shell"].spec.needs_approval is True
    assert TOOLS["file_read"].spec.needs_approval is False


# --- files ------------------------------------------------------------------------------------


def test_file_write_read_edit_list(ctx: ToolContext) -> None:
    assert "created a/b/c.txt" in run("file_write", ctx, path="a/b/c.txt", content="one\ntwo\n")
    assert (ctx.workspace / "a/b/c.txt").read_text() == "one\ntwo\n"
    assert "overwrote" in run("file_write", ctx, path="a/b/c.txt", content="x\ny\nz\nx\n")
    assert not [p for p in (ctx.workspace / "a/b").iterdir() if p.name.endswith(".tmp")]

    out = run("file_read", ctx, path="a/b/c.txt")
    assert out.splitlines()[0] == "a/b/c.txt (lines 1-4 of 4)"
    assert "     2\ty" in out
    out = run("file_read", ctx, path="a/b/c.txt", offset=2, limit=2)
    assert "lines 2-3 of 4" in out and "\tz" in out and "\tx" not in out
    assert "continue with offset=4" in out
    assert "past the end" in refused("file_read", ctx, path="a/b/c.txt", offset=10)
    assert "no such file" in refused("file_read", ctx, path="nope.txt")
    assert "directory" in refused("file_read", ctx, path="a")

    assert "2 times" in refused("file_edit", ctx, path="a/b/c.txt", old_string="x", new_string="q")
    assert "not found" in refused("file_edit", ctx, path="a/b/c.txt", old_string="w", new_string="")
    assert "empty" in refused("file_edit", ctx, path="a/b/c.txt", old_string="", new_string="q")
    assert "1 occurrence" in run(
        "file_edit", ctx, path="a/b/c.txt", old_string="x\ny", new_string="X\nY"
    )
    assert (ctx.workspace / "a/b/c.txt").read_text() == "X\nY\nz\nx\n"
    assert "replaced 1 occurrence" in run(
        "file_edit", ctx, path="a/b/c.txt", old_string="x", new_string="w"
    )
    assert "replaced 4 occurrence" in run(
        "file_edit", ctx, path="a/b/c.txt", old_string="\n", new_string=";\n", replace_all=True
    )
    assert (ctx.workspace / "a/b/c.txt").read_text() == "X;\nY;\nz;\nw;\n"

    (ctx.workspace / "crlf.txt").write_bytes(b"a\r\nb\r\nc\r\n")
    run("file_edit", ctx, path="crlf.txt", old_string="a\nb", new_string="A\nB")
    assert (ctx.workspace / "crlf.txt").read_bytes() == b"A\r\nB\r\nc\r\n"

    (ctx.workspace / "node_modules/pkg").mkdir(parents=True)
    (ctx.workspace / "node_modules/pkg/index.js").write_text("x")
    os.symlink("a/b/c.txt", ctx.workspace / "link.txt")
    listing = run("file_list", ctx).splitlines()
    assert listing == ["a/", "crlf.txt", "link.txt@", "node_modules/"]
    deep = run("file_list", ctx, recursive=True).splitlines()
    assert "a/b/" in deep and "a/b/c.txt" in deep
    assert "node_modules/ (not listed)" in deep and "node_modules/pkg/" not in deep
    assert run("file_list", ctx, path="a/b") == "a/b/c.txt"
    assert "is a file" in refused("file_list", ctx, path="crlf.txt")


def test_file_read_refuses_binary_and_caps_output(ctx: ToolContext) -> None:
    (ctx.workspace / "img.bin").write_bytes(b"\x89PNG\r\n\x00\x00binary")
    assert "binary file" in refused("file_read", ctx, path="img.bin")
    assert "binary" in refused("file_edit", ctx, path="img.bin", old_string="PNG", new_string="x")
    (ctx.workspace / "big.txt").write_text(
        "".join(f"line {i} " + "x" * 100 + "\n" for i in range(5000))
    )
    out = run("file_read", ctx, path="big.txt")
    assert len(out) <= ctx.settings.max_output_chars
    assert "[output limit reached: continue with offset=" in out
    (ctx.workspace / "long.txt").write_text("y" * 10_000)
    assert "[line cut at 2000]" in run("file_read", ctx, path="long.txt")


def test_file_write_limits_and_directories(ctx: ToolContext) -> None:
    (ctx.workspace / "d").mkdir()
    assert "directory" in refused("file_write", ctx, path="d", content="x")
    assert "directory" in refused("file_write", ctx, path=".", content="x")
    (ctx.workspace / "f").write_text("")
    assert "not a directory" in refused("file_write", ctx, path="f/g.txt", content="x")
    (ctx.workspace / "mode.sh").write_text("#!/bin/sh\n")
    os.chmod(ctx.workspace / "mode.sh", 0o755)
    run("file_write", ctx, path="mode.sh", content="#!/bin/sh\necho\n")
    assert os.stat(ctx.workspace / "mode.sh").st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    "path",
    ["../x.txt", "a/../../x.txt", "/etc/passwd", "~/x", "./../ws2/x"],
)
def test_paths_outside_are_refused(ctx: ToolContext, path: str) -> None:
    (ctx.workspace / "a").mkdir()
    for name, args in [
        ("file_read", {"path": path}),
        ("file_write", {"path": path, "content": "x"}),
        ("file_edit", {"path": path, "old_string": "a", "new_string": "b"}),
        ("file_list", {"path": path}),
        ("file_search", {"pattern": "x", "path": path}),
    ]:
        assert "path escapes the workspace" in refused(name, ctx, **args), name
    assert not (ctx.workspace.parent / "x.txt").exists()


def test_errors_name_no_server_path_or_user_id(tmp_path: Path) -> None:
    """A tool error shows paths relative to the workspace: never the data directory, nor the
    owner's user id that is part of a user's workspace path (issue 11, item 9)."""
    data = tmp_path / "data"
    ws = data / "workspaces" / "@users" / "user_7f3a9c" / "assistant"
    ws.mkdir(parents=True)
    (ws / "f.txt").write_text("x")
    ctx = ToolContext(
        "s1", "assistant", ws.resolve(), data, ToolsSettings(), owner_id="user_7f3a9c"
    )
    near_max = "d/" * 1999  # under the path limit alone, over PATH_MAX under the workspace
    cases = [
        ("file_read", {"path": "a" * 5000}),
        ("file_write", {"path": "a" * 5000, "content": "x"}),
        ("file_edit", {"path": "a" * 5000, "old_string": "a", "new_string": "b"}),
        ("file_list", {"path": "a" * 5000}),
        ("file_search", {"pattern": "x", "path": "a" * 5000}),
        ("file_read", {"path": "b" * 300}),
        ("file_write", {"path": "dir/" + "b" * 300, "content": "x"}),
        ("file_search", {"pattern": "x", "path": "b" * 300 + "/*.py"}),
        ("file_read", {"path": near_max + "x"}),
        ("file_write", {"path": near_max + "x", "content": "x"}),
        ("file_list", {"path": near_max}),
        ("file_write", {"path": "f.txt/inside", "content": "x"}),
        ("file_read", {"path": "missing/x"}),
        ("file_list", {"path": "f.txt"}),
        ("file_edit", {"path": "f.txt", "old_string": "nope", "new_string": "b"}),
        ("file_search", {"pattern": "(", "path": "."}),
    ]
    for name, args in cases:
        with pytest.raises(ToolError) as info:  # a ToolError, never a raw OSError
            asyncio.run(TOOLS[name].run(args, ctx))
        msg = str(info.value)
        assert "user_7f3a9c" not in msg and str(tmp_path) not in msg, (name, msg)
        assert "/tmp/" not in msg and "workspaces" not in msg, (name, msg)
        assert len(msg) < 600, (name, len(msg))  # the model's own long path is cut
    msg = refused("file_read", ctx, path="a" * 5000)
    assert msg == "path is too long: 5000 bytes (the limit is 4000)"


def test_inner_dotdot_is_fine(ctx: ToolContext) -> None:
    (ctx.workspace / "a").mkdir()
    run("file_write", ctx, path="a/../b.txt", content="ok")
    assert (ctx.workspace / "b.txt").read_text() == "ok"


def test_symlinks_out_are_refused(ctx: ToolContext, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("top secret\n")
    ws = ctx.workspace
    os.symlink(secret, ws / "file_link")
    os.symlink(outside, ws / "dir_link")
    os.symlink(outside / "new.txt", ws / "dangling_link")  # points outside, not there yet
    (ws / "inner").mkdir()
    os.symlink("../dir_link", ws / "inner" / "hop")  # a chain of symlinks

    for path in ["file_link", "dir_link/secret.txt", "inner/hop/secret.txt"]:
        msg = refused("file_read", ctx, path=path)
        assert msg.startswith("path escapes the workspace"), msg
        assert "symlink" in msg
    assert "escapes" in refused("file_list", ctx, path="dir_link")
    assert "escapes" in refused("file_search", ctx, pattern="secret", path="dir_link")
    # Writes never go through a symlink out: not to a file, a dangling link or a directory.
    assert "escapes" in refused("file_write", ctx, path="file_link", content="pwned")
    assert "escapes" in refused("file_write", ctx, path="dangling_link", content="pwned")
    assert "escapes" in refused("file_write", ctx, path="dir_link/new.txt", content="pwned")
    assert "escapes" in refused("file_write", ctx, path="inner/hop/deeper/x.txt", content="x")
    assert "escapes" in refused(
        "file_edit", ctx, path="file_link", old_string="top", new_string="pwned"
    )
    assert secret.read_text() == "top secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # Searching the whole workspace does not follow links out.
    assert "no matches" in run("file_search", ctx, pattern="secret")

    # A symlink that stays inside is followed; writing replaces the target's content.
    (ws / "real.txt").write_text("inside\n")
    os.symlink("real.txt", ws / "inside_link")
    assert "inside" in run("file_read", ctx, path="inside_link")
    run("file_write", ctx, path="inside_link", content="changed\n")
    assert (ws / "real.txt").read_text() == "changed\n"
    assert os.path.islink(ws / "inside_link")


def test_file_search(ctx: ToolContext) -> None:
    ws = ctx.workspace
    (ws / "src/pkg").mkdir(parents=True)
    (ws / "src/pkg/mod.py").write_text("import os\n\ndef Hello():\n    return 'hello world'\n")
    (ws / "src/main.ts").write_text("// hello from ts\n")
    (ws / "README.md").write_text("Say HELLO\n")
    (ws / "blob.bin").write_bytes(b"hello\x00\x01")
    (ws / ".git").mkdir()
    (ws / ".git/config").write_text("hello git\n")

    out = run("file_search", ctx, pattern="hello")
    assert out.splitlines()[:2] == [
        "src/main.ts:1: // hello from ts",
        "src/pkg/mod.py:4: return 'hello world'",
    ]
    assert "1 binary file(s) skipped" in out
    assert ".git" not in out
    out = run("file_search", ctx, pattern="hello", case_insensitive=True)
    assert "README.md:1: Say HELLO" in out and "src/pkg/mod.py:3: def Hello():" in out
    assert run("file_search", ctx, pattern="hello", path="*.py").startswith("src/pkg/mod.py:4:")
    out = run("file_search", ctx, pattern="hello", path="src/**/*.ts")
    assert out == "src/main.ts:1: // hello from ts"
    assert run("file_search", ctx, pattern="hello", path="src/pkg").startswith("src/pkg/mod.py")
    assert run("file_search", ctx, pattern="^import", path="src/pkg/mod.py") == (
        "src/pkg/mod.py:1: import os"
    )
    assert "no matches" in run("file_search", ctx, pattern="nothing-like-this")
    assert "invalid regular expression" in refused("file_search", ctx, pattern="(unclosed")
    assert "no such" in refused("file_search", ctx, pattern="x", path="missing")

    (ws / "many.txt").write_text("match\n" * 500)
    out = run("file_search", ctx, pattern="match", path="many.txt")
    assert len(out.splitlines()) == files.MAX_SEARCH_MATCHES + 1
    assert "stopped at" in out


def test_file_search_pathological_regex_times_out(
    ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "SEARCH_TIMEOUT_S", 1.0)
    # ~2^40 steps of backtracking: a search that the timeout did not end would not return
    # (pytest's timeout fails the test).
    (ctx.workspace / "a.txt").write_text("a" * 40 + "!\n")
    assert "search timed out after 1 s" in refused("file_search", ctx, pattern="^(a+)+$")


# --- shell ------------------------------------------------------------------------------------


def _live(pids: set[int]) -> set[int]:
    """The pids among `pids` that still exist and are not zombies."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _session_members(sid: int) -> set[int]:
    members = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid or os.getpgid(proc.pid) == sid:
                members.add(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return members


def _wait_gone(sid: int, within: float = 2.0) -> None:
    wait_for(lambda: not _live(_session_members(sid)), f"the processes of {sid} to end", within)


async def _running(started: list[int], name: str, count: int) -> None:
    """Wait until the command has started `count` processes whose name starts with `name`."""

    def running() -> int:
        if not started:
            return 0
        found = 0
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(started[0])
            for proc in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    alive = proc.status() != psutil.STATUS_ZOMBIE
                    found += alive and proc.name().startswith(name)
        return found

    await until(lambda: running() >= count, f"{count} {name} processes to start")


def test_shell_runs_in_workspace(ctx: ToolContext) -> None:
    out = run("shell", ctx, command="pwd; echo out; echo err >&2; exit 3")
    assert out.splitlines() == ["exit code: 3", str(ctx.workspace), "out", "err"]
    assert "must be a non-empty string" in refused("shell", ctx, command="  ")


def test_shell_environment_is_scrubbed(ctx: ToolContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-should-not-leak")
    monkeypatch.setenv("PRISMD_SECRET_TOKEN", "tok-should-not-leak")
    out = run("shell", ctx, command="env")
    assert "should-not-leak" not in out
    keys = {line.split("=", 1)[0] for line in out.splitlines()[1:] if "=" in line}
    assert keys <= {"PATH", "HOME", "LANG", "TERM", "PWD", "SHLVL", "_", "OLDPWD"}
    assert f"HOME={ctx.workspace}" in out and "TERM=dumb" in out


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_shell_timeout_kills_the_process_group(ctx: ToolContext, loop: str) -> None:
    """The timeout ends the command and what it left in the background, which would never end
    by themselves: a tool that waited for them would not return (pytest's timeout)."""
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append
    command = {"command": "sleep 1000 & sleep 1000", "timeout_s": 1}
    with pytest.raises(ToolError) as info:
        RUNNERS[loop](TOOLS["shell"].run(command, ctx))
    msg = str(info.value)
    assert "timed out after 1 s" in msg
    (pgid,) = started
    _wait_gone(pgid)


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_shell_background_processes_do_not_outlive_the_command(ctx: ToolContext, loop: str) -> None:
    """The command ends, its background process is killed: the tool returns with the command
    (it would not return waiting for `sleep 1000`: pytest's timeout)."""
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append
    out = RUNNERS[loop](TOOLS["shell"].run({"command": "sleep 1000 & echo started"}, ctx))
    assert out == "exit code: 0\nstarted"
    _wait_gone(started[0])


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_shell_cancellation_kills_the_process(ctx: ToolContext, loop: str) -> None:
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append

    async def scenario() -> None:
        task = asyncio.create_task(TOOLS["shell"].run({"command": "sleep 30 & sleep 30"}, ctx))
        await _running(started, "sleep", 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    RUNNERS[loop](scenario())
    _wait_gone(started[0])


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_shell_flooding_output_is_stopped(ctx: ToolContext, loop: str) -> None:
    """A command that writes without end: the timeout and a cancellation both end it promptly,
    although the output reader has stopped reading."""
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append
    # `yes` never ends: were it not ended, the tool would not return (pytest's timeout).
    with pytest.raises(ToolError) as info:
        RUNNERS[loop](TOOLS["shell"].run({"command": "yes", "timeout_s": 1}, ctx))
    assert "timed out" in str(info.value) and "output cut" in str(info.value)
    _wait_gone(started.pop())

    async def scenario() -> None:
        task = asyncio.create_task(TOOLS["shell"].run({"command": "yes & yes"}, ctx))
        await _running(started, "yes", 2)  # both write, and fill the pipe
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    RUNNERS[loop](scenario())
    for pid in started:
        _wait_gone(pid)


def test_shell_output_cap(ctx: ToolContext) -> None:
    ctx.settings.shell.max_output_bytes = 4096
    out = run("shell", ctx, command="seq 1 100000; echo THE-END")
    assert len(out.encode()) < 4096 + 200
    assert "output cut" in out
    assert out.splitlines()[1] == "1"  # the beginning is kept…
    assert out.endswith("THE-END")  # …and the end


def test_shell_memory_limit(ctx: ToolContext) -> None:
    ctx.settings.shell.memory_mb = 128
    code = "x = bytearray(512 * 1024 * 1024)"
    out = run("shell", ctx, command=f"{sys.executable} -c '{code}'")
    assert out.startswith("exit code: 1") and "MemoryError" in out


# --- code_exec --------------------------------------------------------------------------------


def test_code_exec_prints_and_reports_exceptions(ctx: ToolContext) -> None:
    out = run("code_exec", ctx, code="import sys\nprint('hello', 6 * 7)\nprint(sys.flags.isolated)")
    assert out.splitlines()[-3:] == ["exit code: 0", "hello 42", "1"]
    out = run("code_exec", ctx, code="def f():\n    raise ValueError('boom')\nf()\n")
    assert "exit code: 1" in out
    assert "Traceback" in out and "ValueError: boom" in out
    assert "must be a non-empty string" in refused("code_exec", ctx, code="")


def test_code_exec_environment_and_directory(
    ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-should-not-leak")
    code = (
        "import os, json\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), "
        "'files': os.listdir('.')}))\n"
        "open('out.txt', 'w').write('x')\n"
    )
    allowed = {"PATH", "HOME", "LANG", "TERM", "TMPDIR", "LC_CTYPE", "WORKSPACE", "PWD"}
    for mechanism in ("bubblewrap", "fallback"):
        if mechanism == "fallback":
            force_fallback(monkeypatch)
        fallback = sandbox.probe()["bwrap"] is None  # forced, or all this host has
        if fallback:  # without bubblewrap, the marker of the server's leftovers is seen too
            allowed.add(sandbox.MARKER_ENV)
        out = run("code_exec", ctx, code=code)
        assert "should-not-leak" not in out
        data = json.loads(out.splitlines()[-1])
        assert set(data["env"]) <= allowed, mechanism
        assert data["files"] == ["main.py"]  # out.txt of the run before is gone
        assert data["env"]["HOME"] == data["cwd"] == data["env"]["TMPDIR"]
        assert not Path(data["cwd"]).is_relative_to(ctx.workspace)
        if fallback:
            assert not os.path.exists(data["cwd"])  # the host directory is deleted afterwards
        else:
            assert data["cwd"] == "/tmp"  # the sandbox's own tmpfs, gone with it
            assert data["env"]["WORKSPACE"] == "/workspace"
    assert not (ctx.workspace / "out.txt").exists()


def test_code_exec_time_limit(ctx: ToolContext) -> None:
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append
    # A run the limit did not end would not return (pytest's timeout): it sleeps 1000 s.
    msg = refused("code_exec", ctx, code="import time\ntime.sleep(1000)", timeout_s=1)
    assert msg.startswith("time limit: killed after 1 s")
    _wait_gone(started[0])


def test_code_exec_cpu_limit(ctx: ToolContext) -> None:
    ctx.settings.code_exec.cpu_s = 1
    msg = refused("code_exec", ctx, code="while True:\n    pass\n")
    assert msg.startswith("CPU time limit (1 s) exceeded")


def test_code_exec_memory_limit(ctx: ToolContext) -> None:
    ctx.settings.code_exec.memory_mb = 256
    msg = refused("code_exec", ctx, code="x = bytearray(1024 * 1024 * 1024)\nprint('no')")
    assert msg.startswith("memory limit (256 MB) reached")


def test_code_exec_output_cap(ctx: ToolContext) -> None:
    ctx.settings.code_exec.max_output_bytes = 2048
    out = run("code_exec", ctx, code="for i in range(100000):\n    print(i)\nprint('END')")
    assert "output cut" in out and out.endswith("END") and len(out) < 2048 + 300


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_code_exec_cancellation_kills_the_process(ctx: ToolContext, loop: str) -> None:
    started: list[int] = []
    ctx.extra["on_process_start"] = started.append

    async def scenario() -> None:
        code = "import time\ntime.sleep(30)"
        task = asyncio.create_task(TOOLS["code_exec"].run({"code": code}, ctx))
        await _running(started, "python", 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    RUNNERS[loop](scenario())
    assert started
    _wait_gone(started[0])


@pytest.fixture
def tcp_server() -> Iterator[int]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"hi")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


CONNECT = (
    "import socket\n"
    "try:\n"
    "    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
    "    print('CONNECTED', s.recv(2))\n"
    "except OSError as exc:\n"
    "    print('FAILED', type(exc).__name__, exc)\n"
)


def test_code_exec_has_no_network(ctx: ToolContext, tcp_server: int) -> None:
    iso = isolation()
    assert set(iso) >= {"network_namespace", "landlock", "rlimits", "shell"}
    out = run("code_exec", ctx, code=CONNECT.format(port=tcp_server))
    if iso["network_namespace"] or iso["landlock_tcp_denied"]:
        assert "FAILED" in out and "CONNECTED" not in out
    else:
        assert "warning: this machine cannot cut the network" in out
    if not iso["network_namespace"]:
        pytest.skip("no network namespace on this machine")
    code = "import socket\nprint([n for _, n in socket.if_nameindex()])"
    assert run("code_exec", ctx, code=code).splitlines()[-1] == "['lo']"


def test_code_exec_each_mechanism_alone(
    ctx: ToolContext, tcp_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without bubblewrap (the fallback): the network namespace alone cuts the network;
    Landlock alone denies TCP; with neither, the output says the network is not cut."""
    real = {**sandbox.probe(), "bwrap": None, "bwrap_error": "not installed (test)"}
    code = CONNECT.format(port=tcp_server)
    if real["netns_flags"]:
        monkeypatch.setattr(sandbox, "_probed", {**real, "landlock": False})
        assert not isolation()["landlock_tcp_denied"]
        out = run("code_exec", ctx, code=code)
        assert "FAILED" in out and "no Landlock" in out
    if real["landlock"] and real["landlock_abi"] >= 4:
        monkeypatch.setattr(sandbox, "_probed", {**real, "netns_flags": 0})
        out = run("code_exec", ctx, code=code)
        assert "FAILED PermissionError" in out
        assert out.startswith("warning: this machine cannot cut the network")
        assert "except by TCP (Landlock)" in out
    monkeypatch.setattr(sandbox, "_probed", {**real, "netns_flags": 0, "landlock": False})
    iso = isolation()
    assert iso["network_namespace"] is False and iso["network"].startswith("NOT cut")
    out = run("code_exec", ctx, code=code)
    assert out.startswith("warning: this machine cannot cut the network")
    assert "CONNECTED b'hi'" in out


def test_code_exec_network_when_configured(ctx: ToolContext, tcp_server: int) -> None:
    ctx.settings.code_exec.network = True
    out = run("code_exec", ctx, code=CONNECT.format(port=tcp_server))
    assert "CONNECTED b'hi'" in out


def test_code_exec_landlock_confines_files(
    ctx: ToolContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback without bubblewrap: Landlock confines reads and writes (the bubblewrap
    sandbox's mount namespace is tested by tests/test_sandbox.py)."""
    force_fallback(monkeypatch)
    if not isolation()["landlock"]:
        pytest.skip("no Landlock on this machine")
    (ctx.workspace / "data.csv").write_text("a,b\n1,2\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    code = (
        "import os\n"
        f"print(open({str(ctx.workspace / 'data.csv')!r}).read().splitlines()[1])\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "os.mkdir('sub')\n"
        "print('wrote in cwd')\n"
        f"for path in [{str(ctx.workspace / 'new.txt')!r}, {str(outside)!r}, '/tmp/x-prismd']:\n"
        "    try:\n"
        "        open(path, 'a').write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except PermissionError:\n"
        "        print('denied write')\n"
        f"for path in [{str(outside)!r}, '/proc/1/environ']:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        print('READ', path)\n"
        "    except PermissionError:\n"
        "        print('denied read')\n"
    )
    out = run("code_exec", ctx, code=code)
    assert out.splitlines() == [
        "exit code: 0",
        "1,2",
        "wrote in cwd",
        "denied write",
        "denied write",
        "denied write",
        "denied read",
        "denied read",
    ], out
    assert outside.read_text() == "private"
    assert not (ctx.workspace / "new.txt").exists()


# --- web_fetch --------------------------------------------------------------------------------

PAGE = b"""<!doctype html><html><head><title>Test  Page</title>
<style>body { color: red }</style><script>var secret = 1;</script></head>
<body><h1>Welcome</h1><p>Some <b>bold</b> text and a <a href="/x">link</a>.</p>
<ul><li>one</li><li>two</li></ul></body></html>"""


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str]] = []
    # /slow answers once this is set (by the test, after its client gave up; by the fixture's
    # end at the latest).
    release = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, ctype: str, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (time limit)
            pass

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append((self.path, self.headers.get("Host", "")))
        path, _, query = self.path.partition("?")
        if path == "/page":
            self._send(200, "text/html; charset=utf-8", PAGE)
        elif path == "/text":
            self._send(200, "text/plain", "plain ünïcode text\n".encode())
        elif path == "/json":
            self._send(200, "application/json", b'{"a": [1, 2]}')
        elif path == "/big":
            self._send(200, "text/plain", b"0123456789" * 20_000)
        elif path == "/image":
            self._send(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
        elif path == "/slow":
            self.release.wait(60)
            self._send(200, "text/plain", b"late")
        elif path == "/redirect":
            self._send(302, "text/plain", b"", Location=query)
        elif path == "/loop":
            self._send(301, "text/plain", b"", Location="/loop")
        elif path == "/missing":
            self._send(404, "text/plain", b"nope")
        else:
            self._send(200, "text/plain", b"secret data")


@pytest.fixture
def http_server() -> Iterator[int]:
    _Handler.requests = []
    _Handler.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    _Handler.release.set()
    server.shutdown()
    server.server_close()


def fetch(tool: Tool, ctx: ToolContext, url: str) -> str:
    return asyncio.run(tool.run({"url": url}, ctx))


def fetch_refused(tool: Tool, ctx: ToolContext, url: str) -> str:
    with pytest.raises(ToolError) as info:
        fetch(tool, ctx, url)
    return str(info.value)


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "239.255.255.250",
        "0.0.0.0",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
        "64:ff9b::a00:1",
        "2001:db8::1",
    ],
)
def test_check_address_refuses(ip: str) -> None:
    with pytest.raises(ToolError, match="refused"):
        check_address(ip, allow_private=False)
    check_address(ip, allow_private=True)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_check_address_allows_public(ip: str) -> None:
    check_address(ip, allow_private=False)


def test_web_fetch_refuses_private_targets_without_connecting(
    ctx: ToolContext, http_server: int
) -> None:
    import httpx

    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, text="should not happen")

    tool = WebFetch(transport=httpx.MockTransport(handler))
    for url in [
        f"http://127.0.0.1:{http_server}/",
        "http://localhost/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:192.168.0.1]/",
        "https://169.254.169.254/latest/meta-data/",
        "http://0x7f000001/",
    ]:
        msg = fetch_refused(tool, ctx, url)
        assert "refused" in msg or "cannot resolve" in msg, (url, msg)
    assert sent == []
    assert _Handler.requests == []
    assert "only http and https" in fetch_refused(tool, ctx, "file:///etc/passwd")
    assert "only http and https" in fetch_refused(tool, ctx, "ftp://example.com/")
    assert "invalid URL" in fetch_refused(tool, ctx, "http://[::1/")


def _test_tool(mapping: dict[str, list[str]], calls: list[str] | None = None) -> WebFetch:
    """A web_fetch whose resolver maps test host names, and that treats 127.0.0.1 (the test
    server) as if it were a public address; every other address gets the real check."""

    async def resolver(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in mapping:
            raise ToolError(f"cannot resolve {host}")
        return mapping[host]

    def address_check(ip: str, allow_private: bool) -> None:
        if ip != "127.0.0.1":
            check_address(ip, allow_private)

    return WebFetch(resolver=resolver, address_check=address_check)


def test_web_fetch_checks_every_redirect(ctx: ToolContext, http_server: int) -> None:
    tool = _test_tool(
        {
            "public.test": ["127.0.0.1"],
            "internal.test": ["127.0.0.2"],
            "mixed.test": ["127.0.0.1", "10.1.2.3"],
        }
    )
    base = f"http://public.test:{http_server}"
    assert "plain ünïcode text" in fetch(tool, ctx, f"{base}/text")
    assert _Handler.requests == [("/text", f"public.test:{http_server}")]  # pinned, Host kept
    _Handler.requests.clear()

    for target in [
        f"http://127.0.0.2:{http_server}/secret",
        f"http://internal.test:{http_server}/secret",
        f"http://[::1]:{http_server}/secret",
        f"http://mixed.test:{http_server}/secret",
    ]:
        msg = fetch_refused(tool, ctx, f"{base}/redirect?{target}")
        assert "refused" in msg and ("loopback" in msg or "private" in msg), msg
    assert [p for p, _ in _Handler.requests if p.startswith("/secret")] == []
    # A relative redirect to an allowed host is followed.
    out = fetch(tool, ctx, f"{base}/redirect?/page")
    assert out.startswith("Title: Test Page\nURL: http://public.test:")
    assert "too many redirects" in fetch_refused(tool, ctx, f"{base}/loop")


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `public.test` only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=public.test",
         "-addext", "subjectAltName=DNS:public.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    yield server.server_address[1], client_ctx
    server.shutdown()
    server.server_close()


def test_web_fetch_https_is_pinned_and_verified_by_name(
    ctx: ToolContext, https_server: tuple[int, ssl.SSLContext]
) -> None:
    port, client_ctx = https_server
    mapping = {"public.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    tool = _test_tool(mapping)
    tool.verify = client_ctx
    # Connected to 127.0.0.1, but SNI and the certificate check used the name.
    out = fetch(tool, ctx, f"https://public.test:{port}/text")
    assert "plain ünïcode text" in out
    assert _Handler.requests == [("/text", f"public.test:{port}")]
    # The same address under another name: the certificate does not match, refused.
    msg = fetch_refused(tool, ctx, f"https://other.test:{port}/text")
    assert "certificate" in msg.lower() or "hostname" in msg.lower(), msg


def test_web_fetch_resolves_once_per_hop(ctx: ToolContext, http_server: int) -> None:
    calls: list[str] = []
    tool = _test_tool({"public.test": ["127.0.0.1"]}, calls)
    fetch(tool, ctx, f"http://public.test:{http_server}/redirect?/text")
    assert calls == ["public.test", "public.test"]


def test_web_fetch_content(ctx: ToolContext, http_server: int) -> None:
    ctx.settings.web_fetch.allow_private = True
    tool = WebFetch()
    base = f"http://127.0.0.1:{http_server}"
    out = fetch(tool, ctx, f"{base}/page")
    lines = out.splitlines()
    assert lines[0] == "Title: Test Page"
    assert lines[1] == f"URL: {base}/page"
    assert "# Welcome" in out and "**bold**" in out and "[link](/x)" in out
    assert "one" in out and "two" in out
    assert "secret" not in out and "color: red" not in out
    out = fetch(tool, ctx, f"{base}/json")
    assert json.loads(out.split("\n\n", 1)[1]) == {"a": [1, 2]}
    assert "refused" in fetch_refused(tool, ctx, f"{base}/image")
    assert "image/png" in fetch_refused(tool, ctx, f"{base}/image")
    assert "HTTP 404" in fetch_refused(tool, ctx, f"{base}/missing")


def test_web_fetch_size_and_time_limits(ctx: ToolContext, http_server: int) -> None:
    ctx.settings.web_fetch.allow_private = True
    ctx.settings.web_fetch.max_bytes = 2048
    tool = WebFetch()
    base = f"http://127.0.0.1:{http_server}"
    out = fetch(tool, ctx, f"{base}/big")
    assert out.endswith("[content cut at 2048 bytes]")
    assert len(out) < 2048 + 200
    ctx.settings.web_fetch.timeout_s = 0.5
    # /slow answers only once the test says so, after the fetch gave up: the time limit ended it.
    assert "timed out after 0.5 s" in fetch_refused(tool, ctx, f"{base}/slow")
    assert _Handler.requests[-1][0] == "/slow" and not _Handler.release.is_set()
    _Handler.release.set()


# --- memory -----------------------------------------------------------------------------------


def with_store(make: Callable[[], Store], test: Any) -> None:
    """Run `test(call)` with the memory tools on a store (both stores: tests/test_store.py's
    new_store), in one event loop; `call(name, ctx, **args)` runs a tool."""

    async def call(name: str, context: ToolContext, **args: Any) -> str:
        context.store = store
        return await TOOLS[name].run(args, context)

    async def main() -> None:
        await store.open()
        try:
            await test(call)
        finally:
            await store.close()

    store = make()
    asyncio.run(main())


def test_memory_note_and_search(new_store, ctx: ToolContext) -> None:  # noqa: F811
    async def test(call: Any) -> None:
        out = await call(
            "memory_note", ctx, text="The user's favourite tea is genmaicha.", tags=["prefs"]
        )
        assert re.fullmatch(r"saved note #\d+", out)
        first = int(out.removeprefix("saved note #"))
        await call("memory_note", ctx, text="  Project deadline is March 3rd.\n")
        await call("memory_note", ctx, text="The user dislikes coffee; prefers tea.")

        out = await call("memory_search", ctx, query="what tea does the user like?")
        lines = out.splitlines()
        assert len(lines) == 2 and all("tea" in line for line in lines)
        assert re.match(r"#\d+ \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", lines[0])
        assert f"#{first} (" in out and "[prefs]: The user's favourite tea is genmaicha." in out
        deadline = await call("memory_search", ctx, query="deadline", limit=1)
        assert deadline.startswith(f"#{first + 1} (") and deadline.endswith(
            "UTC): Project deadline is March 3rd."
        )
        assert (await call("memory_search", ctx, query="prefs")).startswith(f"#{first} (")
        assert await call("memory_search", ctx, query="zebra") == "no matching notes"
        # No words: the most recent notes.
        recent = await call("memory_search", ctx, query="", limit=2)
        assert recent.splitlines()[0].startswith(f"#{first + 2} (") and recent.count("\n") == 1

        other = ToolContext("s2", "agent-b", ctx.workspace, ctx.data_dir, ctx.settings)
        assert await call("memory_search", other, query="tea") == "no matching notes"
        assert await call("memory_search", other, query="") == "no matching notes"
        await call("memory_note", other, text="agent b knows about tea too")
        assert (await call("memory_search", other, query="tea")).count("\n") == 0
        assert not (ctx.data_dir / "memory.db").exists()  # the notes are in the store
        # Users share agents, not what an agent remembers for one of them.
        for user in ("user_a", "user_b"):
            mine = ToolContext(
                ctx.session_id, ctx.agent_id, ctx.workspace, ctx.data_dir, ctx.settings
            )
            mine.owner_id = user
            assert await call("memory_search", mine, query="tea") == "no matching notes"
            assert await call("memory_search", mine, query="") == "no matching notes"
            await call("memory_note", mine, text=f"{user} likes tea")
            assert (await call("memory_search", mine, query="tea")).count("\n") == 0
            assert user in await call("memory_search", mine, query="tea")

        # Tags are cleaned (no commas, one space, 64 characters); text a store cannot hold (a
        # NUL, a lone surrogate from escaped JSON) is replaced, not refused.
        await call(
            "memory_note", ctx, text="odd\x00text\ud800here", tags=[" a,b  c ", "x" * 99, " "]
        )
        out = await call("memory_search", ctx, query="odd")
        assert out.endswith(f"[a b c, {'x' * 64}]: odd\ufffdtext\ufffdhere")
        for bad in ({"text": " "}, {"text": "x" * 8001}, {"text": "t", "tags": "a"}):
            with pytest.raises(ToolError):
                await call("memory_note", ctx, **bad)
        for bad_limit in (0, -1, True, "3"):
            with pytest.raises(ToolError):
                await call("memory_search", ctx, query="tea", limit=bad_limit)
        assert (await call("memory_search", ctx, query="", limit=999)).count("\n") == 3

    with_store(new_store, test)


def test_memory_search_survives_search_syntax(new_store, ctx: ToolContext) -> None:  # noqa: F811
    """Every hostile query of tests/test_store.py through the tool: an answer, never an error."""

    async def test(call: Any) -> None:
        await call("memory_note", ctx, text="Remember the tea ceremony.")
        for query in HOSTILE_QUERIES:
            out = await call("memory_search", ctx, query=query)
            assert out == "no matching notes" or "tea ceremony" in out, query[:60]

    with_store(new_store, test)


def test_memory_says_when_its_database_is_unavailable(ctx: ToolContext) -> None:
    """Another process holds SQLite's write lock past the busy timeout: saving a note is
    refused with a message for the model (no path, no database error), searching goes on,
    and saving works again once the lock is gone."""

    async def main() -> None:
        store = SqliteStore(ctx.data_dir)
        await store.open()
        ctx.store = store
        other = sqlite3.connect(ctx.data_dir / "prismd.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(ToolError) as info:
                await TOOLS["memory_note"].run({"text": "kept later"}, ctx)
            assert str(info.value) == "the memory database is unavailable; try again later"
            assert await TOOLS["memory_search"].run({"query": "kept"}, ctx) == "no matching notes"
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await TOOLS["memory_note"].run({"text": "kept later"}, ctx)).startswith("saved")
        assert "kept later" in await TOOLS["memory_search"].run({"query": "kept"}, ctx)
        await store.close()

    asyncio.run(main())


def test_memory_without_a_store_says_so(ctx: ToolContext) -> None:
    assert "not available" in refused("memory_note", ctx, text="x")
    assert "not available" in refused("memory_search", ctx, query="x")


def test_memory_queries_are_words_each_quoted() -> None:
    assert fts_query('tea "NEAR(x* -y') == '"tea" OR "NEAR" OR "x" OR "y"'
    assert fts_query('*-()"') == ""
    assert fts_query("tea tea TEA") == '"tea" OR "TEA"'
    words = query_words("tea 'NEAR(x* -y foo_bar Café | !z:*")
    assert note_query(words) == "'tea' | 'near' | 'x' | 'y' | ('foo' <-> 'bar') | 'cafe' | 'z'"
    assert note_query(["_"]) == ""
    assert len(query_words(" ".join(f"w{i}" for i in range(99)))) == 32


# --- current_time -----------------------------------------------------------------------------


def test_current_time(ctx: ToolContext) -> None:
    from datetime import datetime

    out = run("current_time", ctx)
    stamp, rest = out.split(" (", 1)
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert abs(parsed.timestamp() - time.time()) < 5
    assert rest.split(")")[0] == parsed.strftime("%A")
    assert "time zone: UTC" in out
    out = run("current_time", ctx, timezone="Asia/Kolkata")
    assert datetime.fromisoformat(out.split(" ")[0]).utcoffset().total_seconds() == 5.5 * 3600
    assert "time zone: Asia/Kolkata (IST, UTC+05:30)" in out
    for bad in ["Mars/Olympus", "../../etc/passwd", "Not A Zone"]:
        assert "unknown time zone" in refused("current_time", ctx, timezone=bad)


def test_each_user_has_their_own_workspace(tmp_path: Path) -> None:
    """The open mode keeps `workspaces/<agent>`; a user's files live under their own root."""
    from prismd.config import load_settings
    from prismd.tools.registry import ToolRegistry

    registry = ToolRegistry(load_settings(env={"PRISMD_HOME": str(tmp_path)}), [])
    local = registry.workspace("assistant", "sess_1")
    alice = registry.workspace("assistant", "sess_2", "user_alice")
    bob = registry.workspace("assistant", "sess_3", "user_bob")
    data = (tmp_path / "data").resolve()
    assert local == data / "workspaces" / "assistant"
    assert alice == data / "workspaces" / "@users" / "user_alice" / "assistant"
    assert len({local, alice, bob}) == 3
    assert not alice.is_relative_to(local) and not local.is_relative_to(bob)
