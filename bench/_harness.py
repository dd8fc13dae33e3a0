"""What bench/load.py and bench/soak.py share: the processes they start and how they watch them.

- Child processes (fake model servers, prismd) with their output in a log file, stopped by pid
  only (SIGTERM, then SIGKILL), on exit, on error and on SIGINT/SIGTERM/SIGALRM
  (:func:`install_deadline`).
- File-descriptor limits: this process and every child get soft = hard (``--server-nofile``
  can cap prismd's to simulate a small host).
- :func:`start_fake` runs ``prismd.testing.fake_models`` in a process of its own (never in the
  client's or prismd's interpreter) and waits for its ``ready`` line; :func:`start_prismd`
  runs ``prismd serve`` with a fresh temporary ``PRISMD_HOME`` on a free 127.0.0.1 port and
  polls ``/api/health`` until it answers.
- Measuring: CPU seconds per process over a phase (:class:`Cpu`), RSS sampled in a thread
  (:class:`RssSampler`), RSS settling, the machine and the source measured, a quiet-machine
  wait, a py-spy recorder (:class:`Profiler`), percentiles.

Everything listens on 127.0.0.1 only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PRISMD = VENV_BIN / "prismd"
HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
PIECE = "tok "

perf = time.perf_counter


# ------------------------------------------------------------------------------- numbers


def pct(values: Any, p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of a list or array of floats."""
    n = len(values)
    if not n:
        return None
    s = sorted(values)
    k = max(0, min(n - 1, int(round(p / 100 * n + 0.5)) - 1))
    return s[k]


def med(values: Any) -> float | None:
    return statistics.median(values) if len(values) else None


def ms(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x * 1000, digits)


def mb(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def fmt(v: Any) -> str:
    """A figure with about 3 significant digits (0.00285, 0.34, 9.31, 74.8, 954)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        a = abs(v)
        if a >= 100 or v == 0:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


# ------------------------------------------------------------------------------- fd limits

SERVER_NOFILE: int | None = None  # --server-nofile: prismd's soft and hard limit


def raise_nofile() -> tuple[int, int]:
    """This process: soft limit = hard limit (1000 connections need 1000+ descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the bench dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_preexec() -> None:  # runs in the child between fork and exec
    _die_with_parent()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _server_preexec() -> None:
    _die_with_parent()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if SERVER_NOFILE is not None:  # simulate a host whose hard limit is N
        hard = min(SERVER_NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- processes


class Child:
    """A child process whose output goes to a log file; stopped by its pid only."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec or _child_preexec,
            cwd=str(ROOT),
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """CPU seconds of the whole process (every thread, also those that ended), exact: the
        kernel's CPU-time clock of another process (clockid = ~pid << 3 | CPUCLOCK_SCHED, see
        clock_getcpuclockid(3)); /proc's clock-tick count (10 ms steps) where that fails."""
        try:
            return time.clock_gettime_ns(((~self.proc.pid) << 3) | 2) / 1e9
        except (OSError, AttributeError, OverflowError):
            pass
        try:
            t = self.ps.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return float("nan")

    def rss(self) -> int | None:
        try:
            return self.ps.memory_info().rss
        except psutil.Error:
            return None

    def fds(self) -> int | None:
        try:
            return self.ps.num_fds()
        except psutil.Error:
            return None

    def stop(self, timeout: float = 8.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


CHILDREN: list[Child] = []


def stop_children() -> None:
    for c in reversed(CHILDREN):
        try:
            c.stop()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: stopping {c.name}: {exc}", file=sys.stderr)
    CHILDREN.clear()


def start_fake(
    tmp: Path, name: str, pieces: int, rate: float, *, stamp: bool = False
) -> tuple[Child, str]:
    """A fake OpenAI-compatible model in a process of its own; returns it and its base URL."""
    argv = [
        sys.executable,
        "-m",
        "prismd.testing.fake_models",
        "--kind",
        "openai",
        "--host",
        HOST,
        "--port",
        "0",
        "--pieces",
        str(pieces),
        "--rate",
        str(rate),
        "--piece-text",
        PIECE,
    ]
    if stamp:
        argv.append("--stamp")
    child = Child(name, argv, dict(os.environ, PYTHONUNBUFFERED="1"), tmp / f"{name}.log")
    CHILDREN.append(child)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in child.output().splitlines():
            if line.startswith("ready "):
                return child, line.split()[1]
        if not child.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not become ready:\n{child.output()[-2000:]}")


def check_fake(child: Child, url: str) -> None:
    """One streamed request straight to the fake, so a broken fake is reported as such."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    try:
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=30.0) as r:
            text = r.read().decode(errors="replace")
        if r.status_code == 200 and "[DONE]" in text:
            return
        problem = f"HTTP {r.status_code}: {text[:300]}"
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    raise RuntimeError(
        f"{child.name} at {url} does not stream ({problem}); its log ends with:\n"
        + child.output()[-1500:]
    )


# The streams agent reaches the second fake through a second provider (OpenAI-compatible too).
STREAM_AGENT = "streamer"


def start_prismd(tmp: Path, fake_a: str, fake_b: str) -> tuple[Child, int, Path]:
    """prismd on a free port with a fresh home: the default provider (openai) at fake_a, the
    agent `streamer` (provider `ollama`) at fake_b. Waits until /api/health answers."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="prismd-home-", dir=tmp))
    (home / "config.toml").write_text(
        "[providers.ollama]\n"
        f'base_url = "{fake_b}"\n'
        'model = "fake-model"\n\n'
        "[[agents]]\n"
        f'id = "{STREAM_AGENT}"\n'
        'name = "Streamer"\n'
        'provider = "ollama"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRISMD_", "OPENAI_"))}
    env.update(
        PRISMD_HOME=str(home),
        OPENAI_BASE_URL=fake_a,
        OPENAI_API_KEY="x",
        PRISMD_MODEL=MODEL,
        PYTHONUNBUFFERED="1",
    )
    last = ""
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        child = Child(
            "prismd",
            [str(PRISMD), "serve", "--host", HOST, "--port", str(port)],
            env,
            tmp / f"prismd-{attempt}.log",
            preexec=_server_preexec,
        )
        CHILDREN.append(child)
        if wait_health(child, port, 40.0):
            return child, port, home
        last = child.output()[-2000:]
        child.stop()
        CHILDREN.remove(child)
    raise RuntimeError(f"prismd did not start:\n{last}")


def wait_health(child: Child, port: int, wait_s: float) -> bool:
    """Poll /api/health until it answers 200 (bounded; False if the child died)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and child.alive():
        try:
            if httpx.get(f"http://{HOST}:{port}/api/health", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


async def health(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        r = await c.get(f"http://{HOST}:{port}/api/health")
        return r.json()


async def wait_idle(port: int, wait_s: float = 30.0) -> dict[str, Any]:
    """Wait until the server reports no running turns (bounded)."""
    deadline = time.monotonic() + wait_s
    h: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            h = await health(port)
            if not h.get("runningTurns"):
                return h
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.2)
    return h


async def settle_rss(child: Child, limit_s: float = 15.0, still_s: float = 1.5) -> int | None:
    """Wait until the child's RSS holds still (within 256 KiB) for still_s (at most limit_s):
    prismd may still import model SDKs in a background thread after it answers."""
    last, since, deadline = child.rss() or 0, perf(), perf() + limit_s
    while perf() < deadline and perf() - since < still_s:
        await asyncio.sleep(0.25)
        now = child.rss() or 0
        if abs(now - last) > 256 * 1024:
            last, since = now, perf()
    return child.rss()


# ------------------------------------------------------------------------------- measuring


class RssSampler:
    """Samples a child's RSS in a thread (independent of the client's busy event loop) every
    `interval` s, its open fds every 40th time; keeps the peak per label (None: not
    recording)."""

    def __init__(self, child: Child, interval: float = 0.025) -> None:
        self.child, self.interval = child, interval
        self.label: str | None = None
        self.peaks: dict[str, int] = {}
        self.fds_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        ps = self.child.ps
        k = 0
        while not self._stop.wait(self.interval):
            label = self.label
            if label is None:
                continue
            k += 1
            try:
                r = ps.memory_info().rss  # /proc/PID/statm: cheap
                if k % 40 == 1:  # listing thousands of fds is not: about once a second
                    self.fds_peak = max(self.fds_peak, ps.num_fds())
            except psutil.Error:
                continue
            if r > self.peaks.get(label, 0):
                self.peaks[label] = r

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


class Cpu:
    """CPU seconds used over one phase by each child and by this process (`client`), and by
    everything else on the machine (`other`: other people's processes skew the figures)."""

    def __init__(self, procs: dict[str, Child]) -> None:
        self.procs = procs
        self.t0 = self._now()

    def _now(self) -> dict[str, float]:
        d = {name: c.cpu_s() for name, c in self.procs.items()}
        d["client"] = time.process_time()
        t = psutil.cpu_times()
        d["machine_busy"] = (
            t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        )
        d["steal"] = getattr(t, "steal", 0.0)
        d["wall"] = perf()
        return d

    def done(self) -> dict[str, float]:
        t1 = self._now()
        d = {k: round(t1[k] - self.t0[k], 4) for k in t1}
        ours = sum(d[k] for k in (*self.procs, "client"))
        d["other"] = round(max(0.0, d["machine_busy"] - ours), 3)
        d["load1"] = round(os.getloadavg()[0], 2)
        return d


def source() -> dict[str, Any]:
    """Which prismd is measured: the imported package and the repository state."""
    import prismd

    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, timeout=10)
            return r.stdout.decode().strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    pkg = Path(prismd.__file__).resolve().parent
    working_tree = pkg.is_relative_to(ROOT / "src")
    return {
        "prismd_package": str(pkg),
        "prismd_version": getattr(prismd, "__version__", None),
        "working_tree": working_tree,  # False: e.g. a `git archive` snapshot on PYTHONPATH
        "git_head": git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "--", "src")) if working_tree else None,
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "client_loop": loop,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def wait_quiet(limit_s: float, busy_below: float = 10.0) -> dict[str, Any]:
    """Wait (at most limit_s) for a 3-s window in which the machine is < busy_below % busy."""
    t0 = time.monotonic()
    while True:
        busy = psutil.cpu_percent(interval=3.0)  # machine-wide, averaged over the cores
        waited = round(time.monotonic() - t0, 1)
        load = [round(x, 2) for x in os.getloadavg()]
        if busy < busy_below:
            return {"quiet": True, "waited_s": waited, "busy_pct": busy, "loadavg": load}
        if waited >= limit_s:
            print(f"machine still {busy:.0f}% busy (load {load}); going on", file=sys.stderr)
            return {"quiet": False, "waited_s": waited, "busy_pct": busy, "loadavg": load}


def scan_log(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    warn = [x for x in lines if " WARNING " in x or x.startswith("WARNING")]
    err = [x for x in lines if " ERROR " in x or x.startswith("ERROR") or "Traceback" in x]
    samples: list[str] = []
    for x in err + warn:
        if x not in samples:
            samples.append(x)
        if len(samples) >= 6:
            break
    return {"warnings": len(warn), "errors": len(err), "samples": samples}


# ------------------------------------------------------------------------------- running


def install_deadline(seconds: int, on_stop: Callable[[int], None]) -> None:
    """SIGINT, SIGTERM and SIGALRM (after `seconds`) stop the children, call on_stop(signum)
    (partial results) and exit with status 3, whatever the run is doing."""

    def bail(signum: int, frame: Any) -> None:
        stop_children()
        print(f"\nstopped by signal {signum}", file=sys.stderr)
        try:
            on_stop(signum)
        finally:
            os._exit(3)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, bail)
    signal.alarm(max(1, int(seconds)))


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (as prismd's uvicorn does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ------------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy (PyPI, in the dev extra) recording one process into a speedscope file
    (https://www.speedscope.app opens it), sampling without pausing the target."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.exe = VENV_BIN / "py-spy"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")

    def available(self) -> bool:
        return self.exe.exists()

    def start(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.exe),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--rate",
                    str(self.rate),
                    "--format",
                    "speedscope",
                    "--output",
                    str(self.out),
                    "--nonblocking",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        time.sleep(0.3)  # py-spy attaches (no readiness signal; at worst a few samples lost)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def top(self, n: int = 25) -> dict[str, Any]:
        """Top frames by self samples and by total (inclusive) samples, over all threads."""
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            log = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            return {"error": f"no profile: {exc}", "py_spy_log": log}
        frames = data["shared"]["frames"]
        self_n: dict[int, float] = {}
        total_n: dict[int, float] = {}
        all_w = 0.0
        n_samples = 0
        threads: dict[str, float] = {}
        for prof in data.get("profiles", []):
            weights = prof.get("weights") or [1] * len(prof.get("samples", []))
            n_samples += len(weights)
            thread = prof.get("name") or "?"
            threads[thread] = round(threads.get(thread, 0.0) + sum(weights), 3)
            for stack, w in zip(prof.get("samples", []), weights, strict=False):
                all_w += w
                if stack:
                    self_n[stack[-1]] = self_n.get(stack[-1], 0) + w
                for f in set(stack):
                    total_n[f] = total_n.get(f, 0) + w

        def name(i: int) -> str:
            f = frames[i]
            where = f.get("file") or ""
            if "site-packages/" in where:
                where = where.split("site-packages/", 1)[1]
            elif "/src/" in where:
                where = where.split("/src/", 1)[1]
            line = f.get("line")
            return f"{f.get('name')} ({where}{':' + str(line) if line else ''})"

        def table(d: dict[int, float]) -> list[dict[str, Any]]:
            best = sorted(d.items(), key=lambda kv: -kv[1])[:n]
            return [
                {"pct": round(100 * w / all_w, 1) if all_w else 0.0, "frame": name(i)}
                for i, w in best
            ]

        return {
            "samples": n_samples,
            "sampled_s": round(all_w, 3),  # py-spy weighs each sample by its interval
            "threads_s": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
            "self": table(self_n),
            "total": table(total_n),
        }
