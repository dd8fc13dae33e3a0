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
- :func:`start_scale_out` runs a throwaway PostgreSQL and Redis (``prismd.testing``) and
  ``prismd serve --workers N`` on them; :class:`Procs` watches processes the bench did not
  start itself (the workers, PostgreSQL's postmaster and backends, redis-server);
  :class:`Ops` counts what the deployment asks of Redis (``INFO commandstats``) and of
  PostgreSQL (``pg_stat_statements``, ``pg_stat_database``, transaction ids).
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
        self.workers: list[int] = []  # prismd: the pids that answer (--workers N: its workers)

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
        return process_cpu_s(self.ps)

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

    def threads(self) -> int | None:
        try:
            return self.ps.num_threads()
        except psutil.Error:
            return None

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM, then SIGKILL; then the same for any of its own children still running
        (`prismd serve --workers N`'s workers, should the supervisor die before them)."""
        try:
            kids = self.ps.children(recursive=True) if self.alive() else []
        except psutil.Error:
            kids = []
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        stop_pids(kids)
        self._log.close()


def process_cpu_s(ps: psutil.Process, gone: float = float("nan")) -> float:
    """CPU seconds of a whole process (every thread, also those that ended), exact: the
    kernel's CPU-time clock of another process (clockid = ~pid << 3 | CPUCLOCK_SCHED, see
    clock_getcpuclockid(3)); /proc's clock-tick count (10 ms steps) where that fails; `gone`
    for a process that has ended."""
    try:
        return time.clock_gettime_ns(((~ps.pid) << 3) | 2) / 1e9
    except (OSError, AttributeError, OverflowError):
        pass
    try:
        t = ps.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return gone


def stop_pids(procs: list[psutil.Process], wait_s: float = 5.0) -> None:
    """SIGTERM the processes of this list that still run (psutil checks that a pid is still
    the same process), then SIGKILL those left after wait_s."""
    alive = []
    for ps in procs:
        try:
            if ps.is_running():
                ps.terminate()
                alive.append(ps)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=wait_s)
    for ps in left:
        try:
            ps.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=wait_s)


class Procs:
    """Processes the bench did not start itself, by pid (a prismd worker, PostgreSQL,
    redis-server); summed. With tree=True, each one's descendants too, also those that ended:
    the CPU time of a child the kernel has reaped is added to its parent's (children_user,
    children_system), so summing every live process's own time and its reaped children's
    counts each process of the tree once (PostgreSQL's backends come and go)."""

    def __init__(self, name: str, pids: list[int], tree: bool = False) -> None:
        self.name, self.tree = name, tree
        self.roots = [psutil.Process(pid) for pid in pids]

    @property
    def pids(self) -> list[int]:
        return [ps.pid for ps in self.roots]

    def members(self) -> list[psutil.Process]:
        out = []
        for ps in self.roots:
            out.append(ps)
            if self.tree:
                try:
                    out += ps.children(recursive=True)
                except psutil.Error:
                    pass
        return out

    def cpu_s(self) -> float:
        total = 0.0
        for ps in self.members():
            total += process_cpu_s(ps, gone=0.0)  # ended since members(): in its parent's now
            if self.tree:
                try:
                    t = ps.cpu_times()
                    total += t.children_user + t.children_system
                except psutil.Error:
                    pass
        return total

    def _sum(self, what: Callable[[psutil.Process], int]) -> int | None:
        total, seen = 0, False
        for ps in self.members():
            try:
                total += what(ps)
                seen = True
            except psutil.Error:
                pass
        return total if seen else None

    def rss(self) -> int | None:
        return self._sum(lambda ps: ps.memory_info().rss)

    def fds(self) -> int | None:
        return self._sum(lambda ps: ps.num_fds())

    def threads(self) -> int | None:
        return self._sum(lambda ps: ps.num_threads())

    def alive(self) -> bool:
        return all(ps.is_running() for ps in self.roots)


class Service:
    """A throwaway PostgreSQL or Redis of prismd.testing, kept in CHILDREN so that it is
    stopped (and its directory removed) with the rest, on exit, error or signal."""

    def __init__(self, name: str, server: Any, log: Path) -> None:
        self.name, self.server, self.log_path = name, server, log

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.server.close()


CHILDREN: list[Child | Service] = []


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


def start_prismd(
    tmp: Path,
    fake_a: str,
    fake_b: str,
    *,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
) -> tuple[Child, int, Path]:
    """prismd on a free port with a fresh home: the default provider (openai) at fake_a, the
    agent `streamer` (provider `ollama`) at fake_b. Waits until /api/health answers (from each
    worker, with `--workers N`)."""
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
    env.update(extra_env or {})
    last = ""
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port()
        argv = [str(PRISMD), "serve", "--host", HOST, "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        child = Child("prismd", argv, env, tmp / f"prismd-{attempt}.log", preexec=_server_preexec)
        CHILDREN.append(child)
        pids = wait_health(child, port, 40.0 + 20.0 * (workers - 1), workers)
        if pids is not None:
            child.workers = pids
            return child, port, home
        last = child.output()[-2000:]
        child.stop()
        CHILDREN.remove(child)
    raise RuntimeError(f"prismd did not start:\n{last}")


def wait_health(child: Child, port: int, wait_s: float, workers: int = 1) -> list[int] | None:
    """Poll /api/health until it answers 200 (with several workers: until each worker has
    answered, told apart by the `pid` it reports; a new connection per request lands on any of
    them). Returns the pids that answered; None if the time ran out or the child died."""
    deadline = time.monotonic() + wait_s
    pids: set[int] = set()
    while time.monotonic() < deadline and child.alive():
        try:
            r = httpx.get(f"http://{HOST}:{port}/api/health", timeout=1.0)
            if r.status_code == 200:
                pids.add(int(r.json().get("pid") or child.pid))
                if len(pids) >= workers:
                    return sorted(pids)
                time.sleep(0.02)
                continue
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    return None


async def health(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        r = await c.get(f"http://{HOST}:{port}/api/health")
        return r.json()


async def healths(port: int, pids: list[int], wait_s: float = 10.0) -> dict[int, dict[str, Any]]:
    """/api/health of each of these worker pids (a new connection per request lands on any
    worker: asked until each has answered; bounded, those that did not are left out)."""
    out: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait_s
    while len(out) < len(pids) and time.monotonic() < deadline:
        try:
            h = await health(port)
            if h.get("pid") in pids:
                out[h["pid"]] = h
            await asyncio.sleep(0.02)
        except (httpx.HTTPError, ValueError):
            await asyncio.sleep(0.1)
    return out


async def wait_idle(
    port: int, wait_s: float = 30.0, pids: list[int] | None = None
) -> dict[str, Any]:
    """Wait until the server reports no running turns (bounded). With `pids` (the workers of
    `--workers N`), until each of them has reported none since the wait began."""
    deadline = time.monotonic() + wait_s
    h: dict[str, Any] = {}
    idle: set[int] = set()
    while time.monotonic() < deadline:
        try:
            h = await health(port)
            if not h.get("runningTurns"):
                if not pids:
                    return h
                idle.add(h.get("pid", 0))
                if idle >= set(pids):
                    return h
                await asyncio.sleep(0.02)  # another connection: maybe the other worker
                continue
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.2)
    return h


# ------------------------------------------------------------------------------- scale-out


class ScaleOut:
    """`prismd serve --workers N` on a throwaway PostgreSQL and Redis (issue 10), all on
    127.0.0.1: the processes, the database prismd uses and what counts its operations."""

    def __init__(
        self, server: Child, port: int, home: Path, pg: Any, redis: Any, database_url: str
    ) -> None:
        self.server, self.port, self.home = server, port, home
        self.pg, self.redis, self.database_url = pg, redis, database_url
        self.statements = False  # pg_stat_statements preloaded
        self.workers = server.workers


def start_scale_out(tmp: Path, fake_a: str, fake_b: str, workers: int = 2) -> ScaleOut:
    """A fresh PostgreSQL cluster (pg_stat_statements preloaded when it is installed) and a
    fresh Redis (prismd.testing), then prismd with --workers N on them, like start_prismd.
    Each is in CHILDREN before it starts, so it is stopped whatever happens next; redis-server
    (which has no parent-death signal) also gets a :func:`guard`."""
    from prismd.testing.postgres_server import PostgresServer
    from prismd.testing.redis_server import RedisServer

    pg = PostgresServer()
    CHILDREN.append(Service("postgres", pg, pg.log))
    pg.start()
    statements = (pg.bin_dir.parent / "lib" / "pg_stat_statements.so").exists()
    if statements:  # needs a restart: a preload library is loaded by the postmaster
        pg.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        pg.restart()
    database_url = pg.create_database()
    redis = RedisServer()
    CHILDREN.append(Service("redis", redis, redis.dir / "redis.log"))
    redis.start()
    CHILDREN.append(guard("redis-guard", redis.proc.pid, tmp))
    env = {"PRISMD_DATABASE_URL": database_url, "PRISMD_REDIS_URL": redis.url}
    server, port, home = start_prismd(tmp, fake_a, fake_b, workers=workers, extra_env=env)
    out = ScaleOut(server, port, home, pg, redis, database_url)
    out.statements = statements
    return out


_GUARD = """
import os, sys, time
import psutil
bench, target = int(sys.argv[1]), psutil.Process(int(sys.argv[2]))
while os.getppid() == bench:
    time.sleep(0.5)
try:
    target.terminate()
    target.wait(5)
except psutil.TimeoutExpired:
    target.kill()
except psutil.Error:
    pass
"""


def guard(name: str, pid: int, tmp: Path) -> Child:
    """A watchdog for a process started without a parent-death signal (redis-server, by
    prismd.testing.redis_server): it stops that pid when the bench dies, even by SIGKILL. It
    has no death signal itself (it must outlive the bench) and a session of its own; stopping
    it does nothing else."""
    argv = [sys.executable, "-c", _GUARD, str(os.getpid()), str(pid)]
    return Child(name, argv, dict(os.environ), tmp / f"{name}.log", preexec=os.setsid)


class Ops:
    """What the deployment asks of Redis and PostgreSQL, counted by the servers themselves.

    Redis: ``INFO commandstats`` (calls and microseconds per command; the bench's own INFO
    left out) and ``INFO stats`` (bytes in and out). PostgreSQL, prismd's database only:
    ``pg_stat_statements`` (statements executed, rows, execution time, per kind: SELECT,
    INSERT, BEGIN, COMMIT...), counted the moment a statement ends; the transaction ids
    handed out (``pg_current_snapshot()``'s xmax: one per transaction that wrote, cluster
    wide, and only prismd writes); and ``pg_stat_database`` (xact_commit, tup_*), which a
    backend publishes at most once a second and, once it is idle, only 10 s later
    (PostgreSQL >= 15): a window read from it must end :data:`PG_FLUSH_S` after its last
    statement. The bench's own queries run in another database (`postgres`)."""

    PG_FLUSH_S = 10.5

    def __init__(self, redis_url: str, admin_url: str, database_url: str) -> None:
        self.redis_url, self.admin_url = redis_url, admin_url
        self.dbname = database_url.rsplit("/", 1)[1]
        self.has_statements = False
        self.pg: Any = None
        self.redis: Any = None

    async def open(self, statements: bool) -> None:
        import asyncpg
        import redis.asyncio as aioredis

        self.pg = await asyncpg.connect(self.admin_url, timeout=10)
        self.dbid = await self.pg.fetchval(
            "SELECT oid FROM pg_database WHERE datname = $1", self.dbname
        )
        if statements:
            await self.pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.has_statements = True
        self.redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=10)
        self.versions = {
            "postgres": await self.pg.fetchval("SHOW server_version"),
            "redis": (await self.redis.info("server")).get("redis_version"),
        }

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close(timeout=5)
        if self.redis is not None:
            await self.redis.aclose()

    async def counters(self) -> dict[str, Any]:
        """The counters that are exact at once: Redis, pg_stat_statements, transaction ids."""
        async with asyncio.timeout(20):
            cmd = await self.redis.info("commandstats")
            st = await self.redis.info("stats")
            pg: dict[str, Any] = {
                "xids": await self.pg.fetchval(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
                )
            }
            if self.has_statements:
                rows = await self.pg.fetch(
                    "SELECT lower(substring(ltrim(query, E' \t\r\n(') from '^[A-Za-z]+'))"
                    " AS kind, sum(calls)::bigint AS calls, sum(rows)::bigint AS rows,"
                    " sum(total_exec_time)::float8 AS ms"
                    " FROM pg_stat_statements WHERE dbid = $1 GROUP BY 1",
                    self.dbid,
                )
                pg["calls"] = {r["kind"] or "other": r["calls"] for r in rows}
                pg["rows"] = {r["kind"] or "other": r["rows"] for r in rows}
                pg["exec_ms"] = {r["kind"] or "other": round(r["ms"], 3) for r in rows}
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in cmd.items()}
        usec = {k.removeprefix("cmdstat_"): v["usec"] for k, v in cmd.items()}
        calls.pop("info", None)
        usec.pop("info", None)
        return {
            "redis": {
                "calls": calls,
                "usec": usec,
                "net_in_bytes": st.get("total_net_input_bytes", 0),
                "net_out_bytes": st.get("total_net_output_bytes", 0),
            },
            "pg": pg,
        }

    async def statements(self) -> dict[str, dict[str, Any]]:
        """Per statement of prismd's database (pg_stat_statements' normalised text): calls and
        rows; empty without pg_stat_statements."""
        if not self.has_statements:
            return {}
        async with asyncio.timeout(20):
            rows = await self.pg.fetch(
                "SELECT queryid::text AS id, query, calls, rows FROM pg_stat_statements"
                " WHERE dbid = $1",
                self.dbid,
            )
        return {
            r["id"]: {"query": " ".join(r["query"].split()), "calls": r["calls"], "rows": r["rows"]}
            for r in rows
        }

    async def database(self) -> dict[str, Any]:
        """pg_stat_database's row of prismd's database (see the class: it lags)."""
        async with asyncio.timeout(20):
            row = await self.pg.fetchrow(
                "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted,"
                " tup_updated, tup_deleted, blks_hit, blks_read"
                " FROM pg_stat_database WHERE datid = $1",
                self.dbid,
            )
        return {k: int(v) for k, v in dict(row).items()}


def delta(after: Any, before: Any) -> Any:
    """after - before, number by number, through nested dicts (missing: 0)."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: delta(v, before.get(k)) for k, v in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        d = after - (before or 0)
        return round(d, 3) if isinstance(d, float) else d
    return after


def ops_sum(a: Any, b: Any) -> Any:
    """a + b, number by number, through nested dicts (None: nothing yet)."""
    if a is None:
        return b
    if isinstance(b, dict):
        a = a if isinstance(a, dict) else {}
        return {k: ops_sum(a.get(k), b.get(k)) for k in {**a, **b}}
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        total = (a or 0) + b
        return round(total, 3) if isinstance(total, float) else total
    return a if b is None else b


def ops_scale(a: Any, factor: float) -> Any:
    """a * factor, number by number, through nested dicts."""
    if isinstance(a, dict):
        return {k: ops_scale(v, factor) for k, v in a.items()}
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a * factor
    return a


async def settle_rss(
    child: Child | Procs, limit_s: float = 15.0, still_s: float = 1.5
) -> int | None:
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
    """Samples a child's RSS (a :class:`Child` or :class:`Procs`: their sum) in a thread
    (independent of the client's busy event loop) every `interval` s, its open fds every 40th
    time; keeps the peak per label (None: not recording)."""

    def __init__(self, child: Child | Procs, interval: float = 0.025) -> None:
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
        k = 0
        while not self._stop.wait(self.interval):
            label = self.label
            if label is None:
                continue
            k += 1
            r = self.child.rss()  # /proc/PID/statm: cheap
            if k % 40 == 1:  # listing thousands of fds is not: about once a second
                self.fds_peak = max(self.fds_peak, self.child.fds() or 0)
            if r is None:
                continue
            if r > self.peaks.get(label, 0):
                self.peaks[label] = r

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


class Cpu:
    """CPU seconds used over one phase by each child and by this process (`client`), and by
    everything else on the machine (`other`: other people's processes skew the figures).
    `detail`: parts of those processes measured on their own as well (each worker of a
    `--workers N` prismd), not counted twice in `other`."""

    def __init__(
        self, procs: dict[str, Child | Procs], detail: dict[str, Procs] | None = None
    ) -> None:
        self.procs = procs
        self.detail = detail or {}
        self.t0 = self._now()

    def _now(self) -> dict[str, float]:
        d = {name: c.cpu_s() for name, c in (self.procs | self.detail).items()}
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
