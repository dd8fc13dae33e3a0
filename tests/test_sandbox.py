"""The sandbox of `code_exec` and of `shell` for callers who are not trusted, attacked as issue 11
attacked it: a Unix socket listening on the host, forks that each allocate, a double fork with
setsid(), kill -9 of the server mid-run, reading another user's workspace and the data
directory, and the uid of the child. Real processes throughout; a property the host cannot
provide is skipped, and the skip says what is missing (`isolation()` on this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prismd.config import ToolsSettings
from prismd.testing.fake_models import Reply
from prismd.tools.base import ToolContext, ToolError
from prismd.tools.builtins import CodeExec, Shell, _cgroup, isolation, sandbox

from .conftest import PrismdServer, openai_env
from .waiting import wait_for

PY = sys.executable
TOOLS = {"code_exec": CodeExec(), "shell": Shell()}


def need(*keys: str) -> dict[str, Any]:
    """isolation(), or a skip naming what this host lacks."""
    iso = isolation()
    for key in keys:
        if not iso[key]:
            why = {
                "mount_namespace": iso["bubblewrap_error"],
                "process_tree_bounded": iso["cgroup"].get("error"),
                "separate_uid": "prismd is not root here, so runs keep its uid",
                "untrusted_ok": "; ".join(iso["untrusted_missing"]),
            }.get(key, key)
            pytest.skip(f"this host has no {key}: {why}")
    return iso


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory as a server with users has it: prismd.db, Alice's and Bob's
    workspaces."""
    data = tmp_path / "data"
    for user in ("user_alice", "user_bob"):
        (data / "workspaces" / "@users" / user / "assistant").mkdir(parents=True)
    (data / "workspaces" / "@users" / "user_bob" / "assistant" / "secret.txt").write_text("bob's")
    db = sqlite3.connect(data / "prismd.db")
    db.execute("CREATE TABLE users (name TEXT, password_hash TEXT)")
    db.execute("INSERT INTO users VALUES ('alice', 'argon2-hash-of-alice')")
    db.commit()
    db.close()
    return data


def make_ctx(data: Path, trusted: bool, settings: ToolsSettings | None = None) -> ToolContext:
    workspace = data / "workspaces" / "@users" / "user_alice" / "assistant"
    return ToolContext(
        session_id="s1",
        agent_id="assistant",
        workspace=workspace.resolve(),
        data_dir=data,
        settings=settings or ToolsSettings(),
        owner_id="user_alice",
        trusted=trusted,
    )


@pytest.fixture
def alice(data: Path) -> ToolContext:
    """Alice, a user who is not an admin."""
    return make_ctx(data, trusted=False)


def run(tool: str, ctx: ToolContext, **args: Any) -> str:
    return asyncio.run(TOOLS[tool].run(args, ctx))


def python_in(tool: str, code: str) -> dict[str, Any]:
    """Arguments that run the Python `code` with `tool` (the shell calls the same Python)."""
    if tool == "code_exec":
        return {"code": code}
    return {"command": f"{PY} -I -c {_sh_quote(code)}"}


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


# The attacker's side: each test's Python program prints one JSON line, the last of the output.
def last_json(out: str) -> Any:
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"no JSON at the end of the output:\n{out[-2000:]}") from None


CALLERS = [("code_exec", True), ("code_exec", False), ("shell", False)]
CALLER_IDS = ["code_exec-trusted", "code_exec-untrusted", "shell-untrusted"]


@pytest.fixture(params=CALLERS, ids=CALLER_IDS)
def caller(request: pytest.FixtureRequest, data: Path) -> tuple[str, ToolContext]:
    tool, trusted = request.param
    if not trusted:
        need("untrusted_ok")
    return tool, make_ctx(data, trusted)


def test_isolation_reports_what_is_in_force() -> None:
    iso = isolation()
    assert isinstance(iso["untrusted_ok"], bool)
    assert iso["untrusted_ok"] == (not iso["untrusted_missing"])
    if iso["untrusted_ok"]:
        assert iso["mount_namespace"] and iso["pid_namespace"]
        assert iso["separate_uid"] and iso["runs_as_uid"] != 0
        assert iso["process_tree_bounded"] and iso["cgroup"]["memory"] and iso["cgroup"]["pids"]
    assert iso["shell"]["untrusted_ok"] == iso["untrusted_ok"]
    json.dumps(iso)  # GET /api/tools sends it as is
    settings = ToolsSettings()
    settings.shell.sandbox = "always"
    settings.shell.network = True
    shown = isolation(settings)["shell"]
    assert shown["sandbox"] == "always" and shown["network"] == "allowed by configuration"


# --- a Unix socket listening on the host ----------------------------------------------------


@pytest.fixture
def host_sockets(tmp_path: Path) -> Iterator[list[str]]:
    """Unix sockets listening on the host, writable by everyone (so that only their absence
    from the sandbox can stop a connection): in /tmp, in /run when it is writable, and in the
    abstract namespace."""
    token = secrets.token_hex(4)
    paths = [f"/tmp/prismd-test-{token}.sock"]
    if os.access("/run", os.W_OK):
        paths.append(f"/run/prismd-test-{token}.sock")
    paths.append(f"\0prismd-test-{token}")
    servers = []
    for path in paths:
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o777)
        server.listen(4)
        servers.append(server)
    # The attack works from the host: every socket accepts a connection.
    for path in paths:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
    yield paths
    for server in servers:
        server.close()
    for path in paths:
        if not path.startswith("\0"):
            os.unlink(path)


CONNECT_UNIX = """
import json, socket
results = {}
for path in PATHS:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        results[repr(path)] = "CONNECTED"
    except OSError as exc:
        results[repr(path)] = type(exc).__name__
print(json.dumps(results))
"""


def test_host_unix_sockets_are_unreachable(
    caller: tuple[str, ToolContext], host_sockets: list[str]
) -> None:
    need("mount_namespace", "network_namespace")
    tool, ctx = caller
    code = CONNECT_UNIX.replace("PATHS", repr(host_sockets))
    results = last_json(run(tool, ctx, **python_in(tool, code)))
    assert set(results) == {repr(p) for p in host_sockets}
    assert "CONNECTED" not in results.values(), results
    # Pathname sockets do not exist in the sandbox; the abstract one is in another namespace.
    assert results[repr(host_sockets[0])] == "FileNotFoundError"
    assert results[repr(host_sockets[-1])] == "ConnectionRefusedError"


# --- forks that each allocate --------------------------------------------------------------

FORKS_ALLOCATE = """
import json, os, time
r, w = os.pipe()
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # the kernel takes these first, not the parent that counts
        try:
            block = b"x" * (300 * 1024 * 1024)  # 300 MB, written (charged) at once
        except MemoryError:
            os._exit(3)
        os.write(w, b"+")
        time.sleep(120)  # hold it; the end of the run kills this
        os._exit(0)
    kids.append(pid)
os.close(w)
held, ended, alive = 0, {}, set(kids)
os.set_blocking(r, False)
deadline = time.monotonic() + 60
while held + len(ended) < 4 and time.monotonic() < deadline:
    try:
        held += len(os.read(r, 16))
    except BlockingIOError:
        pass
    for pid in list(alive):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            alive.discard(pid)
            ended[pid] = os.waitstatus_to_exitcode(status)
    time.sleep(0.02)
print(json.dumps({"held": held, "ended": sorted(ended.values())}))
"""


@pytest.mark.parametrize("tool", ["code_exec", "shell"])
def test_forks_that_allocate_cannot_exceed_the_memory_bound(data: Path, tool: str) -> None:
    """Four children of 300 MB each with memory_mb = 512: at most one holds its block (the
    kernel kills the others); without the cgroup all four held 1.2 GB."""
    need("process_tree_bounded", "untrusted_ok")
    settings = ToolsSettings()
    settings.code_exec.memory_mb = 512
    settings.shell.memory_mb = 512
    ctx = make_ctx(data, trusted=False, settings=settings)
    out = run(tool, ctx, **python_in(tool, FORKS_ALLOCATE))
    found = last_json(out)
    assert found["held"] <= 1, out
    assert found["held"] + len(found["ended"]) == 4, out
    assert -signal.SIGKILL in found["ended"], out  # the kernel's OOM kill
    assert "memory limit (512 MB)" in out and "kernel killed" in out


# --- a double fork with setsid() -----------------------------------------------------------

DOUBLE_FORK = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["TOKEN", "1000"])
    os._exit(0)
os.wait()
deadline = time.monotonic() + 60
while not os.path.exists("/workspace/release") and time.monotonic() < deadline:
    time.sleep(0.02)
print("main ends")
"""


def _pids_named(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0] == token.encode():
                        found.append(int(name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("ending", ["end", "timeout", "stop"])
def test_a_double_fork_with_setsid_is_gone_when_the_tool_ends(
    caller: tuple[str, ToolContext], ending: str
) -> None:
    need("pid_namespace")
    tool, ctx = caller
    token = f"prismd-escapee-{secrets.token_hex(4)}"
    code = DOUBLE_FORK.replace("TOKEN", token)
    args = python_in(tool, code)
    if ending == "timeout":
        args["timeout_s"] = 3
    outcome: dict[str, Any] = {}
    loop_ready = threading.Event()
    state: dict[str, Any] = {}

    async def scenario() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["task"] = asyncio.ensure_future(TOOLS[tool].run(args, ctx))
        loop_ready.set()
        try:
            outcome["out"] = await state["task"]
        except (ToolError, asyncio.CancelledError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=asyncio.run, args=(scenario(),))
    thread.start()
    loop_ready.wait(10)
    wait_for(lambda: _pids_named(token), "the double-forked process", 30)
    if ending == "end":
        (ctx.workspace / "release").write_text("")
    elif ending == "stop":
        state["loop"].call_soon_threadsafe(state["task"].cancel)
    thread.join(60)
    assert not thread.is_alive()
    # Gone by the time the tool has returned: no waiting here.
    assert _pids_named(token) == []
    if ending == "end":
        assert "main ends" in outcome["out"]
    elif ending == "timeout":
        assert "time" in str(outcome["error"]) and "3 s" in str(outcome["error"])
    else:
        assert isinstance(outcome["error"], asyncio.CancelledError)


# --- other users' files, the data directory, the uid ---------------------------------------

SNOOP = """
import json, os
found = {}
def attempt(name, fn):
    try:
        found[name] = ["READ", str(fn())[:60]]
    except OSError as exc:
        found[name] = [type(exc).__name__]
attempt("own", lambda: sorted(os.listdir("/workspace")))
attempt("bob", lambda: open(BOB).read())
attempt("bob_dir", lambda: os.listdir(os.path.dirname(BOB)))
attempt("db", lambda: open(DB, "rb").read(16))
attempt("data_dir", lambda: os.listdir(DATA))
attempt("via_proc", lambda: open("/proc/1/root" + DB, "rb").read(16))
attempt("up", lambda: os.listdir("/workspace/../.."))
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(),
                  "found": found}))
"""


def test_other_workspaces_and_the_data_directory_cannot_be_read(
    caller: tuple[str, ToolContext],
) -> None:
    need("mount_namespace")
    tool, ctx = caller
    (ctx.workspace / "mine.txt").write_text("alice's")
    data = ctx.data_dir
    bob = data / "workspaces" / "@users" / "user_bob" / "assistant" / "secret.txt"
    code = (
        SNOOP.replace("BOB", repr(str(bob)))
        .replace("DATA", repr(str(data)))
        .replace("DB", repr(str(data / "prismd.db")))
    )
    seen = last_json(run(tool, ctx, **python_in(tool, code)))
    found = seen["found"]
    assert found["own"] == ["READ", "['mine.txt']"]  # the positive control
    for name in ("bob", "bob_dir", "db", "data_dir"):
        assert found[name] == ["FileNotFoundError"], (name, found)  # not even there
    # /proc/1 is the sandbox's own first process (bwrap's, which the run may not inspect).
    assert found["via_proc"][0] in ("FileNotFoundError", "PermissionError"), found
    assert "mine.txt" not in found["up"][-1] and "secret" not in json.dumps(found)


def test_the_child_does_not_run_as_root(caller: tuple[str, ToolContext]) -> None:
    iso = need("separate_uid")
    tool, ctx = caller
    code = "import json, os\nprint(json.dumps([os.getuid(), os.geteuid(), os.getgroups()]))"
    uid, euid, groups = last_json(run(tool, ctx, **python_in(tool, code)))
    assert uid == euid == iso["runs_as_uid"] != 0
    assert 0 not in groups
    status = run(tool, ctx, **python_in(tool, "print(open('/proc/self/status').read())"))
    caps = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if "Cap" in line}
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000"


# --- kill -9 of the server mid-run ---------------------------------------------------------

KILLED_MID_RUN = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["TOKEN-grandchild", "1000"])
    os._exit(0)
os.wait()
os.execv("/bin/sleep", ["TOKEN-main", "1000"])
"""


def _marked_groups(owner: str) -> list[str]:
    layout, _ = _cgroup.detect()
    if layout is None:
        return []
    return [
        os.path.join(base, name)
        for base in layout.dirs
        for name in os.listdir(base)
        if _cgroup.parse_owner(name) == owner
    ]


def test_kill_9_of_the_server_leaves_no_sandboxed_process_and_the_next_start_sweeps(
    tmp_path: Path, fake_openai: Any
) -> None:
    need("pid_namespace")
    token = f"prismd-orphan-{secrets.token_hex(4)}"
    code = KILLED_MID_RUN.replace("TOKEN", token)
    call = {"id": "call_1", "name": "code_exec", "arguments": json.dumps({"code": code})}
    fake_openai.script(Reply(tool_calls=[call]), match="run it")
    srv = PrismdServer(tmp_path, openai_env(fake_openai), "[tools.code_exec]\ntimeout_s = 60\n")
    srv.start()
    assert srv.proc is not None
    pid = srv.proc.pid
    owner = f"{pid}-{_cgroup._start_time(pid)}"
    spawned: list[int] = []  # killed at the end whatever happens
    try:
        with srv.client() as c:
            c.send(type="chat", message="run it")
            c.until("tool_start")
            for name in ("main", "grandchild"):
                wait_for(lambda n=name: _pids_named(f"{token}-{n}"), f"the {name}", 30)
        groups = _marked_groups(owner)
        srv.kill()  # kill -9
        # The parent-death signal: everything the run started dies with the server.
        for name in ("main", "grandchild"):
            wait_for(lambda n=name: not _pids_named(f"{token}-{n}"), f"{name} to go", 10)
        assert groups == _marked_groups(owner)  # its run cgroup is left behind, empty

        # What a server that died may leave: a marked process that missed the signal, and a
        # run cgroup with a process still in it. The next start removes both.
        leftover = subprocess.Popen(
            ["/bin/sleep", "1000"],
            env={sandbox.MARKER_ENV: owner},
            start_new_session=True,
        )
        spawned.append(leftover.pid)
        in_group: int | None = None
        layout, _ = _cgroup.detect()
        if layout is not None:
            # An orphan, as the dead server's would be (not this test's child).
            spawn = subprocess.run(
                ["/bin/sh", "-c", "/bin/sleep 1000 >/dev/null 2>&1 & echo $!"],
                capture_output=True,
                text=True,
                check=True,
            )
            in_group = int(spawn.stdout)
            spawned.append(in_group)
            for base in layout.dirs:
                dead = os.path.join(base, f"{_cgroup.PREFIX}{owner}.999")
                os.mkdir(dead)
                with open(os.path.join(dead, "cgroup.procs"), "w") as f:
                    f.write(str(in_group))
            assert len(_marked_groups(owner)) > len(groups)
        srv.start()
        assert wait_for(lambda: leftover.poll() is not None, "the marked leftover", 10)
        assert leftover.returncode == -signal.SIGKILL
        if in_group is not None:
            orphan = in_group
            wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), "the cgroup's process", 10)
        assert _marked_groups(owner) == []
        assert "removed what a server that died left behind" in srv.log.read_text()
        health = srv.get("/api/health")
        assert health.status_code == 200
    finally:
        srv.stop()
        for leftover_pid in (
            spawned + _pids_named(f"{token}-main") + _pids_named(f"{token}-grandchild")
        ):
            with contextlib.suppress(OSError):
                os.kill(leftover_pid, signal.SIGKILL)


# --- who gets the sandbox ------------------------------------------------------------------


def test_untrusted_shell_works_in_the_workspace_only(alice: ToolContext) -> None:
    iso = need("untrusted_ok")
    ws = alice.workspace
    (ws / "made-by-host.txt").write_text("host\n")
    out = run(
        "shell",
        alice,
        command=(
            "pwd; echo $HOME; echo from-sandbox > new.txt; echo more >> made-by-host.txt; "
            "touch /usr/x 2>/dev/null || echo usr-read-only; ls /tmp | wc -l; id -u"
        ),
    )
    lines = out.splitlines()
    assert lines[0] == "exit code: 0", out
    assert lines[1:4] == ["/workspace", "/workspace", "usr-read-only"]
    assert lines[4:] == ["0", str(iso["runs_as_uid"])]
    assert (ws / "new.txt").read_text() == "from-sandbox\n"
    assert (ws / "made-by-host.txt").read_text() == "host\nmore\n"
    assert os.stat(ws / "new.txt").st_uid == iso["runs_as_uid"]


def test_file_tools_keep_what_they_create_writable_by_the_sandbox(alice: ToolContext) -> None:
    """Files the file tools write (as root) in a workspace the sandbox owns take its owner, so
    the user's sandboxed shell can change them."""
    need("untrusted_ok")
    from prismd.tools.builtins.files import FileWrite

    run("shell", alice, command="true")  # hands the workspace to the sandbox user
    asyncio.run(FileWrite().run({"path": "deep/dir/f.txt", "content": "v1\n"}, alice))
    out = run("shell", alice, command="echo v2 >> deep/dir/f.txt && mkdir deep/dir/sub && echo ok")
    assert out.splitlines() == ["exit code: 0", "ok"]
    assert (alice.workspace / "deep/dir/f.txt").read_text() == "v1\nv2\n"


def test_untrusted_network_is_cut_unless_configured(alice: ToolContext) -> None:
    need("untrusted_ok")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "    print('CONNECTED')\n"
        "except OSError as exc:\n"
        "    print('FAILED', type(exc).__name__)\n"
    )
    try:
        for tool in ("shell", "code_exec"):
            assert "FAILED" in run(tool, alice, **python_in(tool, code)), tool
        alice.settings.shell.network = True
        alice.settings.code_exec.network = True
        for tool in ("shell", "code_exec"):
            assert "CONNECTED" in run(tool, alice, **python_in(tool, code)), tool
    finally:
        server.close()


def test_untrusted_callers_are_refused_without_the_isolation(
    alice: ToolContext, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sandbox.probe()
    trusted = make_ctx(data, trusted=True)
    for missing in (
        {"cgroup": None, "cgroup_error": "no cgroup (test)"},
        {"bwrap": None, "bwrap_error": "not installed (test)"},
        {"privileged": False},
    ):
        monkeypatch.setattr(sandbox, "_probed", {**real, **missing})
        assert isolation()["untrusted_ok"] is False
        for tool, args in (("shell", {"command": "id"}), ("code_exec", {"code": "print(1)"})):
            with pytest.raises(ToolError) as info:
                run(tool, alice, **args)
            assert f"{tool} is not available to you" in str(info.value)
            assert "missing:" in str(info.value)
    # A trusted caller still gets code_exec (in the fallback sandbox without bubblewrap)…
    monkeypatch.setattr(sandbox, "_probed", {**real, "bwrap": None, "bwrap_error": "test"})
    assert run("code_exec", trusted, code="print(6 * 7)").endswith("42")
    # …and the host shell, but not with sandbox = "always" when there is no sandbox.
    assert run("shell", trusted, command="echo hi").endswith("hi")
    trusted.settings.shell.sandbox = "always"
    with pytest.raises(ToolError) as info:
        run("shell", trusted, command="echo hi")
    assert 'tools.shell.sandbox is "always"' in str(info.value)


def test_trusted_shell_is_sandboxed_with_always(data: Path) -> None:
    iso = need("mount_namespace")
    ctx = make_ctx(data, trusted=True)
    assert run("shell", ctx, command="pwd").splitlines()[1] == str(ctx.workspace)  # the host
    ctx.settings.shell.sandbox = "always"
    out = run("shell", ctx, command="pwd; id -u; ls /")
    lines = out.splitlines()
    assert lines[1:3] == ["/workspace", str(iso["runs_as_uid"])]
    assert "home" not in lines[3:] and "var" not in lines[3:] and "workspace" in lines[3:]


# --- the file tools beside a sandboxed shell -----------------------------------------------


def test_a_symlink_swapped_in_after_the_check_is_not_followed(
    alice: ToolContext, tmp_path: Path
) -> None:
    """The file tools run as prismd's user (root) while a user's sandboxed shell may change the
    workspace: a directory swapped for a symlink out between the path check and its use makes
    the call fail, and nothing outside is read or written."""
    from prismd.tools.builtins import _paths
    from prismd.tools.builtins.files import FileEdit, FileList, FileRead, FileWrite

    ws = alice.workspace
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root's secret\n")
    (ws / "a").mkdir()
    (ws / "a" / "secret.txt").write_text("mine\n")
    checked = {
        "read": _paths.resolve(ws, "a/secret.txt"),
        "write": _paths.resolve(ws, "a/new.txt"),
        "deep": _paths.resolve(ws, "a/sub/new.txt"),
        "list": _paths.resolve(ws, "a"),
    }
    os.rename(ws / "a", ws / "a-before")
    os.symlink(outside, ws / "a")  # what a racing shell does between check and use

    def fails(fn: Callable[[], Any]) -> str:
        with pytest.raises((ToolError, OSError)) as info:
            fn()
        return str(info.value)

    refused = fails(lambda: FileRead._read(ws, checked["read"], 1, 10, 10_000))
    assert "root's secret" not in refused and "Not a directory" in refused
    fails(lambda: FileWrite._write(ws, checked["write"], b"pwned"))
    fails(lambda: FileWrite._write(ws, checked["deep"], b"pwned"))
    fails(lambda: FileEdit._edit(ws, checked["read"], "root", "pwned", False))
    fails(lambda: FileList._list(ws, checked["list"], True))
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "root's secret\n"


def test_file_tools_race_a_sandboxed_shell_swapping_symlinks(
    alice: ToolContext, tmp_path: Path
) -> None:
    """The attack itself: the user's shell swaps `a` between a directory and a symlink to a
    directory outside as fast as it can while file_write and file_read run on `a/…` (as root).
    Nothing lands outside, nothing outside is read."""
    need("untrusted_ok")
    from prismd.tools.builtins.files import FileRead, FileWrite

    outside = tmp_path / "outside-race"
    outside.mkdir()
    (outside / "f.txt").write_text("ROOT-ONLY-CONTENT\n")
    os.chmod(tmp_path, 0o755)
    run("shell", alice, command="mkdir -p a && echo inside > a/f.txt")
    # It swaps until told to stop: once the file tools have met both states of `a` (a
    # probabilistic race, so it runs until it has happened, not for a fixed time).
    swapper = (
        f"while [ ! -e stop ]; do mv a a.d && ln -s {outside} a && rm a && mv a.d a; done; "
        "echo swapped"
    )

    def kinds_of(seen: list[str]) -> set[str]:
        return {s.split(":")[0].split(" ")[0] for s in seen}

    async def scenario() -> list[str]:
        shell = asyncio.create_task(TOOLS["shell"].run({"command": swapper}, alice))
        seen: list[str] = []
        deadline = time.monotonic() + 60  # a hang guard: the assertions below then fail
        while not shell.done() and time.monotonic() < deadline:
            kinds = kinds_of(seen)
            if len(seen) > 10 and kinds & {"created", "overwrote"} and "refused" in kinds:
                break
            for tool, args in (
                (FileWrite(), {"path": "a/f.txt", "content": "written\n"}),
                (FileRead(), {"path": "a/f.txt"}),
            ):
                try:
                    seen.append(await tool.run(args, alice))
                except ToolError as exc:
                    seen.append(f"refused: {exc}")
        (alice.workspace / "stop").write_text("")
        seen.append(await shell)
        return seen

    seen = asyncio.run(scenario())
    assert seen[-1].endswith("swapped")
    assert len(seen) > 10  # the race really ran
    assert not any("ROOT-ONLY" in s for s in seen)
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "ROOT-ONLY-CONTENT\n"
    kinds = kinds_of(seen[:-1])
    assert kinds & {"created", "overwrote"} and "refused" in kinds  # both sides of the race


def test_a_fifo_in_the_workspace_does_not_hang_the_file_tools(alice: ToolContext) -> None:
    os.mkfifo(alice.workspace / "pipe")
    for tool, args in (
        ("file_read", {"path": "pipe"}),
        ("file_edit", {"path": "pipe", "old_string": "a", "new_string": "b"}),
    ):
        from prismd.tools.builtins.files import FileEdit, FileRead

        impl = {"file_read": FileRead(), "file_edit": FileEdit()}[tool]
        with pytest.raises(ToolError) as info:
            asyncio.run(asyncio.wait_for(impl.run(args, alice), 20))
        assert "pipe" in str(info.value), tool


def test_an_untrusted_search_finds_what_a_trusted_one_does(data: Path) -> None:
    """file_search of a user who is not trusted runs in the sandbox (workspace at /workspace):
    the same results, paths relative to the workspace."""
    from prismd.tools.builtins.files import FileSearch

    trusted, untrusted = make_ctx(data, True), make_ctx(data, False)
    ws = trusted.workspace
    (ws / "src").mkdir()
    (ws / "src" / "m.py").write_text("def needle():\n    return 1\n")
    (ws / "notes.md").write_text("a needle here\n")
    (ws / "blob.bin").write_bytes(b"needle\x00\x00")
    results = []
    for ctx in (trusted, untrusted):
        for args in ({"pattern": "needle"}, {"pattern": "needle", "path": "src/*.py"}):
            results.append(asyncio.run(FileSearch().run(args, ctx)))
    assert results[0] == results[2] and results[1] == results[3]
    assert results[0].splitlines() == [
        "notes.md:1: a needle here",
        "src/m.py:1: def needle():",
        "[1 binary file(s) skipped]",
    ]


USERNS = """
import ctypes, json, os, threading
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
found = {"unshare": [rc, os.strerror(ctypes.get_errno())]}
bpf = libc.syscall(321, 0, 0, 0)  # bpf(2) on x86_64
found["bpf"] = [bpf, os.strerror(ctypes.get_errno())]
box = []
t = threading.Thread(target=box.append, args=("thread ok",))
t.start()
t.join()
found["thread"] = box
print(json.dumps(found))
"""


def test_the_seccomp_filter_denies_user_namespaces(caller: tuple[str, ToolContext]) -> None:
    """Creating a user namespace (the way to capabilities in a namespace of one's own, a common
    start of kernel exploits) and bpf() fail; threads still work (clone3 falls back to clone)."""
    iso = need("mount_namespace", "seccomp")
    tool, ctx = caller
    found = last_json(run(tool, ctx, **python_in(tool, USERNS)))
    assert found["unshare"] == [-1, "Operation not permitted"], found
    if os.uname().machine == "x86_64":
        assert found["bpf"] == [-1, "Operation not permitted"], found
    assert found["thread"] == ["thread ok"]
    assert "user namespaces" in iso["seccomp_filter"]


def test_multiprocessing_works_in_the_sandbox(alice: ToolContext) -> None:
    need("untrusted_ok")
    code = (
        "import multiprocessing\n"
        "with multiprocessing.Pool(2) as p:\n"
        "    print(p.map(abs, [-1, -2]))"
    )
    assert run("code_exec", alice, code=code).splitlines()[-1] == "[1, 2]"


def test_a_run_that_cannot_start_names_no_server_path(
    alice: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("untrusted_ok")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/sys/fs/cgroup/memory/secret-path")

    monkeypatch.setattr(_cgroup.RunGroup, "create", refuse)
    for tool, args, what in (
        ("shell", {"command": "id"}, "shell"),
        ("code_exec", {"code": "print(1)"}, "process"),
    ):
        with pytest.raises(ToolError) as info:
            run(tool, alice, **args)
        assert str(info.value) == f"could not start the sandboxed {what}: Permission denied"
