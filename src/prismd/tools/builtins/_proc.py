"""Running a child process for a tool: its own session, capped output, a deadline, and a kill of
everything it started when it ends, times out or is cancelled.

The child is started with `start_new_session=True`, so it leads a new session and process group
whose id is its pid. When the run ends (normally, on timeout, or on cancellation) every process
still in that session is sent SIGKILL: the process group first, then any process whose session
id is still the child's (found in /proc; this catches processes that moved to another process
group with setpgid, and those reparented to init after their parent exited). A process that calls
setsid() itself leaves the session and is only caught while it is still a descendant of the child
(the sandbox's PID namespace catches it: see sandbox.py).

`set_pdeathsig` (called in the child before exec) makes the kernel SIGKILL the child when the
server dies, even by kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

SAFE_ENV_KEYS = ("PATH", "LANG")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def scrubbed_env(home: str, **extra: str) -> dict[str, str]:
    """A minimal environment: PATH, LANG, HOME and TERM=dumb; nothing from the server's
    environment that could be a secret (API keys, tokens, proxies with credentials)."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "HOME": home,
        "TERM": "dumb",
    }
    env.update(extra)
    return env


def set_rlimits(limits: Sequence[tuple[int, ...]]) -> None:
    """Set limits given as (which, value) or (which, soft, hard); called in the child. A value
    above the current hard limit is lowered to it (it cannot be raised without privilege)."""
    for which, *values in limits:
        soft, hard = (values[0], values[0]) if len(values) == 1 else values
        _cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))


PR_SET_PDEATHSIG = 1
_libc: Any = None


def set_pdeathsig(parent: int) -> None:
    """In a child before exec: SIGKILL it when its parent (the thread that forked it: the event
    loop's) dies. Exits at once when the parent is already gone (it died before the call)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


@dataclass(slots=True)
class ProcResult:
    returncode: int | None  # None when killed on timeout
    output: str
    timed_out: bool
    cut_bytes: int  # output bytes left out

    def status_line(self) -> str:
        if self.timed_out:
            return "timed out"
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"killed by {name}"
        return f"exit code: {rc}"


class OutputCollector:
    """Keeps the head and the tail of a byte stream within `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head_limit = limit - limit // 4
        self.tail_limit = limit // 4
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk and self.tail_limit:
            self.tail += chunk
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def cut(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        if not self.tail:
            return head
        tail = self.tail.decode("utf-8", "replace")
        if self.cut == 0:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        return (
            f"{head}\n[… output cut: {self.cut} bytes left out (limit {self.limit} bytes) …]\n"
            f"{tail}"
        )


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[1]), int(rest[3])
    except (IndexError, ValueError):
        return None


def _session_and_descendants(leader: int) -> set[int]:
    """Pids in the session `leader` leads, and the descendants of `leader`."""
    found: set[int] = set()
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        stat = _proc_stat(pid)
        if stat is None:
            continue
        ppid, sid = stat
        children.setdefault(ppid, []).append(pid)
        if sid == leader:
            found.add(pid)
    stack = [leader]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found


def kill_tree(leader: int) -> None:
    """SIGKILL the process group and session led by `leader`, and its descendants."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)
    for _ in range(3):  # a process may fork while we look; look again
        pids = _session_and_descendants(leader)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The standard protocol, and a future resolved as soon as the process itself exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _exited(exited: asyncio.Future[None]) -> None:
    """Wait until the process itself has exited. (`proc.wait()` also waits until its output
    pipe is closed, which a background child still holding it would delay indefinitely.)"""
    await asyncio.shield(exited)  # resolved after the return code is known


async def _cleanup(
    proc: asyncio.subprocess.Process,
    exited: asyncio.Future[None],
    pump_task: asyncio.Future[None],
    *others: Any,
) -> None:
    """Kill what is left, reap the process, close the pipes. Runs to the end even when the task
    is cancelled meanwhile (the cancellation is re-raised afterwards)."""
    kill_tree(proc.pid)
    cancelled = False

    async def bounded(aw: Awaitable[Any], seconds: float) -> None:
        nonlocal cancelled
        try:
            await asyncio.wait_for(asyncio.shield(aw), seconds)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # a timeout, or the pump's own error
            pass

    if not pump_task.done():  # every holder of the pipe is dead: EOF comes at once
        await bounded(pump_task, 1.0)
    for task in (pump_task, *others):
        if task is not None and not task.done():
            task.cancel()
    if proc.returncode is None:
        await bounded(_exited(exited), 5.0)
    # Close the pipes ourselves: `proc.wait()` would wait for them, and a reader that stopped
    # reading (cancelled above) may never see their end.
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()
    if cancelled:
        raise asyncio.CancelledError


async def run_process(
    argv: Sequence[str],
    *,
    cwd: str,
    env: dict[str, str],
    timeout_s: float,
    max_output_bytes: int,
    preexec_fn: Callable[[], None] | None = None,
    stdin_data: bytes | None = None,
    on_start: Callable[[int], None] | None = None,
    pass_fds: Sequence[int] = (),
) -> ProcResult:
    """Run `argv` with stdout and stderr interleaved in one capped stream.

    Background processes left behind when the main process exits are killed (after a short grace
    for the output pipe to drain); so is everything on timeout and on cancellation."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(loop),
        *argv,
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        preexec_fn=preexec_fn,
        start_new_session=True,
        close_fds=True,
        pass_fds=tuple(pass_fds),
    )
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    if on_start is not None:
        on_start(proc.pid)
    collector = OutputCollector(max_output_bytes)
    assert proc.stdout is not None
    stdout = proc.stdout

    async def pump() -> None:
        while chunk := await stdout.read(65536):
            collector.add(chunk)

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin_data or b"")
            await proc.stdin.drain()
            proc.stdin.close()

    pump_task = asyncio.ensure_future(pump())
    feed_task = asyncio.ensure_future(feed()) if stdin_data is not None else None
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await _exited(protocol.exited)
        except TimeoutError:
            timed_out = True
            kill_tree(proc.pid)
        # Let the pipe drain: after a timeout the last output is still in it, and background
        # children may hold it open (they are killed below).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump_task), 0.5)
    finally:
        await _cleanup(proc, protocol.exited, pump_task, feed_task)
    # Whatever was buffered after the kill (the pipe is closed once every holder is dead).
    return ProcResult(
        returncode=None if timed_out else proc.returncode,
        output=collector.text(),
        timed_out=timed_out,
        cut_bytes=collector.cut,
    )
