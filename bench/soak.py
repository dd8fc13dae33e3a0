"""Soak test for prismd: many connections chatting for minutes; lag, memory, fds over time.

Starts a fake OpenAI-compatible model (200 pieces at 50 pieces/s by default: 4 s answers) and
a prismd with a fresh temporary PRISMD_HOME (both through bench/_harness.py, as load.py
does), opens N WebSocket
connections in batches, and then every connection loops until the time is up:

    chat (its own session; every 5th turn starts a new session) -> read until `done` and
    `context_usage` (or `error`) -> think `--think-s` seconds (jittered x0.5..x1.5) -> again

The first turn of each connection is spread over one cycle (answer + think time) so the load
is steady from the start. After the time is up, turns in progress finish (the drain), the
connections close, and the server is watched until it is idle again (session databases idle
for 30 s are closed; the store checks every 15 s, hence up to 45 s).

Every turn is accounted for: completed (`done` within --hang-s), error (by code), or hung (no
`done` within --hang-s). The client goes on reading a hung turn for --late-s more: one that
finishes then counts as hung but `late` (its chunks are measured like any other), one that does
not is `abandoned` and its connection replaced by a new one.

Measured: delivery lag of every piece (as in load.py: its arrival - the time the fake model
scheduled it, from the stamp the fake puts in front of each answer) and
first-chunk time per 10-s window (p50/p99); every second the server's RSS, open fds, threads,
CPU and `/api/health` (connections, liveSessions, runningTurns). After the warm-up (the first
20% of the run) a least-squares line is fitted to RSS over time (slope in MB/min).

    .venv/bin/python bench/soak.py [--connections 1000] [--minutes 10] [--think-s 1.0]
        [--pieces 200 --rate 50] [--turns-per-connection 0] [--out bench/soak.json]
        [--plots docs/ [--plot-prefix soak]]

Plots (matplotlib, Agg): PREFIX-latency.png (lag p50/p99 and turns per window), PREFIX-memory.png
(RSS with the fitted line, fds, health counters). Everything is bounded in time: a hard
deadline of minutes + 3 stops the children and writes partial results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _client as cl  # noqa: E402 - the /ws client and the lag measurement
import _harness as hn  # noqa: E402 - processes, fd limits, CPU and RSS
from _harness import HOST, PIECE  # noqa: E402

try:
    import numpy as np
except ImportError:  # percentiles and the fit by hand
    np = None  # type: ignore[assignment]

perf = time.perf_counter
WINDOW_S = 10.0
WARMUP_FRACTION = 0.2
SESSION_EVERY = 5  # a new session every 5th turn of a connection
HEADROOM_S = 180  # hard deadline = minutes + 3


# ------------------------------------------------------------------------------- accounting


@dataclass
class Window:
    started: int = 0
    completed: int = 0  # by the time `done` arrived
    late: int = 0  # done after --hang-s (hung, finished late)
    abandoned: int = 0  # no done after --hang-s + --late-s
    server_total: array = field(default_factory=lambda: array("d"))  # done.latency.totalMs
    delay: array = field(default_factory=lambda: array("d"))  # (send->done) - totalMs, in s
    errors: Counter[str] = field(default_factory=Counter)  # by the time the turn ended
    lags: array = field(default_factory=lambda: array("d"))  # by chunk arrival
    first: array = field(default_factory=lambda: array("d"))  # first chunk - send, by arrival


class Stats:
    def __init__(self) -> None:
        self.t0 = perf()  # start of the load phase (set again when it starts)
        self.windows: dict[int, Window] = {}
        self.started = 0
        self.completed = 0
        self.late = 0  # hung: done after --hang-s, within --late-s more
        self.abandoned = 0  # hung: no done after --hang-s + --late-s; connection replaced
        self.cut_at_deadline = 0  # still running when the drain had to stop
        self.errors: Counter[str] = Counter()  # turns that ended with an error
        self.anomalies: Counter[str] = Counter()  # not turn failures (e.g. usage frame missing)
        self.in_flight = 0
        self.turn_s = array("d")  # send -> done of completed turns
        self.late_turn_s = array("d")  # send -> done of late turns
        self.server_total_s = array("d")  # the server's own done.latency.totalMs
        self.server_first_s = array("d")  # done.latency.firstTokenMs
        self.delay_s = array("d")  # (send -> done at the client) - the server's totalMs
        self.new_sessions = 0
        self.new_session_failed = 0
        self.reconnects = 0
        self.reconnect_failed = 0
        self.connections_lost = 0  # workers that gave up (could not reconnect)
        self.chunks = 0

    def window(self, t: float) -> Window:
        k = max(0, int((t - self.t0) // WINDOW_S))
        w = self.windows.get(k)
        if w is None:
            w = self.windows[k] = Window()
        return w

    @property
    def hung(self) -> int:
        return self.late + self.abandoned

    def record(self, r: cl.TurnResult, sch: cl.Schedule, hang_s: float) -> str:
        """Account for one finished (or given up) turn; returns its outcome."""
        if r.t_first is not None:
            self.window(r.t_first).first.append(r.t_first - r.t_send)
        assert sch.at is not None
        for t, lag in zip(sch.at, sch.lags, strict=False):
            self.window(t).lags.append(lag)
        self.chunks += len(sch.lags)
        if r.t_done is not None:
            took = r.t_done - r.t_send
            w = self.window(r.t_done)
            lat = r.latency or {}
            total = lat.get("totalMs")
            if isinstance(total, (int, float)):
                self.server_total_s.append(total / 1000)
                self.delay_s.append(took - total / 1000)
                w.server_total.append(total / 1000)
                w.delay.append(took - total / 1000)
            first = lat.get("firstTokenMs")
            if isinstance(first, (int, float)):
                self.server_first_s.append(first / 1000)
            if r.error:  # done arrived, context_usage did not (in time)
                self.anomalies["no_context_usage_after_done"] += 1
            if took <= hang_s:
                self.completed += 1
                self.turn_s.append(took)
                w.completed += 1
                return "completed"
            self.late += 1
            self.late_turn_s.append(took)
            w.late += 1
            return "late"
        if r.error == "timeout":
            self.abandoned += 1
            self.window(perf()).abandoned += 1
            return "abandoned"
        code = r.error or "no_done"
        self.errors[code] += 1
        self.window(perf()).errors[code] += 1
        return "error"


# ------------------------------------------------------------------------------- statistics


def _np(a: array) -> Any:
    return np.frombuffer(a, dtype=np.float64) if np is not None and len(a) else None


def pctl(a: array | list[float], p: float) -> float | None:
    """Nearest-rank percentile, like _harness.pct, fast on large arrays."""
    if not len(a):
        return None
    if np is not None:
        x = np.frombuffer(a, dtype=np.float64) if isinstance(a, array) else np.asarray(a)
        return float(np.percentile(x, p, method="inverted_cdf"))
    return hn.pct(list(a), p)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Least squares y = a + b x; returns (a, b, r^2)."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0:
        return None
    b = sxy / sxx
    a = my - b * mx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 1.0
    return a, b, r2


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# ------------------------------------------------------------------------------- sampling


class Sampler:
    """Every second: the server's RSS, fds, threads and CPU, the client's view (turns in
    flight) and the machine's load; a second task polls /api/health about once a second."""

    def __init__(self, server: hn.Child, port: int, stats: Stats, procs: dict[str, Any]):
        self.server, self.port, self.stats, self.procs = server, port, stats, procs
        self.samples: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []
        self.http = httpx.AsyncClient(timeout=10.0)  # one kept-alive connection throughout
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self._poll_health()),
        ]

    async def get_health(self) -> dict[str, Any] | None:
        try:
            r = await self.http.get(f"http://127.0.0.1:{self.port}/api/health")
            return r.json()
        except (httpx.HTTPError, ValueError):
            return None

    async def _poll_health(self) -> None:
        while True:
            t = perf()
            h = await self.get_health()
            took = perf() - t
            self.health.append(
                {
                    "tp": t,
                    "ms": round(took * 1000, 1),
                    "connections": h.get("connections") if h else None,
                    "liveSessions": h.get("liveSessions") if h else None,
                    "runningTurns": h.get("runningTurns") if h else None,
                }
            )
            await asyncio.sleep(max(0.0, 1.0 - took))

    def now(self) -> dict[str, Any]:
        ps = self.server.ps
        d: dict[str, Any] = {"tp": perf()}
        try:
            with ps.oneshot():
                d["rss_mb"] = round(ps.memory_info().rss / 2**20, 2)
                d["threads"] = ps.num_threads()
                ct = ps.cpu_times()
                d["cpu_s"] = round(ct.user + ct.system, 3)
                # The event loop's thread apart from the others (store thread, executor).
                d["cpu_main_s"] = round(
                    sum(t.user_time + t.system_time for t in ps.threads() if t.id == ps.pid), 3
                )
            d["fds"] = ps.num_fds()
        except psutil.Error:
            pass
        d["client_cpu_s"] = round(time.process_time(), 3)
        fake = self.procs.get("fake")
        if fake is not None:
            d["fake_cpu_s"] = round(fake.cpu_s(), 3)
        d["in_flight"] = self.stats.in_flight
        d["load1"] = round(os.getloadavg()[0], 2)
        return d

    async def _run(self) -> None:
        nxt = perf()
        while True:
            self.samples.append(self.now())
            nxt += 1.0
            await asyncio.sleep(max(0.0, nxt - perf()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()


# ------------------------------------------------------------------------------- the client


async def ping_probe(port: int, out: list[dict[str, Any]]) -> None:
    """One extra, otherwise idle connection: `ping` every second, time to `pong`. The pong is
    written straight to the connection, not through the session event log, so this is the
    server's read -> handle -> write path without the store."""
    ws = None
    try:
        while True:
            t = perf()
            try:
                if ws is None:
                    ws = await cl.ws_open(HOST, port, 15.0)
                async with asyncio.timeout(30.0):
                    await ws.send(PING)
                    while '"pong"' not in await ws.recv():
                        pass
                out.append({"tp": t, "ms": round((perf() - t) * 1000, 2)})
            except Exception:  # noqa: BLE001 - recorded as a failed ping; reconnect
                out.append({"tp": t, "ms": None})
                if ws is not None:
                    ws.abort()
                ws = None
            await asyncio.sleep(max(0.0, 1.0 - (perf() - t)))
    finally:
        if ws is not None:
            ws.abort()


PING = json.dumps({"type": "ping"})
CHAT_HI = json.dumps({"type": "chat", "message": "hi"})


class Soak:
    def __init__(self, args: argparse.Namespace, port: int, stats: Stats) -> None:
        self.args, self.port, self.stats = args, port, stats
        self.t_end = 0.0
        self.drain_deadline = 0.0
        self.conns: set[Any] = set()

    async def reconnect(self, old: Any) -> Any | None:
        st = self.stats
        self.conns.discard(old)
        try:
            old.abort()
        except Exception:  # noqa: BLE001
            pass
        while perf() < self.t_end:
            try:
                ws = await cl.ws_open(HOST, self.port, 15.0)
            except Exception:  # noqa: BLE001
                st.reconnect_failed += 1
                await asyncio.sleep(1.0)
                continue
            st.reconnects += 1
            self.conns.add(ws)
            return ws
        return None

    async def worker(self, ws: Any, seed: int) -> None:
        a, st = self.args, self.stats
        rnd = random.Random(seed)
        cycle = a.pieces / a.rate + a.think_s
        await self.pause(rnd.uniform(0, cycle))  # spread the first turns over one cycle
        offset = rnd.randrange(SESSION_EVERY)  # connections change sessions at different turns
        n = 0
        while perf() < self.t_end and (a.turns_per_connection == 0 or n < a.turns_per_connection):
            if n > 0 and (n + offset) % SESSION_EVERY == 0:
                try:
                    await cl.new_session(ws, 15.0)
                    st.new_sessions += 1
                except Exception:  # noqa: BLE001
                    st.new_session_failed += 1
                    ws = await self.reconnect(ws)
                    if ws is None:
                        if perf() < self.t_end:
                            st.connections_lost += 1
                        break
            n += 1
            st.started += 1
            st.window(perf()).started += 1
            st.in_flight += 1
            # Read the turn for --hang-s + --late-s (but not past the drain deadline); it is
            # hung if `done` came after --hang-s or not at all.
            bound = max(a.hang_s, min(a.hang_s + a.late_s, self.drain_deadline - perf()))
            try:
                sch = cl.Schedule(a.rate, len(PIECE), array("d"), array("d"))
                r = await cl.chat_turn(ws, CHAT_HI, bound, schedule=sch)
            finally:
                st.in_flight -= 1
            st.record(r, sch, a.hang_s)
            if r.error and r.error not in _SERVER_CODES:
                # A client-side failure (abandoned turn, closed socket, timeout after done):
                # the connection may hold stray frames or be gone; start over on a new one.
                ws = await self.reconnect(ws)
            if ws is None:
                if perf() < self.t_end:
                    st.connections_lost += 1
                break
            await self.pause(a.think_s * rnd.uniform(0.5, 1.5))
        if ws is not None:
            self.conns.add(ws)

    async def pause(self, seconds: float) -> None:
        """Sleep, but not past the end of the load (the drain must not wait for a think)."""
        await asyncio.sleep(max(0.0, min(seconds, self.t_end - perf())))


_SERVER_CODES = {
    "invalid_json",
    "invalid_message",
    "unknown_type",
    "empty_message",
    "turn_in_progress",
    "agent_not_found",
    "invalid_session_id",
    "session_not_found",
    "payload_too_large",
    "rate_limited",
    "unauthorized",
    "provider_unconfigured",
    "provider_error",
    "provider_timeout",
    "tool_error",
    "internal",
}


# ------------------------------------------------------------------------------- phases


def point(sampler: Sampler, h: dict[str, Any] | None) -> dict[str, Any]:
    d = sampler.now()
    d.pop("in_flight", None)
    d.pop("tp", None)
    d["health"] = (
        {k: h.get(k) for k in ("connections", "liveSessions", "runningTurns")} if h else None
    )
    return d


async def run(args: argparse.Namespace, res: dict[str, Any], tmp: Path, stats: Stats) -> None:
    t_prog = perf()
    hard_end = t_prog + args.minutes * 60 + HEADROOM_S - 5  # the alarm fires 5 s later
    fake_child, fake = hn.start_fake(tmp, "fake", args.pieces, args.rate, stamp=True)
    hn.check_fake(fake_child, fake)
    server, port, home = hn.start_prismd(tmp, fake, fake)
    res["fd_limit_server"] = list(server.ps.rlimit(psutil.RLIMIT_NOFILE))
    res["prismd_home"] = str(home)
    procs = {"prismd": server, "fake": fake_child}
    sampler = Sampler(server, port, stats, procs)
    res["_sampler"] = sampler  # for a partial report on SIGALRM (removed before writing)
    sampler.start()

    # Idle before the load: fresh (no turn yet), then after one warm-up turn (model client
    # built, SDK imported) once the RSS holds still.
    await hn.settle_rss(server)
    idle: dict[str, Any] = {"fresh": point(sampler, await sampler.get_health())}
    ws = await cl.ws_open(HOST, port)
    warm = await cl.chat_turn(ws, CHAT_HI, 60.0)
    await ws.close()
    if warm.error or warm.t_done is None:
        raise RuntimeError(f"warm-up turn failed: {warm.error}")
    await hn.wait_idle(port, 10.0)
    await hn.settle_rss(server, 10.0)
    idle["after_warmup_turn"] = point(sampler, await sampler.get_health())
    res["idle_before"] = idle

    print(f"opening {args.connections} connections ...", file=sys.stderr, flush=True)
    t_open = perf()
    conns, failed = await cl.open_many(lambda: cl.ws_open(HOST, port), args.connections)
    res["connect"] = {
        "opened": len(conns),
        "failed": failed,
        "seconds": round(perf() - t_open, 2),
    }
    soak = Soak(args, port, stats)
    soak.conns = set(conns)
    cpu = hn.Cpu(procs)
    stats.t0 = perf()  # the load phase starts: windows and sample times count from here
    soak.t_end = stats.t0 + args.minutes * 60
    # Reserve time after the drain for the idle watch and the report.
    soak.drain_deadline = min(
        soak.t_end + args.hang_s + args.late_s, hard_end - args.idle_wait - 15
    )
    print(
        f"load: {len(conns)} connections, {args.minutes} min, think {args.think_s} s ...",
        file=sys.stderr,
        flush=True,
    )
    seed = args.seed
    workers = [
        asyncio.ensure_future(soak.worker(ws, seed * 100_003 + i)) for i, ws in enumerate(conns)
    ]
    progress = asyncio.ensure_future(report_progress(stats, soak.t_end))
    pings: list[dict[str, Any]] = []
    prober = asyncio.ensure_future(ping_probe(port, pings))
    await asyncio.sleep(max(0.0, soak.t_end - perf()))
    t_load_end = perf()
    res["cpu_load_phase"] = cpu.done()
    snap_end = point(sampler, await sampler.get_health())

    # Drain: the turns in progress finish (bounded).
    print("drain ...", file=sys.stderr, flush=True)
    in_flight_at_end = stats.in_flight
    _, pending = await asyncio.wait(workers, timeout=max(1.0, soak.drain_deadline - perf()))
    stats.cut_at_deadline = stats.in_flight
    for w in pending:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    progress.cancel()
    prober.cancel()
    await asyncio.gather(prober, return_exceptions=True)
    t_drained = perf()
    worker_errors = [repr(w.exception()) for w in workers if not w.cancelled() and w.exception()]
    await cl.close_many(list(soak.conns))
    t_closed = perf()

    # Back to idle: wait (bounded) until the health counters are 0 and the fds are back to
    # their fresh idle value (session databases close 30-45 s after their last use).
    print("waiting for the server to go idle ...", file=sys.stderr, flush=True)
    base_fds = idle["fresh"].get("fds") or 0
    deadline = min(perf() + args.idle_wait, hard_end - 10)
    h: dict[str, Any] | None = None
    back_at = None
    while perf() < deadline:
        h = await sampler.get_health()
        fds = server.fds()
        if (
            h
            and not (h.get("connections") or h.get("liveSessions") or h.get("runningTurns"))
            and fds is not None
            and fds <= base_fds
        ):
            back_at = perf()
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(1.0)
    after = point(sampler, await sampler.get_health())
    after["waited_s"] = round(perf() - t_closed, 1)
    after["fds_back_to_fresh_idle"] = back_at is not None
    await sampler.stop()
    res.pop("_sampler", None)

    res["timeline"] = {
        "load_s": round(t_load_end - stats.t0, 1),
        "drain_s": round(t_drained - t_load_end, 1),
        "close_s": round(t_closed - t_drained, 1),
        "idle_wait_s": after["waited_s"],
        "total_s": round(perf() - t_prog, 1),
    }
    res["in_flight_at_load_end"] = in_flight_at_end
    res["end_of_load"] = snap_end
    res["idle_after"] = after
    res["worker_exceptions"] = worker_errors[:5]
    res.update(
        summarize(args, stats, sampler.samples, sampler.health, t_load_end - stats.t0, pings)
    )


async def report_progress(stats: Stats, t_end: float) -> None:
    while True:
        await asyncio.sleep(30)
        left = max(0, t_end - perf())
        print(
            f"  t={perf() - stats.t0:5.0f}s  started {stats.started}  completed {stats.completed}"
            f"  errors {sum(stats.errors.values())}  hung {stats.hung} (late {stats.late})"
            f"  in flight "
            f"{stats.in_flight}  ({left:.0f} s left)",
            file=sys.stderr,
            flush=True,
        )


# ------------------------------------------------------------------------------- summary


def summarize(
    args: argparse.Namespace,
    st: Stats,
    samples: list[dict[str, Any]],
    health: list[dict[str, Any]],
    load_s: float,
    pings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pings = pings or []
    for s in (*samples, *health, *pings):
        if "tp" in s:
            s["t"] = round(s.pop("tp") - st.t0, 3)
    out["turns"] = {
        "started": st.started,
        "completed": st.completed,
        "errors": sum(st.errors.values()),
        "errors_by_code": dict(st.errors),
        "hung": st.hung,
        "hung_finished_late": st.late,
        "hung_abandoned": st.abandoned,
        "cut_at_drain_deadline": st.cut_at_deadline,
        "unaccounted": st.started
        - st.completed
        - sum(st.errors.values())
        - st.hung
        - st.cut_at_deadline,
        "hang_s": args.hang_s,
        "anomalies": dict(st.anomalies),
        "turn_s_p50": round(pctl(st.turn_s, 50) or 0, 3) if len(st.turn_s) else None,
        "turn_s_p99": round(pctl(st.turn_s, 99) or 0, 3) if len(st.turn_s) else None,
        "turn_s_max": round(max(st.turn_s), 3) if len(st.turn_s) else None,
        "late_turn_s_max": round(max(st.late_turn_s), 3) if len(st.late_turn_s) else None,
        # The server's own view (done.latency of every turn that got a done): its turn time,
        # and what the client waited beyond it (chat frame waiting to be read + frames
        # waiting to be written).
        "server_turn_s_p50": rnd(pctl(st.server_total_s, 50)),
        "server_turn_s_p99": rnd(pctl(st.server_total_s, 99)),
        "server_first_token_s_p50": rnd(pctl(st.server_first_s, 50)),
        "server_first_token_s_p99": rnd(pctl(st.server_first_s, 99)),
        "beyond_server_turn_s_p50": rnd(pctl(st.delay_s, 50)),
        "beyond_server_turn_s_p99": rnd(pctl(st.delay_s, 99)),
        "turns_per_s": round(st.completed / load_s, 2) if load_s > 0 else None,
        "chunks": st.chunks,
        "chunks_per_s": round(st.chunks / load_s, 1) if load_s > 0 else None,
        "new_sessions": st.new_sessions,
        "new_session_failed": st.new_session_failed,
        "reconnects": st.reconnects,
        "reconnect_failed": st.reconnect_failed,
        "connections_lost": st.connections_lost,
    }
    # Per window, and overall (all chunks of all windows).
    win = []
    n_windows = max(st.windows) + 1 if st.windows else 0
    ping_win: dict[int, list[float]] = {}
    for x in pings:
        if x["ms"] is not None and x["t"] >= 0:
            ping_win.setdefault(int(x["t"] // WINDOW_S), []).append(x["ms"])
    for k in range(n_windows):
        w = st.windows.get(k, Window())
        win.append(
            {
                "t_start": k * WINDOW_S,
                "started": w.started,
                "completed": w.completed,
                "late": w.late,
                "abandoned": w.abandoned,
                "errors": sum(w.errors.values()),
                "ping_ms_p50": rnd(pctl(ping_win.get(k, []), 50), 1),
                "ping_ms_max": max(ping_win[k]) if ping_win.get(k) else None,
                "server_turn_s_p50": rnd(pctl(w.server_total, 50)),
                "beyond_server_turn_s_p50": rnd(pctl(w.delay, 50)),
                "chunks": len(w.lags),
                "lag_ms_p50": ms(pctl(w.lags, 50)),
                "lag_ms_p99": ms(pctl(w.lags, 99)),
                "first_ms_p50": ms(pctl(w.first, 50)),
                "first_ms_p99": ms(pctl(w.first, 99)),
            }
        )
    out["windows"] = win
    all_lags, all_first = array("d"), array("d")
    for w in st.windows.values():
        all_lags.extend(w.lags)
        all_first.extend(w.first)
    warm_s = WARMUP_FRACTION * load_s
    steady = [x for x in win if x["t_start"] >= warm_s and x["t_start"] + WINDOW_S <= load_s]
    worst = max(
        (x for x in win if x["lag_ms_p99"] is not None),
        key=lambda x: x["lag_ms_p99"],
        default=None,
    )
    worst_steady = max(
        (x for x in steady if x["lag_ms_p99"] is not None),
        key=lambda x: x["lag_ms_p99"],
        default=None,
    )
    out["lag"] = {
        "ms_p50": ms(pctl(all_lags, 50)),
        "ms_p99": ms(pctl(all_lags, 99)),
        "ms_max": ms(max(all_lags)) if len(all_lags) else None,
        "first_chunk_ms_p50": ms(pctl(all_first, 50)),
        "first_chunk_ms_p99": ms(pctl(all_first, 99)),
        "worst_window": worst and {k: worst[k] for k in ("t_start", "lag_ms_p50", "lag_ms_p99")},
        "worst_window_after_warmup": worst_steady
        and {k: worst_steady[k] for k in ("t_start", "lag_ms_p50", "lag_ms_p99")},
        "median_window_p99_after_warmup": hn.med(
            [x["lag_ms_p99"] for x in steady if x["lag_ms_p99"] is not None]
        ),
    }
    pl = [x["ms"] for x in pings if 0 <= x["t"] <= load_s]
    ok = [x for x in pl if x is not None]
    out["ping"] = {
        "count": len(pl),
        "failed": len(pl) - len(ok),
        "ms_p50": rnd(pctl(ok, 50), 1),
        "ms_p99": rnd(pctl(ok, 99), 1),
        "ms_max": max(ok) if ok else None,
    }
    out["ping_samples"] = pings
    # Memory: the fit over the load phase after the warm-up.
    pts = [s for s in samples if "rss_mb" in s and warm_s <= s["t"] <= load_s]
    mem: dict[str, Any] = {"warmup_s": round(warm_s, 1)}
    if pts:
        xs = [s["t"] / 60 for s in pts]
        ys = [s["rss_mb"] for s in pts]
        f = fit_line(xs, ys)
        mem["rss_mb_after_warmup"] = ys[0]
        mem["rss_mb_end_of_load"] = ys[-1]
        mem["rss_mb_max"] = max(s.get("rss_mb", 0) for s in samples)
        if f:
            mem["fit"] = {
                "intercept_mb": round(f[0], 2),
                "slope_mb_per_min": round(f[1], 3),
                "r2": round(f[2], 3),
                "points": len(xs),
            }
            mem["slope_mb_per_min"] = round(f[1], 3)
        half = [s for s in pts if s["t"] >= (warm_s + load_s) / 2]
        f2 = fit_line([s["t"] / 60 for s in half], [s["rss_mb"] for s in half])
        if f2:
            mem["slope_second_half_mb_per_min"] = round(f2[1], 3)
    loadpts = [s for s in samples if 0 <= s["t"] <= load_s]
    if loadpts:
        mem["fds_max"] = max(s.get("fds") or 0 for s in samples)
        mem["threads_max"] = max(s.get("threads") or 0 for s in samples)
        cpu = [s for s in loadpts if "cpu_s" in s]
        if len(cpu) > 1:
            dt = cpu[-1]["t"] - cpu[0]["t"]
            mem["server_cpu_pct_load"] = round(100 * (cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) / dt, 1)
            if "cpu_main_s" in cpu[0] and "cpu_main_s" in cpu[-1]:
                main = cpu[-1]["cpu_main_s"] - cpu[0]["cpu_main_s"]
                mem["server_cpu_pct_event_loop_thread"] = round(100 * main / dt, 1)
        mem["in_flight_mean_after_warmup"] = round(
            sum(s["in_flight"] for s in loadpts if s["t"] >= warm_s)
            / max(1, len([s for s in loadpts if s["t"] >= warm_s])),
            1,
        )
    hl = [h for h in health if 0 <= h["t"] <= load_s]
    if hl:
        ok = [h for h in hl if h["connections"] is not None]
        mem["health_max"] = {
            k: max((h[k] for h in ok), default=None)
            for k in ("connections", "liveSessions", "runningTurns")
        }
        mem["running_turns_mean_after_warmup"] = round(
            sum(h["runningTurns"] for h in ok if h["t"] >= warm_s)
            / max(1, len([h for h in ok if h["t"] >= warm_s])),
            1,
        )
        mem["health_ms_p50"] = round(pctl([h["ms"] for h in hl], 50) or 0, 1)
        mem["health_ms_max"] = max(h["ms"] for h in hl)
        mem["health_failed"] = len(hl) - len(ok)
    out["server"] = mem
    out["samples"] = samples
    out["health_samples"] = health
    return out


# ------------------------------------------------------------------------------- plots


def plot(res: dict[str, Any], outdir: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    o = res["options"]
    load_s = res["timeline"]["load_s"]
    warm_s = res["server"]["warmup_s"]
    title = (
        f"prismd soak: {o['connections']} connections, {o['minutes']} min, "
        f"{o['pieces']} pieces at {o['rate']:g}/s, think {o['think_s']:g} s"
    )
    made = []

    # Latency: lag per window, turns per window.
    win = res["windows"]
    for w in win:
        b = w.get("beyond_server_turn_s_p50")
        w["beyond_ms_p50"] = None if b is None else b * 1000
    tm = [(w["t_start"] + WINDOW_S / 2) / 60 for w in win]
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for key, label, style in (
        ("lag_ms_p50", "piece lag p50 (arrival - the fake's schedule)", "-"),
        ("lag_ms_p99", "piece lag p99", "-"),
        ("first_ms_p99", "first chunk after send, p99", ":"),
        ("beyond_ms_p50", "send->done beyond the server's own turn time, p50", "--"),
        ("ping_ms_max", "ping -> pong on an idle connection, max", "-."),
    ):
        xs = [t for t, w in zip(tm, win, strict=True) if w[key] is not None]
        ys = [w[key] for w in win if w[key] is not None]
        ax1.plot(xs, ys, style, marker=".", label=label)
    ax1.set_yscale("symlog", linthresh=10)
    ax1.set_ylabel("ms (symlog)")
    ax1.axhline(100, color="grey", lw=0.8, ls="--")
    ax1.text(0, 100, " 100 ms", va="bottom", fontsize=8, color="grey")
    ax1.legend(loc="best", fontsize=7, framealpha=0.7)
    ax1.set_title(title, fontsize=10)
    ax1.grid(alpha=0.3)
    bw = WINDOW_S / 60 * 0.8
    done = [w["completed"] for w in win]
    late = [w["late"] for w in win]
    bad = [w["errors"] + w["abandoned"] for w in win]
    ax2.bar(tm, done, width=bw, label=f"completed (done within {o['hang_s']:g} s)")
    if any(late):
        ax2.bar(tm, late, width=bw, bottom=done, color="orange", label="hung, finished late")
    if any(bad):
        bottom = [a + b for a, b in zip(done, late, strict=True)]
        ax2.bar(tm, bad, width=bw, bottom=bottom, color="red", label="errors + abandoned")
    ax2.set_ylabel(f"turns per {WINDOW_S:.0f} s")
    ax2.set_xlabel("minutes since the load started")
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.axvspan(0, warm_s / 60, color="orange", alpha=0.08, label="warm-up")
        ax.axvline(load_s / 60, color="grey", lw=0.8)
    ax2.legend(loc="best", fontsize=7, framealpha=0.7)
    fig.tight_layout()
    p = outdir / f"{prefix}-latency.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(str(p))

    # Memory: RSS with the fit, fds, health counters.
    sm = [s for s in res["samples"] if "rss_mb" in s]
    t = [s["t"] / 60 for s in sm]
    fig, (a1, a2, a3) = plt.subplots(
        3, 1, figsize=(10, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    a1.plot(t, [s["rss_mb"] for s in sm], lw=1, label="server RSS")
    fit = res["server"].get("fit")
    if fit:
        x0, x1 = warm_s / 60, load_s / 60
        a1.plot(
            [x0, x1],
            [fit["intercept_mb"] + fit["slope_mb_per_min"] * x for x in (x0, x1)],
            "r--",
            lw=1.5,
            label=f"fit after warm-up: {fit['slope_mb_per_min']:+.2f} MB/min (r² {fit['r2']:.2f})",
        )
    a1.set_ylabel("RSS MB")
    a1.legend(loc="lower right", fontsize=8)
    a1.set_title(title, fontsize=10)
    a2.plot(t, [s.get("fds") for s in sm], lw=1, color="tab:green", label="server open fds")
    a2.plot(t, [s.get("threads") for s in sm], lw=1, color="tab:purple", label="server threads")
    a2.set_yscale("symlog", linthresh=10)
    a2.set_ylabel("count (symlog)")
    a2.legend(loc="upper right", fontsize=8)
    hs = res["health_samples"]  # a failed or timed-out poll is a gap in the lines
    th = [h["t"] / 60 for h in hs]
    nan = float("nan")
    for key in ("connections", "liveSessions", "runningTurns"):
        ys = [nan if h[key] is None else h[key] for h in hs]
        a3.plot(th, ys, lw=1, marker=".", markersize=2, label=f"health {key}")
    a3.plot(
        t,
        [s.get("in_flight") for s in sm],
        lw=0.8,
        ls=":",
        color="black",
        label="client: turns in flight",
    )
    a3.set_ylabel("count")
    a3.set_xlabel("minutes since the load started (negative: idle before it)")
    a3.legend(loc="upper right", fontsize=8)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        ax.axvspan(0, warm_s / 60, color="orange", alpha=0.08)
        ax.axvline(0, color="grey", lw=0.8)
        ax.axvline(load_s / 60, color="grey", lw=0.8)
    fig.tight_layout()
    p = outdir / f"{prefix}-memory.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    made.append(str(p))
    return made


# ------------------------------------------------------------------------------- report


def fmt(v: Any) -> str:
    return hn.fmt(v)


def print_report(res: dict[str, Any]) -> None:
    p = print
    o, m, tu = res["options"], res["machine"], res.get("turns", {})
    p("=" * 78)
    p(f"prismd soak   {res['started']}")
    p(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB RAM, Python {m['python']}; "
        f"load average at start {m['loadavg_at_start']}"
    )
    src = res.get("source", {})
    p(
        f"prismd {src.get('prismd_version')} at {src.get('git_head')}"
        + (" + uncommitted changes in src/" if src.get("src_dirty") else "")
    )
    p(
        f"{o['connections']} connections, {o['minutes']} min, fake {o['pieces']} pieces at "
        f"{o['rate']:g}/s, think {o['think_s']:g} s (x0.5-1.5), new session every "
        f"{SESSION_EVERY} turns, hung after {o['hang_s']:g} s"
    )
    c = res.get("connect", {})
    p(f"connections opened {c.get('opened')} in {c.get('seconds')} s, failed {c.get('failed')}")
    tl = res.get("timeline", {})
    p(f"timeline s: {tl}")
    p("=" * 78)
    p(
        f"turns: started {tu.get('started')}, completed {tu.get('completed')}, errors "
        f"{tu.get('errors')} {tu.get('errors_by_code') or ''}, hung {tu.get('hung')} "
        f"(finished late {tu.get('hung_finished_late')}, abandoned {tu.get('hung_abandoned')}), "
        f"cut at the drain deadline {tu.get('cut_at_drain_deadline')}, unaccounted "
        f"{tu.get('unaccounted')}"
    )
    if tu.get("anomalies"):
        p(f"   anomalies: {tu['anomalies']}")
    p(
        f"   {tu.get('turns_per_s')} turns/s, {tu.get('chunks_per_s')} chunks/s; turn "
        f"send->done p50 {fmt(tu.get('turn_s_p50'))} s, p99 {fmt(tu.get('turn_s_p99'))} s, "
        f"max {fmt(tu.get('turn_s_max'))} s (ideal {o['pieces'] / o['rate']:.1f} s)"
    )
    p(
        f"   server's own turn time p50 {fmt(tu.get('server_turn_s_p50'))} s, p99 "
        f"{fmt(tu.get('server_turn_s_p99'))} s (first token p50 "
        f"{fmt(tu.get('server_first_token_s_p50'))} s); the client waited beyond it p50 "
        f"{fmt(tu.get('beyond_server_turn_s_p50'))} s, "
        f"p99 {fmt(tu.get('beyond_server_turn_s_p99'))} s"
    )
    p(
        f"   new sessions {tu.get('new_sessions')} (failed {tu.get('new_session_failed')}), "
        f"reconnects {tu.get('reconnects')} (failed attempts {tu.get('reconnect_failed')}), "
        f"connections lost {tu.get('connections_lost')}"
    )
    lg = res.get("lag", {})
    p(
        f"lag ms (arrival - the fake's schedule, every piece): p50 {fmt(lg.get('ms_p50'))}, p99 "
        f"{fmt(lg.get('ms_p99'))}, max {fmt(lg.get('ms_max'))}; worst window "
        f"{lg.get('worst_window')}; worst after warm-up {lg.get('worst_window_after_warmup')}"
    )
    p(
        f"   first chunk after the send: p50 {fmt(lg.get('first_chunk_ms_p50'))}, "
        f"p99 {fmt(lg.get('first_chunk_ms_p99'))}"
    )
    pg = res.get("ping")
    if pg:
        p(
            f"   ping->pong on an extra idle connection (no store on its path): p50 "
            f"{fmt(pg['ms_p50'])} ms, p99 {fmt(pg['ms_p99'])} ms, max {fmt(pg['ms_max'])} ms, "
            f"failed {pg['failed']}/{pg['count']}"
        )
    sv = res.get("server", {})
    p(
        f"server: RSS after warm-up {fmt(sv.get('rss_mb_after_warmup'))} MB, end of load "
        f"{fmt(sv.get('rss_mb_end_of_load'))} MB, max {fmt(sv.get('rss_mb_max'))} MB; slope "
        f"{fmt(sv.get('slope_mb_per_min'))} MB/min (r2 {(sv.get('fit') or {}).get('r2')}; "
        f"second half {fmt(sv.get('slope_second_half_mb_per_min'))} MB/min)"
    )
    p(
        f"   fds max {sv.get('fds_max')}, threads max {sv.get('threads_max')}, health max "
        f"{sv.get('health_max')}, CPU {sv.get('server_cpu_pct_load')}% during the load "
        f"({sv.get('server_cpu_pct_event_loop_thread')}% on the event loop's thread); "
        f"turns in flight (client) mean {sv.get('in_flight_mean_after_warmup')}, runningTurns "
        f"mean {sv.get('running_turns_mean_after_warmup')}; /api/health p50 "
        f"{sv.get('health_ms_p50')} ms, max {sv.get('health_ms_max')} ms"
    )
    cp = res.get("cpu_load_phase")
    if cp:
        p(
            f"   cpu s over the load: server {cp['prismd']:.0f}, fake {cp['fake']:.0f}, client "
            f"{cp['client']:.0f}, other processes {cp['other']:.0f} (wall {cp['wall']:.0f})"
        )
    ib, ia, el = res.get("idle_before", {}), res.get("idle_after", {}), res.get("end_of_load", {})

    def row(label: str, d: dict[str, Any]) -> None:
        h = d.get("health") or {}
        p(
            f"   {label:30}{fmt(d.get('rss_mb')):>8}{fmt(d.get('fds')):>7}"
            f"{fmt(d.get('threads')):>9}{fmt(h.get('connections')):>7}"
            f"{fmt(h.get('liveSessions')):>7}{fmt(h.get('runningTurns')):>8}"
        )

    p(f"   {'':30}{'RSS MB':>8}{'fds':>7}{'threads':>9}{'conns':>7}{'live':>7}{'turns':>8}")
    if ib.get("fresh"):
        row("idle before, fresh", ib["fresh"])
    if ib.get("after_warmup_turn"):
        row("idle before, after 1 turn", ib["after_warmup_turn"])
    if el:
        row("end of the load", el)
    if ia:
        row(f"idle after (+{ia.get('waited_s')} s)", ia)
    lgs = res.get("server_log")
    if lgs:
        p(f"server log: {lgs['warnings']} WARNING, {lgs['errors']} ERROR/Traceback lines")
        for line in lgs["samples"]:
            p(f"   | {line[:150]}")
    if res.get("worker_exceptions"):
        p(f"client worker exceptions: {res['worker_exceptions']}")
    if res.get("plots"):
        p(f"plots: {', '.join(res['plots'])}")
    p(f"JSON: {res['json']}")


# ------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument(
        "--turns-per-connection", type=int, default=0, help="0 = keep going until time is up"
    )
    ap.add_argument("--pieces", type=int, default=200, help="pieces per answer (fake model)")
    ap.add_argument("--rate", type=float, default=50.0, help="pieces per second (fake model)")
    ap.add_argument("--think-s", type=float, default=1.0, help="mean pause between turns")
    ap.add_argument("--hang-s", type=float, default=60.0, help="a turn without done is hung")
    ap.add_argument(
        "--late-s", type=float, default=30.0, help="extra wait for a hung turn to finish"
    )
    ap.add_argument(
        "--idle-wait", type=float, default=50.0, help="max wait for idle after the drain"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--server-nofile", type=int, metavar="N", help="run prismd with soft = hard fd limit N"
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S s until other processes use < 10%% of the CPU",
    )
    ap.add_argument("--out", default=str(hn.ROOT / "bench" / "soak.json"))
    ap.add_argument("--plots", metavar="DIR", help="write PREFIX-latency.png, PREFIX-memory.png")
    ap.add_argument("--plot-prefix", default="soak")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, homes)")
    args = ap.parse_args()
    hn.SERVER_NOFILE = args.server_nofile
    quiet = hn.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None

    stats = Stats()
    res: dict[str, Any] = {
        "quiet_wait": quiet,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "options": {
            k: getattr(args, k)
            for k in (
                "connections",
                "minutes",
                "turns_per_connection",
                "pieces",
                "rate",
                "think_s",
                "hang_s",
                "late_s",
                "idle_wait",
                "seed",
                "server_nofile",
            )
        },
        "machine": hn.machine(),
        "source": hn.source(),
        "fd_limit_client": list(hn.raise_nofile()),
        "json": args.out,
    }
    tmp_obj = tempfile.TemporaryDirectory(prefix="prismd-soak-")
    tmp = Path(tmp_obj.name)

    def write(final: dict[str, Any]) -> None:
        final.pop("_sampler", None)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(final, indent=1, default=str) + "\n")

    def on_stop(signum: int) -> None:  # the children are already stopped
        sampler = res.get("_sampler")
        res["failure"] = f"stopped by signal {signum}"
        print(f"partial results in {args.out}", file=sys.stderr)
        if sampler is not None:
            load_s = min(perf() - stats.t0, args.minutes * 60)
            res.update(summarize(args, stats, sampler.samples, sampler.health, load_s))
        write(res)
        shutil.rmtree(tmp, ignore_errors=True)

    hn.install_deadline(int(math.ceil(args.minutes * 60)) + HEADROOM_S, on_stop)
    rc = 0
    try:
        hn.run_async(run(args, res, tmp, stats))
    except Exception as exc:  # noqa: BLE001
        res["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"soak failed: {res['failure']}", file=sys.stderr)
        rc = 1
    finally:
        signal.alarm(0)
        logs = {c.name: c for c in hn.CHILDREN}
        hn.stop_children()
        if "prismd" in logs:
            res["server_log"] = hn.scan_log(logs["prismd"].output())
        if args.keep_tmp:
            kept = Path(tempfile.mkdtemp(prefix="prismd-soak-kept-"))
            subprocess.run(["cp", "-r", str(tmp) + "/.", str(kept)], check=False)
            res["kept_tmp"] = str(kept)
        tmp_obj.cleanup()
    if args.plots and "timeline" in res:
        try:
            res["plots"] = plot(res, Path(args.plots), args.plot_prefix)
        except Exception as exc:  # noqa: BLE001 - the figures are still in the JSON
            print(f"plotting failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    write(res)
    if "turns" in res:
        print_report(res)
    return rc


if __name__ == "__main__":
    sys.exit(main())
