"""Load benchmark for prismd: every figure beside its direct floor, on the machine at hand.

    .venv/bin/python bench/load.py                  # full run (make bench): ~3 min (*)
    .venv/bin/python bench/load.py --quick          # smoke run: ~20 s
    .venv/bin/python bench/load.py --runs 3 --wait-quiet 120 --out bench/results.json
    .venv/bin/python bench/load.py --phases streams --streams 300 --py-spy streams:300
    .venv/bin/python bench/load.py --scale-out      # and 2 workers on PostgreSQL + Redis: ~3 min
    .venv/bin/python bench/load.py --quick --scale-out                          # ~1 min

It starts, on 127.0.0.1 only, two fake OpenAI-compatible models, each in a process of its own
(`prismd.testing.fake_models`): fake A answers 20 pieces at once (turns and bursts), fake B
answers pieces at 50 per second, each answer stamped with its schedule origin (streams). Then
prismd with a fresh temporary PRISMD_HOME: its default provider at fake A, an agent `streamer`
at fake B. This process is the client for every row, prismd's and the direct ones:

  prismd   a WebSocket per connection to /ws; `chat` frames; reads to `done`.
  direct   the same streamed request sent straight to the fake model over a keep-alive
           HTTP/1.1 connection, read to its end. This is the floor: what the client and the
           fake model cost without prismd between them.

Both clients (bench/_client.py) are written on plain asyncio protocols, the leanest this bench
could make: measured against aiohttp and the `websockets` client under 50-pieces/s streams,
they use about half the client CPU per piece (HTTP 9-11 us against aiohttp's 20; WebSocket
8-9 us against websockets' 18), which leaves more of the 2 cores to prismd and the fake. Phase
1 also times aiohttp, for comparison.

Phases (`--phases`, default all):

  overhead  Sequential turns, `done` (and first chunk) median and p95 from the send: prismd
            with a new session per turn, against the direct request; and prismd in one
            session whose history grows, against direct requests carrying the same history.
            The series run in interleaved blocks; CPU per turn per process is per series.
  bursts    N chats sent at once (N = 10, 100, 300, 1000), each a new session on its own
            connection; the connections are opened before the clock starts. All complete?
            wall time (first send to last `done`), turns/s; against N direct requests sent at
            once, each on its own pre-opened connection. prismd's RSS is sampled throughout.
  streams   R concurrent streams (R = 100, 300, 500) of 200 pieces at 50 pieces/s. The lag
            of a piece is its arrival time minus the time the fake model scheduled it (the
            fake stamps each answer's origin on the machine's monotonic clock); every piece
            counts, also those merged into one chunk frame. First chunk from the send.
            Against R direct streams, measured the same way.
  memory    prismd's RSS when idle after start (settled: steady for 1.5 s), and its peak
            during each burst and each stream count (sampled every 25 ms in a thread).

Every row reports the CPU seconds used by prismd, the fake models, this client and everything
else on the machine (`other`: other people's processes, which skew the figures), so the report
shows who is the bottleneck. At the end, a verdict per target of issue 9, also in the JSON.

`--scale-out` (issue 10) runs, after the embedded run (one process on SQLite), the same phases
against `prismd serve --workers 2` on a throwaway PostgreSQL and Redis (prismd.testing's, on
127.0.0.1; the same fakes and client), and reports beside the phase tables, for every prismd
row (first send to last `done`) and every phase, per turn and per streamed chunk:

  Redis       commands (INFO commandstats before and after: total, and PUBLISH, SUBSCRIBE...),
              their microseconds, bytes in and out;
  PostgreSQL  statements executed in prismd's database (pg_stat_statements, preloaded in the
              throwaway cluster: total and per kind, INSERT, SELECT, BEGIN...; rows written;
              execution time), transactions that wrote (transaction ids handed out), and
              pg_stat_database (xact_commit, tup_inserted/updated/deleted...) per phase;
  CPU         of the workers (together and each), of PostgreSQL (postmaster and backends,
              ended ones too) and of redis-server;

net of the deployment's idle background (lease reaper, heartbeats), measured while the bench
waits for PostgreSQL to publish its statistics after each phase (10.5 s: see hn.Ops); and the
marginal cost of a turn and of a chunk (solved from the bursts and the streams). Its verdict:
2 workers no worse than one embedded process (see NO_WORSE_RATIO).

(*) 170 s with the prismd of 3af549b on this 2-core machine at load average 8.6, most of
it the 1000 burst (71 s) and the 300 and 500 streams (19 s each), which shrink as prismd gets
faster; the direct rows take under 5 s each.

`--runs K` repeats everything K times (fresh processes each time) and reports medians with
[min-max]. Everything is bounded: a hard deadline (SIGALRM) stops the children and writes
partial results; so do SIGINT and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _client as cl  # noqa: E402
import _harness as hn  # noqa: E402
from _harness import HOST, PIECE, fmt, mb, med, ms, pct  # noqa: E402

PATH = b"/v1/chat/completions"
TURN_PIECES = 20  # fake A: pieces per answer, no delay
STREAM_RATE = 50.0  # fake B: pieces per second
WORKERS = 2  # --scale-out: prismd serve --workers 2
PHASES = ("overhead", "bursts", "streams")
CHAT_HI = json.dumps({"type": "chat", "message": "hi"})
CHAT_STREAM = json.dumps({"type": "chat", "message": "hi", "agentId": hn.STREAM_AGENT})


@dataclass
class Config:
    turns: int
    warmup: int
    blocks: int
    bursts: list[int]
    streams: list[int]
    stream_pieces: int
    deadline_s: int  # per run
    # --scale-out: pg_stat_database read per phase, or once over the run (each reading waits
    # hn.Ops.PG_FLUSH_S; --quick saves two of those waits)
    pg_database_per_phase: bool = True


FULL = Config(
    turns=60, warmup=5, blocks=6, bursts=[10, 100, 300, 1000], streams=[100, 300, 500],
    stream_pieces=200, deadline_s=600,
)  # fmt: skip
QUICK = Config(
    turns=12, warmup=3, blocks=3, bursts=[10, 100], streams=[50],
    stream_pieces=50, deadline_s=180, pg_database_per_phase=False,
)  # fmt: skip

# issue 9, "What to reach" (all in one run, each beside its direct floor)
TARGETS = {
    "overhead_ms": 2.0,  # prismd done median - direct done median
    "burst_1000_ratio": 3.0,  # prismd wall / direct wall, all complete
    "streams_300_p99_ms": 150.0,
    "streams_500_p99_ms": 300.0,  # and all complete
    "streams_500_first_p95_ms": 500.0,
    "idle_rss_mb": 80.0,
    "burst_peak_rss_mb": 250.0,
}


def system_prompt() -> str:
    try:
        from prismd.config import DEFAULT_SYSTEM_PROMPT
    except ImportError:  # moved: the direct request is then a little smaller than prismd's
        return "You are a helpful assistant."
    return DEFAULT_SYSTEM_PROMPT


def request_body(messages: list[dict[str, str]]) -> bytes:
    return json.dumps(
        {
            "model": hn.MODEL,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def port_of(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


# ------------------------------------------------------------------------------- summaries


def cpu_add(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    if a is None:
        return dict(b)
    return {k: round(a.get(k, 0.0) + v, 3) for k, v in b.items()}


def summarize_seq(results: list[cl.TurnResult], cpu: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.t_done is not None and r.t_first]
    first = [r.t_first - r.t_send for r in ok]  # type: ignore[operator]
    done = [r.t_done - r.t_send for r in ok]  # type: ignore[operator]
    n = max(1, len(results))
    out: dict[str, Any] = {
        "turns": len(results),
        "ok": len(ok),
        "errors": sorted({r.error for r in results if r.error}),
        "chunks_per_turn": med([r.chunks for r in ok]),
        "chunks": sum(r.chunks for r in results),
        "first_ms_p50": ms(med(first)),
        "first_ms_p95": ms(pct(first, 95)),
        "done_ms_p50": ms(med(done)),
        "done_ms_p95": ms(pct(done, 95)),
        "done_ms_min": ms(min(done) if done else None),
        "cpu_s": cpu,
        "cpu_ms_per_turn": {
            k: round(cpu[k] / n * 1000, 3)
            for k in ("prismd", "postgres", "redis", "fake", "fake_streams", "client")
            if k in cpu
        },
    }
    lat = [r.latency for r in ok if r.latency]
    if lat:  # prismd's own view (done.latency, from the turn's start)
        out["server_latency_ms_p50"] = {
            k: med([x[k] for x in lat if isinstance(x.get(k), (int, float))])
            for k in ("firstTokenMs", "llmMs", "totalMs")
            if any(isinstance(x.get(k), (int, float)) for x in lat)
        }
    return out


def compare(p: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("done_ms_p50", "done_ms_p95", "first_ms_p50"):
        a, b = p.get(key), d.get(key)
        if a is not None and b is not None:
            out[key.replace("_ms_", "_diff_ms_")] = round(a - b, 3)
            out[key.replace("_ms_", "_ratio_")] = round(a / b, 2) if b else None
    return out


def summarize_concurrent(
    results: list[cl.TurnResult],
    n: int,
    connect_failed: int,
    connect_s: float,
    cpu: dict[str, float],
    lags: array | None = None,
    pieces: int | None = None,
) -> dict[str, Any]:
    done_ok = [r for r in results if r.t_done is not None and r.error is None]
    complete = [r for r in done_ok if pieces is None or r.pieces == pieces]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None or r.t_done is None:
            key = r.error or "no_done"
            errors[key] = errors.get(key, 0) + 1
    if connect_failed:
        errors["connect_failed"] = connect_failed
    done_lat = [r.t_done - r.t_send for r in done_ok]  # type: ignore[operator]
    first_lat = [r.t_first - r.t_send for r in results if r.t_first is not None]
    out: dict[str, Any] = {
        "n": n,
        "completed": len(complete),
        "all_complete": len(complete) == n,
        "chunks": sum(r.chunks for r in results),
        "errors": errors,
        "stop_reasons": dict(Counter(r.stop_reason for r in done_ok if r.stop_reason)),
        "connect_s": round(connect_s, 2),
        "first_ms_p50": ms(pct(first_lat, 50), 1),
        "first_ms_p95": ms(pct(first_lat, 95), 1),
        "done_ms_p50": ms(pct(done_lat, 50), 1),
        "done_ms_p95": ms(pct(done_lat, 95), 1),
        "done_ms_max": ms(max(done_lat) if done_lat else None, 1),
    }
    if done_ok:
        t0 = min(r.t_send for r in results)
        wall = max(r.t_done or 0.0 for r in done_ok) - t0
        out["wall_s"] = round(wall, 4)
        out["turns_per_s"] = round(len(done_ok) / wall, 1) if wall > 0 else None
        out["send_spread_ms"] = ms(max(r.t_send for r in results) - t0, 1)
    if lags is not None:
        out["pieces"] = len(lags)
        out["pieces_expected"] = n * (pieces or 0)
        out["lag_ms_p50"] = ms(pct(lags, 50), 1)
        out["lag_ms_p99"] = ms(pct(lags, 99), 1)
        out["lag_ms_max"] = ms(max(lags) if lags else None, 1)
    out["cpu_s"] = cpu
    return out


# ------------------------------------------------------------------------------- one run


class Run:
    """One run: fresh fakes and prismd, the chosen phases, everything stopped at the end.
    This one measures the embedded deployment (one process on SQLite); ScaleOutRun the same
    phases against `prismd serve --workers 2` on PostgreSQL + Redis."""

    config = "embedded"

    def __init__(
        self, args: argparse.Namespace, cfg: Config, tmp: Path, res: dict[str, Any], index: int
    ) -> None:
        self.args, self.cfg, self.tmp, self.res = args, cfg, tmp, res
        self.index = index
        self.profiled: dict[str, Any] | None = None
        self.detail: dict[str, hn.Procs] = {}  # parts measured on their own (the workers)
        self.workers: list[int] | None = None  # --workers N: the worker pids
        self.ops: hn.Ops | None = None  # scale-out: Redis and PostgreSQL operation counters
        # per phase, the turns (and their chunks) outside the measured rows: warm-ups
        self.warmup_turns: dict[str, int] = {}
        self.warmup_chunks: dict[str, int] = {"overhead": 0, "streams": 0}

    # -- set-up

    async def start(self) -> None:
        tmp = self.tmp
        self.fake_a, url_a = hn.start_fake(tmp, "fake", TURN_PIECES, 0)
        self.fake_b, url_b = hn.start_fake(
            tmp, "fake_streams", self.cfg.stream_pieces, STREAM_RATE, stamp=True
        )
        hn.check_fake(self.fake_a, url_a)
        hn.check_fake(self.fake_b, url_b)
        self.port_a, self.port_b = port_of(url_a), port_of(url_b)
        t_start = hn.perf()
        await self.start_server(url_a, url_b)
        self.res["prismd_start_s"] = round(hn.perf() - t_start, 2)
        server_ps = psutil.Process(self.server.workers[0])
        self.res["fd_limit_server"] = list(server_ps.rlimit(psutil.RLIMIT_NOFILE))
        self.sampler = hn.RssSampler(self.mem).start()
        system = {"role": "system", "content": system_prompt()}
        self.system = system
        self.body_hi = request_body([system, {"role": "user", "content": "hi"}])

    async def start_server(self, url_a: str, url_b: str) -> None:
        self.server, self.port, _ = hn.start_prismd(self.tmp, url_a, url_b)
        self.mem: hn.Child | hn.Procs = self.server  # whose memory is measured
        self.procs: dict[str, hn.Child | hn.Procs] = {
            "prismd": self.server,
            "fake": self.fake_a,
            "fake_streams": self.fake_b,
        }

    async def stop(self) -> None:
        self.sampler.stop()

    def cpu(self) -> hn.Cpu:
        return hn.Cpu(self.procs, self.detail)

    async def wait_idle(self, wait_s: float = 30.0) -> dict[str, Any]:
        return await hn.wait_idle(self.port, wait_s, self.workers)

    # -- Redis and PostgreSQL operations (scale-out only; nothing for the embedded run)

    async def counters(self) -> dict[str, Any] | None:
        return await self.ops.counters() if self.ops is not None else None

    async def add_ops(self, into: dict[str, Any], before: dict[str, Any] | None) -> None:
        """Adds the operations since `before` (from counters()) to into["ops"]."""
        if before is not None:
            into["ops"] = hn.ops_sum(into.get("ops"), hn.delta(await self.counters(), before))

    async def phase_end(self, phase: str) -> None:
        """After a phase (scale-out: PostgreSQL's statistics settle, the idle background)."""

    def conns_per_worker(self) -> list[int] | None:
        return None

    def profile_here(self, label: str) -> hn.Profiler | None:
        if self.args.py_spy != label or self.profiled is not None or self.index > 0:
            return None  # the first run only
        out = Path(self.args.py_spy_out or hn.ROOT / "bench" / f"profile-{label.replace(':', '')}")
        if out.suffix != ".json":
            out = out.with_name(out.name + ".speedscope.json")
        prof = hn.Profiler(self.server.pid, out)
        if not prof.available():
            raise RuntimeError(f"--py-spy: {prof.exe} not found (pip install py-spy, dev extra)")
        self.profiled = {"phase": label, "file": str(out)}
        prof.start()
        return prof

    def profile_done(self, prof: hn.Profiler | None) -> None:
        if prof is None:
            return
        prof.stop()
        assert self.profiled is not None
        self.profiled.update(prof.top())

    # -- memory

    async def idle_memory(self) -> dict[str, Any]:
        rss = await hn.settle_rss(self.mem)
        return {
            "idle_mb": mb(rss),
            "idle_fds": self.mem.fds(),
            "threads": self.mem.threads(),
        }

    # -- phase 1

    async def phase_overhead(self) -> dict[str, Any]:
        cfg = self.cfg
        user = {"role": "user", "content": "hi"}
        answer = {"role": "assistant", "content": PIECE * TURN_PIECES}
        history: list[dict[str, str]] = [self.system]  # grows like the session's
        pool = cl.HTTPPool(HOST, self.port_a)
        ws_new = await cl.ws_open(HOST, self.port)  # a new session for every turn
        ws_same = await cl.ws_open(HOST, self.port)  # one session for all turns
        per_worker = self.conns_per_worker()
        aio: Any = None
        try:
            import aiohttp

            aio = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        except ImportError:
            pass
        url_a = f"http://{HOST}:{self.port_a}/v1/chat/completions"

        async def direct() -> cl.TurnResult:
            return await cl.direct_turn(await pool.get(), PATH, self.body_hi, 15.0)

        async def direct_aiohttp() -> cl.TurnResult:
            return await cl.aiohttp_turn(aio, url_a, self.body_hi, 15.0)

        async def prismd_new() -> cl.TurnResult:
            r = await cl.chat_turn(ws_new, CHAT_HI, 15.0)
            await cl.new_session(ws_new)
            return r

        async def direct_history() -> cl.TurnResult:
            body = request_body([*history, user])
            r = await cl.direct_turn(await pool.get(), PATH, body, 15.0)
            history.extend((user, answer))
            return r

        async def prismd_same() -> cl.TurnResult:
            return await cl.chat_turn(ws_same, CHAT_HI, 15.0)

        series: dict[str, Callable[[], Awaitable[cl.TurnResult]]] = {
            "direct": direct,
            "prismd": prismd_new,
            "direct_history": direct_history,
            "prismd_same_session": prismd_same,
        }
        if aio is not None:
            series["direct_aiohttp"] = direct_aiohttp
        out: dict[str, Any] = {}
        try:
            # Warm-up: prismd imports the SDK on its first turn; connections get pooled.
            for i in range(cfg.warmup):
                for name, fn in series.items():
                    t0 = hn.perf()
                    r = await fn()
                    if "prismd" in name:
                        self.warmup_chunks["overhead"] += r.chunks
                    if i == 0 and name == "prismd" and r.t_done:
                        out["cold_first_turn_ms"] = ms(hn.perf() - t0, 1)
                    if r.error:
                        raise RuntimeError(f"warm-up turn {name} failed: {r.error}")
            results: dict[str, list[cl.TurnResult]] = {k: [] for k in series}
            cpu: dict[str, dict[str, float] | None] = dict.fromkeys(series)
            ops: dict[str, dict[str, Any]] = {k: {} for k in series}
            per_block = math.ceil(cfg.turns / cfg.blocks)
            prof = self.profile_here("overhead")
            for _ in range(cfg.blocks):  # interleaved, so drift on the machine hits all alike
                for name, fn in series.items():
                    before = await self.counters() if name.startswith("prismd") else None
                    c = self.cpu()
                    for _ in range(per_block):
                        results[name].append(await fn())
                        await asyncio.sleep(0.01)
                    cpu[name] = cpu_add(cpu[name], c.done())
                    await self.add_ops(ops[name], before)
            self.profile_done(prof)
        finally:
            await cl.close_many([ws_new, ws_same])
            await pool.close()
            if aio is not None:
                await aio.close()
        for name in series:
            out[name] = summarize_seq(results[name], cpu[name] or {})
            out[name].update(ops[name])
        self.warmup_turns["overhead"] = cfg.warmup * sum(1 for k in series if "prismd" in k)
        if per_worker is not None:
            out["connections_per_worker"] = per_worker
        out["vs_direct"] = compare(out["prismd"], out["direct"])
        out["same_session_vs_direct_history"] = compare(
            out["prismd_same_session"], out["direct_history"]
        )
        return out

    # -- phases 2 and 3

    async def concurrent(
        self,
        n: int,
        *,
        stream: bool,
        profile: str | None = None,
        rss_label: str | None = None,
    ) -> dict[str, Any]:
        """n requests at once, direct then through prismd, each on a connection of its own
        opened before the clock starts."""
        cfg = self.cfg
        pieces = cfg.stream_pieces if stream else None
        ideal = (cfg.stream_pieces / STREAM_RATE) if stream else 0.0
        wait_s = ideal + 30.0 + n * 0.12  # generous: a loaded machine is slow, not wrong
        row: dict[str, Any] = {}

        # direct
        port = self.port_b if stream else self.port_a
        body = request_body(
            [self.system, {"role": "user", "content": "hi"}]
        )  # the same body for both fakes
        t_open = hn.perf()
        conns, failed = await cl.open_many(lambda: cl.http_connect(HOST, port), n)
        connect_s = hn.perf() - t_open
        lags = array("d") if stream else None
        c = self.cpu()
        results = await asyncio.gather(
            *(
                cl.direct_turn(
                    conn,
                    PATH,
                    body,
                    wait_s,
                    schedule=cl.Schedule(STREAM_RATE, len(PIECE), lags)
                    if lags is not None
                    else None,
                )
                for conn in conns
            )
        )
        cpu = c.done()
        await cl.close_many(conns)
        row["direct"] = summarize_concurrent(results, n, failed, connect_s, cpu, lags, pieces)

        # prismd
        if rss_label:
            self.sampler.label = rss_label
        t_open = hn.perf()
        conns, failed = await cl.open_many(lambda: cl.ws_open(HOST, self.port), n)
        connect_s = hn.perf() - t_open
        lags = array("d") if stream else None
        frame = CHAT_STREAM if stream else CHAT_HI
        prof = self.profile_here(profile) if profile else None
        per_worker = self.conns_per_worker()
        before = await self.counters()
        c = self.cpu()
        results = await asyncio.gather(
            *(
                cl.chat_turn(
                    ws,
                    frame,
                    wait_s,
                    wait_usage=False,
                    schedule=cl.Schedule(STREAM_RATE, len(PIECE), lags)
                    if lags is not None
                    else None,
                )
                for ws in conns
            )
        )
        cpu = c.done()
        self.profile_done(prof)
        ops: dict[str, Any] = {}
        await self.add_ops(ops, before)
        await cl.close_many(conns)
        idle = await self.wait_idle(60.0)
        self.sampler.label = None
        p = row["prismd"] = summarize_concurrent(results, n, failed, connect_s, cpu, lags, pieces)
        p.update(ops)
        if per_worker is not None:
            p["connections_per_worker"] = per_worker
        p["running_turns_after"] = idle.get("runningTurns")
        if rss_label:
            p["rss_peak_mb"] = mb(self.sampler.peaks.get(rss_label))
        d = row["direct"]
        if p.get("wall_s") and d.get("wall_s"):
            row["wall_ratio"] = round(p["wall_s"] / d["wall_s"], 2)
        if stream and p.get("lag_ms_p99") is not None and d.get("lag_ms_p99") is not None:
            row["lag_p99_diff_ms"] = round(p["lag_ms_p99"] - d["lag_ms_p99"], 1)
        await asyncio.sleep(0.3)
        return row

    async def phase_bursts(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in self.cfg.bursts:
            print(f"  bursts {n} ...", file=sys.stderr, flush=True)
            out[str(n)] = await self.concurrent(
                n, stream=False, profile=f"bursts:{n}", rss_label=f"burst{n}"
            )
        return out

    async def phase_streams(self) -> dict[str, Any]:
        # One warm-up stream: the second provider's client is built on its first turn.
        ws = await cl.ws_open(HOST, self.port)
        warm = await cl.chat_turn(ws, CHAT_STREAM, 60.0)
        await ws.close()
        if warm.error:
            raise RuntimeError(f"stream warm-up failed: {warm.error}")
        self.warmup_turns["streams"] = 1
        self.warmup_chunks["streams"] = warm.chunks
        out: dict[str, Any] = {}
        for r in self.cfg.streams:
            print(f"  streams {r} ...", file=sys.stderr, flush=True)
            out[str(r)] = await self.concurrent(
                r, stream=True, profile=f"streams:{r}", rss_label=f"streams{r}"
            )
        return out

    # -- all

    async def run(self) -> None:
        res = self.res
        t0 = hn.perf()
        await self.start()
        try:
            phases = self.args.phases
            res["memory"] = await self.idle_memory()
            if "overhead" in phases:
                print(f"  overhead ({self.config}) ...", file=sys.stderr, flush=True)
                res["overhead"] = await self.phase_overhead()
                await self.wait_idle()
                res["memory"]["after_overhead_mb"] = mb(await hn.settle_rss(self.mem, 5.0))
                await self.phase_end("overhead")
            if "bursts" in phases:
                res["bursts"] = await self.phase_bursts()
                peaks = {k: v["prismd"].get("rss_peak_mb") for k, v in res["bursts"].items()}
                res["memory"]["burst_peak_mb"] = peaks
                await self.phase_end("bursts")
            if "streams" in phases:
                res["streams"] = await self.phase_streams()
                await self.phase_end("streams")
            res["memory"]["end_mb"] = mb(await hn.settle_rss(self.mem, 5.0))
            res["memory"]["fds_peak"] = self.sampler.fds_peak
            try:
                if self.workers is None:
                    res["server_after"] = await hn.health(self.port)
                else:
                    res["server_after"] = await hn.healths(self.port, self.workers)
            except Exception as exc:  # noqa: BLE001
                res["server_after"] = f"health failed: {exc}"
            if self.profiled is not None:
                res["profile"] = self.profiled
            res["costs"] = costs(res)
        finally:
            await self.stop()
        res["run_s"] = round(hn.perf() - t0, 1)


class ScaleOutRun(Run):
    """The same phases against `prismd serve --workers 2` on a throwaway PostgreSQL and Redis,
    with what each prismd row asks of them (hn.Ops, from its first send to its last `done`)
    and the CPU of every process: the workers (also each on its own), PostgreSQL's (postmaster,
    backends), redis-server.

    PostgreSQL publishes a backend's pg_stat_database counters up to 10 s late (hn.Ops), so
    after each phase the bench waits hn.Ops.PG_FLUSH_S before reading them: consecutive phase
    windows (warm-ups, connections opened and closed, direct rows and the wait included) that
    count every transaction once. The wait is also the idle window: what the deployment does
    on its own per second (lease reaper, limit heartbeats), subtracted from the per-turn
    figures."""

    config = "scale_out"
    IDLE_AFTER_S = 1.0  # the idle window starts this long into the wait (connections closing)

    async def start_server(self, url_a: str, url_b: str) -> None:
        so = hn.start_scale_out(self.tmp, url_a, url_b, WORKERS)
        self.server, self.port, self.workers = so.server, so.port, so.workers
        self.mem = hn.Procs("workers", so.workers)
        self.procs = {
            "prismd": hn.Procs("prismd", [so.server.pid], tree=True),  # supervisor + workers
            "fake": self.fake_a,
            "fake_streams": self.fake_b,
            "postgres": hn.Procs("postgres", [so.pg.postmaster_pid()], tree=True),
            "redis": hn.Procs("redis", [so.redis.proc.pid]),
        }
        self.detail = {f"worker{i}": hn.Procs(f"w{i}", [pid]) for i, pid in enumerate(so.workers)}
        self.ops = hn.Ops(so.redis.url, so.pg.url(), so.database_url)
        await self.ops.open(so.statements)
        self.res["deployment"] = {
            "workers": len(so.workers),
            **self.ops.versions,
            "pg_stat_statements": self.ops.has_statements,
        }
        self.res["idle"], self.res["pg_database"] = {}, {}
        self.phases_done: list[str] = []

    async def stop(self) -> None:
        await super().stop()
        if self.ops is not None:
            await self.ops.close()

    def profile_here(self, label: str) -> hn.Profiler | None:
        return None  # --py-spy profiles the embedded prismd

    def conns_per_worker(self) -> list[int] | None:
        """Open client connections held by each worker (the kernel hands a new connection to
        whichever worker accepts first)."""
        out = []
        for pid in self.workers or []:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                out.append(-1)
                continue
            out.append(
                sum(
                    1
                    for c in conns
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
                )
            )
        return out

    async def idle_memory(self) -> dict[str, Any]:
        # The first settle (start-up's statements published) while the memory settles.
        mem, _ = await asyncio.gather(super().idle_memory(), self.settle(None))
        return mem

    async def settle(self, phase: str | None) -> None:
        """Wait hn.Ops.PG_FLUSH_S (every statement before it is in pg_stat_database after it),
        measuring the idle deployment meanwhile; then read pg_stat_database: the phase's window
        is from the previous reading to this one."""
        assert self.ops is not None
        t0 = hn.perf()
        await asyncio.sleep(self.IDLE_AFTER_S)
        before = await self.ops.counters()
        c = self.cpu()
        await asyncio.sleep(max(0.0, hn.Ops.PG_FLUSH_S - (hn.perf() - t0)))
        cpu = c.done()
        ops = hn.delta(await self.ops.counters(), before)
        db = await self.ops.database()
        statements = await self.ops.statements()
        now = hn.perf()
        if phase is not None:
            phases = self.phases_done if phase == "run" else [phase]
            self.res["idle"][phase] = {"window_s": cpu["wall"], "ops": ops, "cpu_s": cpu}
            self.res["pg_database"][phase] = {
                "window_s": round(now - self.db_at, 2),
                "counts": hn.delta(db, self.db_base),
                "phases": phases,
                "turns_outside_rows": sum(self.warmup_turns.get(x, 0) for x in phases),
                "chunks_outside_rows": sum(self.warmup_chunks.get(x, 0) for x in phases),
                "statements": top_statements(statements, self.statements_base),
            }
        self.db_base, self.db_at, self.statements_base = db, now, statements

    async def phase_end(self, phase: str) -> None:
        self.phases_done.append(phase)
        last = self.phases_done == [x for x in PHASES if x in self.args.phases]
        if self.cfg.pg_database_per_phase or last:
            print(f"  settling ({hn.Ops.PG_FLUSH_S:g} s) ...", file=sys.stderr, flush=True)
            await self.settle(phase if self.cfg.pg_database_per_phase else "run")


# ------------------------------------------------------------------------------- costs


def top_statements(
    after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]], n: int = 12
) -> list[dict[str, Any]]:
    """The statements run most often between two pg_stat_statements readings."""
    out = []
    for key, st in after.items():
        calls = st["calls"] - before.get(key, {}).get("calls", 0)
        if calls > 0:
            rows = st["rows"] - before.get(key, {}).get("rows", 0)
            out.append({"query": st["query"][:160], "calls": calls, "rows": rows})
    return sorted(out, key=lambda x: -x["calls"])[:n]


def _div(tree: Any, n: float) -> Any:
    return hn.ops_scale(tree, 1.0 / n) if n else None


COST_CPU = ("prismd", "postgres", "redis")


def idle_rate(res: dict[str, Any]) -> dict[str, Any] | None:
    """The idle deployment, per second, over every settle window of the run."""
    wins = list((res.get("idle") or {}).values())
    secs = sum(w["window_s"] for w in wins)
    if not secs:
        return None
    ops = None
    for w in wins:
        ops = hn.ops_sum(ops, w["ops"])
    cpu = {k: sum(w["cpu_s"].get(k, 0.0) for w in wins) / secs for k in COST_CPU}
    return {"window_s": round(secs, 2), "ops": _div(ops, secs), "cpu_s": cpu}


def window_totals(
    ops: dict[str, Any] | None, cpu: dict[str, float], rate: dict[str, Any] | None
) -> dict[str, Any]:
    """What a window (a prismd row) cost, net of the idle background (rate x its length)."""
    wall = cpu.get("wall", 0.0)
    idle_cpu = (rate or {}).get("cpu_s", {})
    out: dict[str, Any] = {
        "window_s": wall,
        "cpu_s": {k: cpu.get(k, 0.0) - idle_cpu.get(k, 0.0) * wall for k in COST_CPU if k in cpu},
    }
    if ops is None:
        return out
    if rate is not None:
        ops = hn.delta(ops, hn.ops_scale(rate["ops"], wall))
    r, g = ops["redis"], ops["pg"]
    out["redis_calls"] = sum(r["calls"].values())
    out["redis_by_command"] = r["calls"]
    out["redis_usec"] = sum(r["usec"].values())
    out["redis_net_in_bytes"] = r["net_in_bytes"]
    out["redis_net_out_bytes"] = r["net_out_bytes"]
    out["pg_xids"] = g["xids"]
    if "calls" in g:
        out["pg_statements"] = sum(g["calls"].values())
        out["pg_by_kind"] = g["calls"]
        out["pg_rows_written"] = sum(g["rows"].get(k, 0) for k in ("insert", "update", "delete"))
        out["pg_exec_ms"] = sum(g["exec_ms"].values())
    return out


def per_unit(totals: dict[str, Any], turns: int, chunks: int) -> dict[str, Any]:
    return {
        "turns": turns,
        "chunks": chunks,
        "total": totals,
        "per_turn": _div(totals, turns),
        "per_chunk": _div(totals, chunks),
    }


def prismd_rows(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The prismd rows of a run by phase: {phase: {label: row}}."""
    out: dict[str, dict[str, Any]] = {}
    ov = res.get("overhead")
    if ov:
        out["overhead"] = {k: ov[k] for k in ("prismd", "prismd_same_session") if k in ov}
    for phase in ("bursts", "streams"):
        if res.get(phase):
            out[phase] = {n: row["prismd"] for n, row in res[phase].items()}
    return out


def costs(res: dict[str, Any]) -> dict[str, Any]:
    """Per turn and per chunk, for each prismd row and each phase: operations and CPU (net of
    the idle background for the scale-out deployment); pg_stat_database per window (a phase,
    or the run); and the marginal cost of a turn and of a chunk (see marginal())."""
    rate = idle_rate(res)
    out: dict[str, Any] = {"idle_per_s": rate, "rows": {}, "phases": {}, "pg_database": {}}
    for phase, rows in prismd_rows(res).items():
        phase_total: dict[str, Any] | None = None
        turns = chunks = 0
        out["rows"][phase] = {}
        for label, row in rows.items():
            t = window_totals(row.get("ops"), row["cpu_s"], rate)
            n = row.get("turns", row.get("n", 0))
            out["rows"][phase][label] = per_unit(t, n, row.get("chunks", 0))
            phase_total = hn.ops_sum(phase_total, t)
            turns += n
            chunks += row.get("chunks", 0)
        out["phases"][phase] = per_unit(phase_total or {}, turns, chunks)
    for window, db in (res.get("pg_database") or {}).items():
        covered = [out["phases"][x] for x in db["phases"] if x in out["phases"]]
        t_all = sum(x["turns"] for x in covered) + db["turns_outside_rows"]
        c_all = sum(x["chunks"] for x in covered) + db["chunks_outside_rows"]
        out["pg_database"][window] = {
            "window_s": db["window_s"],
            "turns": t_all,
            "chunks": c_all,
            "per_turn": _div(db["counts"], t_all),
            "per_chunk": _div(db["counts"], c_all),
            "statements_per_turn": [
                {"query": x["query"], "calls": round(x["calls"] / t_all, 3) if t_all else None}
                for x in db.get("statements", [])
            ],
        }
    out["marginal"] = marginal(out["phases"])
    return out


MARGINAL_KEYS = ("redis_calls", "pg_statements", "pg_xids", "pg_rows_written", "pg_exec_ms")


def marginal(phases: dict[str, Any]) -> dict[str, Any] | None:
    """Cost = a x turns + b x chunks, solved from the bursts (many short turns) and the streams
    (few turns, many chunks) phase totals: a = the cost of a turn besides its chunks, b = the
    cost of a chunk. Two equations, two unknowns: as noisy as the figures they come from."""
    b, st = phases.get("bursts"), phases.get("streams")
    if not b or not st:
        return None
    t1, c1, t2, c2 = b["turns"], b["chunks"], st["turns"], st["chunks"]
    det = t1 * c2 - t2 * c1
    if not det:
        return None

    def solve(y1: float, y2: float) -> tuple[float, float]:
        return (y1 * c2 - y2 * c1) / det, (t1 * y2 - t2 * y1) / det

    out: dict[str, Any] = {"per_turn": {}, "per_chunk": {}}
    cpu_b, cpu_s = b["total"]["cpu_s"], st["total"]["cpu_s"]
    values = {f"cpu_{k}": (cpu_b.get(k), cpu_s.get(k)) for k in COST_CPU}
    values |= {k: (b["total"].get(k), st["total"].get(k)) for k in MARGINAL_KEYS}
    publish = (
        (b["total"].get("redis_by_command") or {}).get("publish"),
        (st["total"].get("redis_by_command") or {}).get("publish"),
    )
    values["redis_publish"] = publish
    for key, (y1, y2) in values.items():
        if y1 is None or y2 is None:
            continue
        out["per_turn"][key], out["per_chunk"][key] = solve(y1, y2)
    return out


# ------------------------------------------------------------------------------- runs


def aggregate(runs: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Medians of every number over the runs (same shape as one run) and [min, max] spreads."""

    def agg(values: list[Any]) -> tuple[Any, Any]:
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, dict) for v in present):
            keys: list[str] = []
            for v in present:
                keys += [k for k in v if k not in keys]
            m, s = {}, {}
            for k in keys:
                m[k], s[k] = agg([v.get(k) for v in present])
            return m, s
        nums = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(present):
            x = statistics.median(nums)
            if all(isinstance(v, int) for v in nums) and x == int(x):
                x = int(x)
            return (round(x, 4) if isinstance(x, float) else x), [min(nums), max(nums)]
        if present and all(isinstance(v, bool) for v in present):
            return all(present), None
        return (present[0] if present else None), None

    return agg(runs)


def dig(tree: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(p)
    return tree


def verdicts(s: dict[str, Any]) -> list[dict[str, Any]]:
    """issue 9's targets, judged on the summary (medians over the runs)."""
    T = TARGETS
    out: list[dict[str, Any]] = []

    def add(key: str, target: str, met: bool | None, value: Any, by: str) -> None:
        out.append({"id": key, "target": target, "met": met, "value": value, "by": by})

    ov = dig(s, "overhead", "vs_direct", "done_diff_ms_p50")
    add(
        "overhead",
        f"per-turn overhead: prismd `done` median within {T['overhead_ms']:g} ms of direct",
        None if ov is None else ov <= T["overhead_ms"],
        ov,
        "not measured"
        if ov is None
        else f"{ov:+.2f} ms (prismd {dig(s, 'overhead', 'prismd', 'done_ms_p50')} ms, "
        f"direct {dig(s, 'overhead', 'direct', 'done_ms_p50')} ms)",
    )
    b = dig(s, "bursts", "1000")
    if b:
        ratio, allc = b.get("wall_ratio"), b["prismd"].get("all_complete")
        add(
            "burst_1000",
            f"1000 chats at once: all complete, wall within {T['burst_1000_ratio']:g}x direct",
            bool(allc) and ratio is not None and ratio <= T["burst_1000_ratio"],
            {"ratio": ratio, "completed": b["prismd"].get("completed")},
            f"{b['prismd'].get('completed')}/1000 complete; {fmt(b['prismd'].get('wall_s'))} s "
            f"vs direct {fmt(b['direct'].get('wall_s'))} s = {fmt(ratio)}x",
        )
    else:
        add("burst_1000", "1000 chats at once within 3x direct", None, None, "not measured")
    s300 = dig(s, "streams", "300", "prismd")
    p99 = s300.get("lag_ms_p99") if s300 else None
    add(
        "streams_300",
        f"300 streams at 50 pieces/s: lag p99 <= {T['streams_300_p99_ms']:g} ms",
        None if p99 is None else p99 <= T["streams_300_p99_ms"],
        p99,
        "not measured"
        if p99 is None
        else f"p99 {p99:.0f} ms (direct {fmt(dig(s, 'streams', '300', 'direct', 'lag_ms_p99'))} ms)"
        f"; {s300.get('completed')}/300 complete",
    )
    s500 = dig(s, "streams", "500", "prismd")
    if s500:
        p99, f95, allc = s500.get("lag_ms_p99"), s500.get("first_ms_p95"), s500.get("all_complete")
        add(
            "streams_500",
            f"500 streams: all complete, lag p99 <= {T['streams_500_p99_ms']:g} ms, first chunk "
            f"p95 <= {T['streams_500_first_p95_ms']:g} ms",
            bool(allc)
            and p99 is not None
            and p99 <= T["streams_500_p99_ms"]
            and f95 is not None
            and f95 <= T["streams_500_first_p95_ms"],
            {"completed": s500.get("completed"), "lag_ms_p99": p99, "first_ms_p95": f95},
            f"{s500.get('completed')}/500 complete; p99 {fmt(p99)} ms; first chunk p95 "
            f"{fmt(f95)} ms (direct p99 {fmt(dig(s, 'streams', '500', 'direct', 'lag_ms_p99'))})",
        )
    else:
        add("streams_500", "500 streams: complete, p99 <= 300 ms", None, None, "not measured")
    idle = dig(s, "memory", "idle_mb")
    add(
        "idle_rss",
        f"idle RSS < {T['idle_rss_mb']:g} MB",
        None if idle is None else idle < T["idle_rss_mb"],
        idle,
        "not measured" if idle is None else f"{idle:.1f} MB",
    )
    peak = dig(s, "memory", "burst_peak_mb", "1000")
    add(
        "burst_peak_rss",
        f"peak RSS during the 1000 burst < {T['burst_peak_rss_mb']:g} MB",
        None if peak is None else peak < T["burst_peak_rss_mb"],
        peak,
        "not measured" if peak is None else f"{peak:.1f} MB",
    )
    return out


# issue 10: 2 workers no worse than one embedded process, per phase, within a tolerance: the
# larger of NO_WORSE_RATIO x the embedded figure and the embedded figure + an absolute slack
# (one figure measured once on a shared 2-core machine moves by more than that from run to run)
NO_WORSE_RATIO = 1.25
NO_WORSE_SLACK = {"overhead_ms": 2.0, "burst_wall_s": 0.05, "stream_lag_ms": 25.0}


def scale_out_verdict(emb: dict[str, Any], so: dict[str, Any]) -> dict[str, Any]:
    """Per phase: overhead done p50; each burst all complete, wall time; each stream count all
    complete, lag p99 (each against the same row of the embedded run)."""
    R, S = NO_WORSE_RATIO, NO_WORSE_SLACK
    checks: list[tuple[str, bool]] = []

    def within(x: float | None, e: float | None, slack: float) -> bool | None:
        if x is None or e is None:
            return None
        return x <= max(R * e, e + slack)

    e, x = (
        dig(emb, "overhead", "prismd", "done_ms_p50"),
        dig(so, "overhead", "prismd", "done_ms_p50"),
    )
    ok = within(x, e, S["overhead_ms"])
    if ok is not None:
        checks.append((f"overhead done p50 {fmt(x)} vs {fmt(e)} ms", ok))
    for phase, key, slack, unit in (
        ("bursts", "wall_s", S["burst_wall_s"], "s"),
        ("streams", "lag_ms_p99", S["stream_lag_ms"], "ms"),
    ):
        for n in so.get(phase) or {}:
            er, xr = dig(emb, phase, n, "prismd"), dig(so, phase, n, "prismd")
            if not er or not xr:
                continue
            ok = within(xr.get(key), er.get(key), slack)
            complete = bool(xr.get("all_complete"))
            what = "wall" if phase == "bursts" else "lag p99"
            checks.append(
                (
                    f"{phase} {n}: {what} {fmt(xr.get(key))} vs {fmt(er.get(key))} {unit}"
                    + ("" if complete else f", {xr.get('completed')}/{n} complete"),
                    bool(ok) and complete,
                )
            )
    met = all(ok for _, ok in checks) if checks else None
    return {
        "id": "scale_out",
        "target": f"{WORKERS} workers no worse than one embedded process (per phase: done p50, "
        f"burst wall, stream lag p99 within x{R:g} or +{S['overhead_ms']:g} ms / "
        f"+{S['burst_wall_s']:g} s / +{S['stream_lag_ms']:g} ms; all complete)",
        "met": met,
        "value": {label: ok for label, ok in checks},
        "by": "not measured"
        if not checks
        else "; ".join(f"{label}{'' if ok else ' (worse)'}" for label, ok in checks),
    }


# ------------------------------------------------------------------------------- report


class Show:
    """Formats a figure of the summary, with its [min-max] over the runs when there are
    several."""

    def __init__(self, summary: dict[str, Any], spread: dict[str, Any], runs: int) -> None:
        self.s, self.sp, self.runs = summary, spread, runs

    def __call__(self, *path: str) -> str:
        v = dig(self.s, *path)
        text = fmt(v)
        if self.runs > 1:
            sp = dig(self.sp, *path)
            if isinstance(sp, list) and sp[0] != sp[1]:
                text += f" [{fmt(sp[0])}-{fmt(sp[1])}]"
        return text


def table(head: list[str], rows: list[list[str]], indent: str = "   ") -> list[str]:
    """Columns right-aligned to their widest cell (the first one left-aligned, and a last one
    with no heading: notes)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    if len(head) > 1 and not head[-1]:
        widths[-1] = 0
    out = []
    for r in [head, *rows]:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def cpu_head(scaled: bool) -> list[str]:
    return [
        "cpu s: prismd",
        *(["pg", "redis"] if scaled else []),
        "fake",
        "client",
        "other",
        "wall",
        "load1",
    ]


def cpu_cells(c: dict[str, Any] | None, scaled: bool = False) -> list[str]:
    c = c or {}
    fake = (c.get("fake") or 0) + (c.get("fake_streams") or 0)
    extra = [f"{c.get('postgres', 0):.2f}", f"{c.get('redis', 0):.2f}"] if scaled else []
    return [
        f"{c.get('prismd', 0):.2f}",
        *extra,
        f"{fake:.2f}",
        f"{c.get('client', 0):.2f}",
        f"{c.get('other', 0):.2f}",
        f"{c.get('wall', 0):.2f}",
        f"{c.get('load1', 0):.2f}",
    ]


def print_report(out: dict[str, Any]) -> None:
    p = print
    s, runs = out["summary"], out["runs_done"]
    show = Show(s, out.get("spread") or {}, runs)
    m, cfg = out["machine"], out["config"]
    p("=" * 100)
    p(f"prismd load benchmark   {out['started']}   ({runs} run{'s' if runs > 1 else ''})")
    p(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_mb']} MB RAM, Python {m['python']}, client on {m['client_loop']}"
    )
    src = out.get("source", {})
    p(
        f"prismd at {src.get('git_head')}"
        + (" + uncommitted changes in src/" if src.get("src_dirty") else "")
        + f" ({src.get('prismd_package')})"
    )
    p(
        f"load average at start {m['loadavg_at_start']}, at the end {out.get('loadavg_at_end')}"
        "; `other` = CPU of processes not in the bench (they skew the figures)"
    )
    quiet = [r.get("quiet_wait") for r in out.get("runs", []) if r.get("quiet_wait")]
    if quiet:
        p(f"quiet wait before each run (--wait-quiet): {quiet}")
    if runs > 1:
        p(f"figures: medians over {runs} runs, [min-max] when they differ")
    p("=" * 100)
    so = out.get("scale_out")
    if so:
        p("\nEMBEDDED: one prismd process on SQLite")
    print_phases(s, show, cfg, "", out.get("profile"))
    if out.get("server_log"):
        print_log(out["server_log"])
    if so and so.get("summary"):
        ss = so["summary"]
        sshow = Show(ss, so.get("spread") or {}, so["runs_done"])
        dep = ss.get("deployment") or {}
        p("\n" + "=" * 100)
        p(
            f"SCALE-OUT: prismd serve --workers {dep.get('workers')} on PostgreSQL "
            f"{dep.get('postgres')} + Redis {dep.get('redis')} (throwaway, 127.0.0.1), same "
            "phases, same fakes"
        )
        p("=" * 100)
        print_phases(ss, sshow, cfg, "S", None)
        print_costs(ss, sshow, s)
        if so.get("server_log"):
            print_log(so["server_log"])
    p(
        "\nVerdicts against issue 9's targets"
        + (" and issue 10's" if so else "")
        + (" (on the medians)" if runs > 1 else "")
    )
    for v in out.get("verdicts", []):
        status = {True: "met", False: "NOT met", None: "-"}[v["met"]]
        p(f"   [{status:>7}] {v['target']}: {v['by']}")
    p(f"\ntotal {out.get('bench_s')} s; JSON: {out['json']}")


def print_log(lg: dict[str, Any]) -> None:
    print(f"\nprismd log: {lg['warnings']} WARNING, {lg['errors']} ERROR/Traceback lines")
    for line in lg["samples"]:
        print(f"   | {line[:150]}")


def print_phases(
    s: dict[str, Any], show: Show, cfg: dict[str, Any], prefix: str, prof: dict[str, Any] | None
) -> None:
    """The phase tables of one configuration (prefix "S": the scale-out one)."""
    p = print
    scaled = bool(prefix)
    ov = s.get("overhead")
    if ov:
        p(
            f"\n{prefix}1. Per-turn overhead: {cfg['turns']} sequential turns per series (after "
            f"{cfg['warmup']} warm-up), {TURN_PIECES} pieces, no delay; ms from the send"
        )
        rows = []
        cpu_keys = (
            ("prismd", "postgres", "redis", "client") if scaled else ("prismd", "fake", "client")
        )
        for label, key in (
            ("direct (raw HTTP/1.1 keep-alive): floor", "direct"),
            ("direct (aiohttp, for comparison)", "direct_aiohttp"),
            ("prismd, new session per turn", "prismd"),
            ("direct, the session's growing history", "direct_history"),
            ("prismd, same session", "prismd_same_session"),
        ):
            d = ov.get(key)
            if not d:
                continue
            c = d.get("cpu_ms_per_turn", {})
            rows.append(
                [
                    label,
                    show("overhead", key, "first_ms_p50"),
                    show("overhead", key, "done_ms_p50"),
                    show("overhead", key, "done_ms_p95"),
                    f"{fmt(d.get('ok'))}/{fmt(d.get('turns'))}",
                    "/".join(fmt(c.get(k)) for k in cpu_keys),
                    ", ".join(d.get("errors") or []),
                ]
            )
        cpu_label = "cpu ms/turn " + "/".join("pg" if k == "postgres" else k for k in cpu_keys)
        head = ["", "first p50", "done p50", "done p95", "ok", cpu_label]
        for line in table([*head, ""], rows):
            p(line)
        p(
            f"   prismd - direct: done p50 {show('overhead', 'vs_direct', 'done_diff_ms_p50')} ms"
            f" (x{show('overhead', 'vs_direct', 'done_ratio_p50')}), done p95 "
            f"{show('overhead', 'vs_direct', 'done_diff_ms_p95')} ms, first chunk p50 "
            f"{show('overhead', 'vs_direct', 'first_diff_ms_p50')} ms"
        )
        p(
            "   prismd same session - direct with the same history: done p50 "
            f"{show('overhead', 'same_session_vs_direct_history', 'done_diff_ms_p50')} ms"
        )
        lat = dig(ov, "prismd", "server_latency_ms_p50")
        if lat:
            p(f"   prismd's own done.latency, new session (p50, ms): {lat}")
        if ov.get("cold_first_turn_ms") is not None:
            p(f"   first turn after start (cold): {fmt(ov['cold_first_turn_ms'])} ms")

    def concurrent_table(title: str, phase: str, stream: bool) -> None:
        rows_in = s.get(phase)
        if not rows_in:
            return
        p(title)
        if stream:
            head = ["", "", "complete", "lag p50", "lag p99", "lag max", "1st p95", "done p50"]
        else:
            head = ["", "", "complete", "wall s", "turns/s", "done p50", "done p95"]
        head += [*cpu_head(scaled), ""]
        rows, notes = [], []
        for n, row in rows_in.items():
            for who in ("prismd", "direct"):
                r = row.get(who) or {}
                cells = [n if who == "prismd" else "", who, f"{r.get('completed')}/{r.get('n')}"]
                if stream:
                    cells += [
                        show(phase, n, who, "lag_ms_p50"),
                        show(phase, n, who, "lag_ms_p99"),
                        fmt(r.get("lag_ms_max")),
                        show(phase, n, who, "first_ms_p95"),
                        fmt(r.get("done_ms_p50")),
                    ]
                else:
                    cells += [
                        show(phase, n, who, "wall_s"),
                        fmt(r.get("turns_per_s")),
                        fmt(r.get("done_ms_p50")),
                        fmt(r.get("done_ms_p95")),
                    ]
                errors = r.get("errors") or {}
                odd = {k: v for k, v in (r.get("stop_reasons") or {}).items() if k != "end"}
                note = " ".join(
                    [f"errors {errors}"] * bool(errors) + [f"stopReason {odd}"] * bool(odd)
                )
                cells += [*cpu_cells(r.get("cpu_s"), scaled), note]
                rows.append(cells)
            if stream:
                notes.append(f"{n}: {show(phase, n, 'lag_p99_diff_ms')} ms")
            else:
                notes.append(f"{n}: {show(phase, n, 'wall_ratio')}x")
        for line in table(head, rows):
            p(line)
        what = "lag p99, prismd - direct" if stream else "wall time, prismd / direct"
        p(f"   {what}: " + "; ".join(notes))

    concurrent_table(
        f"\n{prefix}2. Bursts: N chats at once, each a new session on its own connection "
        f"(opened before the clock);\n   {TURN_PIECES} pieces, no delay; wall = first send to "
        "last done; ms from the send",
        "bursts",
        False,
    )
    concurrent_table(
        f"\n{prefix}3. Streams: R at once, {cfg['stream_pieces']} pieces at {STREAM_RATE:g}/s "
        "each; lag = arrival - the fake's schedule,\n   every piece (ms); 1st = first chunk "
        "from the send (ms); complete = done with every piece",
        "streams",
        True,
    )
    mem = s.get("memory")
    if mem:
        whose = f"the {WORKERS} workers' RSS summed" if scaled else "RSS"
        p(f"\n{prefix}4. prismd memory ({whose}, MB)")
        rows = [["idle after start (settled)", show("memory", "idle_mb")]]
        if mem.get("after_overhead_mb") is not None:
            rows.append(["after the overhead phase", show("memory", "after_overhead_mb")])
        for n in mem.get("burst_peak_mb") or {}:
            rows.append([f"peak during the {n} burst", show("memory", "burst_peak_mb", n)])
        for n, row in (s.get("streams") or {}).items():
            if dig(row, "prismd", "rss_peak_mb") is not None:
                rows.append(
                    [f"peak during {n} streams", show("streams", n, "prismd", "rss_peak_mb")]
                )
        rows.append(["at the end (settled)", show("memory", "end_mb")])
        rows.append(["open fds: idle, peak", f"{mem.get('idle_fds')}, {mem.get('fds_peak')}"])
        for line in table(["", ""], rows)[1:]:
            p(line)
    if scaled:
        p(
            f"\n{prefix}5. CPU: the `cpu s` columns above (seconds over the row: prismd = its "
            f"supervisor and {WORKERS} workers,\n   pg = PostgreSQL's postmaster and backends, "
            "redis, both fakes, this client, other processes; wall; load average)"
        )
        return
    p(
        "\n5. CPU: the `cpu s` columns above (seconds over the row: prismd, both fakes, this "
        "client,\n   other processes; wall; load average); phase 1: ms per turn and series"
    )
    if prof:
        p(f"\n6. py-spy profile of prismd during {prof['phase']}: {prof['file']}")
        if prof.get("error"):
            p(f"   {prof['error']} {prof.get('py_spy_log', '')}")
        else:
            p(
                f"   {prof.get('samples')} samples over {fmt(prof.get('sampled_s'))} s of busy "
                f"threads; open it in https://www.speedscope.app"
            )
            p(f"   busy seconds per thread: {prof.get('threads_s')}")
            p("   (self time in Runner.run / uvloop is the event loop's own C code)")
            for kind, label in (("self", "self time"), ("total", "total (inclusive) time")):
                p(f"   top frames by {label}:")
                for f in prof.get(kind, [])[:20]:
                    p(f"   {f['pct']:6.1f}%  {f['frame'][:110]}")


def _f(v: Any, scale: float = 1.0) -> str:
    return "-" if v is None else fmt(round(v * scale, 4))


def print_costs(s: dict[str, Any], show: Show, embedded: dict[str, Any]) -> None:
    """The scale-out run's operations and CPU per turn and per chunk."""
    p = print
    co = s.get("costs") or {}
    dep = s.get("deployment") or {}
    rate = co.get("idle_per_s") or {}
    p(
        "\nS6. Operations per turn and per chunk, for each prismd row (first send to last done), "
        "net of the\n   idle background (its rate below x the row's length). Redis: INFO "
        "commandstats; pg: pg_stat_statements\n   (statements executed in prismd's database), "
        "xids = transactions that wrote; cpu: ms per turn"
    )
    if not dep.get("pg_stat_statements"):
        p("   (pg_stat_statements is not installed: no PostgreSQL statement counts)")
    head = [
        "",
        "turns",
        "chunks",
        "redis/turn",
        "PUBLISH/chunk",
        "pg stmt/turn",
        "pg stmt/chunk",
        "rows written/turn",
        "xids/turn",
        "cpu ms/turn prismd/pg/redis",
    ]
    rows = []
    label_of = {"prismd": "overhead, new session", "prismd_same_session": "overhead, same session"}
    for phase in ("overhead", "bursts", "streams"):
        if phase not in (co.get("rows") or {}):
            continue
        entries = [(label_of.get(k, f"{phase} {k}"), v) for k, v in co["rows"][phase].items()]
        entries.append((f"{phase}: all", co["phases"][phase]))
        for label, u in entries:
            pt, pc = u.get("per_turn") or {}, u.get("per_chunk") or {}
            cpu = pt.get("cpu_s") or {}
            rows.append(
                [
                    label,
                    fmt(u.get("turns")),
                    fmt(u.get("chunks")),
                    _f(pt.get("redis_calls")),
                    _f((pc.get("redis_by_command") or {}).get("publish")),
                    _f(pt.get("pg_statements")),
                    _f(pc.get("pg_statements")),
                    _f(pt.get("pg_rows_written")),
                    _f(pt.get("pg_xids")),
                    "/".join(_f(cpu.get(k), 1000) for k in COST_CPU),
                ]
            )
    for line in table(head, rows):
        p(line)

    p("\n   by command and kind, per turn (phase totals, net of the idle background):")
    for phase, u in (co.get("phases") or {}).items():
        pt = u.get("per_turn") or {}
        for what, key in (("redis", "redis_by_command"), ("pg", "pg_by_kind")):
            parts = sorted((pt.get(key) or {}).items(), key=lambda kv: -abs(kv[1] or 0))
            shown = ", ".join(f"{k} {_f(v)}" for k, v in parts if v and abs(v) >= 0.01)
            if shown:
                p(f"   {phase:>8} {what:>5}: {shown}")

    p(
        "\n   pg_stat_database per phase (with --quick: once over the run), read once "
        f"PostgreSQL has published every\n   backend's counters, {hn.Ops.PG_FLUSH_S:g} s after "
        "the phase: the window also holds warm-up turns, connections\n   opened and closed, "
        "that wait and the idle background (not subtracted here):"
    )
    head = ["", "window s", "turns", "xact_commit", "tup_inserted", "tup_updated", "tup_deleted"]
    head += ["tup_returned", "tup_fetched", "  (per turn)"]
    rows = []
    for window, db in (co.get("pg_database") or {}).items():
        pt = db.get("per_turn") or {}
        rows.append(
            [
                "all phases" if window == "run" else window,
                fmt(db.get("window_s")),
                fmt(db.get("turns")),
                *(
                    _f(pt.get(k))
                    for k in (
                        "xact_commit",
                        "tup_inserted",
                        "tup_updated",
                        "tup_deleted",
                        "tup_returned",
                        "tup_fetched",
                    )
                ),
                "",
            ]
        )
    for line in table(head, rows):
        p(line)
    for window, db in (co.get("pg_database") or {}).items():
        top = db.get("statements_per_turn") or []
        if top:
            name = "all phases" if window == "run" else window
            p(f"   {name}: the statements run most, per turn (pg_stat_statements, same window):")
            for x in top[:10]:
                p(f"   {_f(x['calls']):>8}  {x['query'][:110]}")

    if rate:
        r = rate.get("ops") or {}
        redis_s = sum(((r.get("redis") or {}).get("calls") or {}).values())
        pg_s = sum(((r.get("pg") or {}).get("calls") or {}).values())
        cpu = rate.get("cpu_s") or {}
        p(
            f"\n   idle background, per second (over {fmt(rate.get('window_s'))} s of settle "
            f"windows): Redis {_f(redis_s)} commands, pg {_f(pg_s)} statements; cpu ms/s "
            + "/".join(_f(cpu.get(k), 1000) for k in COST_CPU)
            + " (prismd/pg/redis)"
        )

    p("\n   per worker: cpu s, open client connections (the kernel gives each new one to a worker)")
    for phase in ("overhead", "bursts", "streams"):
        for label, row in prismd_rows(s).get(phase, {}).items():
            c = row.get("cpu_s") or {}
            ws = [f"{c.get(f'worker{i}', 0):.2f}" for i in range(WORKERS)]
            conns = row.get("connections_per_worker") or (s.get(phase) or {}).get(
                "connections_per_worker"
            )
            p(f"   {phase:>8} {label:<20} cpu {' / '.join(ws)}   connections {conns}")

    mg = co.get("marginal")
    emb = (embedded.get("costs") or {}).get("marginal") or {}
    if mg:
        p(
            "\n   marginal costs: cost = a x turns + b x chunks, solved from the bursts and "
            "the streams phase totals\n   (a: a turn besides its chunks, b: one chunk; noisy, "
            "two equations from two phases)"
        )
        head = ["", "a: per turn", "b: per chunk"]
        rows = []
        for key, label, scale, unit in (
            ("cpu_prismd", "cpu prismd (2 workers)", 1000, "ms"),
            ("cpu_postgres", "cpu PostgreSQL", 1000, "ms"),
            ("cpu_redis", "cpu Redis", 1000, "ms"),
            ("redis_calls", "Redis commands", 1, ""),
            ("redis_publish", "Redis PUBLISH", 1, ""),
            ("pg_statements", "pg statements", 1, ""),
            ("pg_xids", "pg write transactions", 1, ""),
            ("pg_rows_written", "pg rows written", 1, ""),
            ("pg_exec_ms", "pg execution time (incl. waits)", 1, "ms"),
        ):
            a, b = (mg.get("per_turn") or {}).get(key), (mg.get("per_chunk") or {}).get(key)
            rows.append([label, f"{_f(a, scale)} {unit}", f"{_f(b, scale)} {unit}"])
        a, b = (
            (emb.get("per_turn") or {}).get("cpu_prismd"),
            (emb.get("per_chunk") or {}).get("cpu_prismd"),
        )
        rows.insert(0, ["cpu prismd (embedded)", f"{_f(a, 1000)} ms", f"{_f(b, 1000)} ms"])
        for line in table(head, rows):
            p(line)


# ------------------------------------------------------------------------------- main


def not_built(flag: str, what: str) -> int:
    print(f"{flag}: not built yet ({what})", file=sys.stderr)
    return 2


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _phases(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in PHASES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown phase {bad}; choose from {', '.join(PHASES)}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N (a smoke run of ~30 s)")
    ap.add_argument(
        "--phases",
        type=_phases,
        default=list(PHASES),
        metavar="P,P",
        help=f"phases to run, of {','.join(PHASES)} (default all; memory is always measured)",
    )
    ap.add_argument("--bursts", type=_ints, metavar="N,N", help="burst sizes (10,100,300,1000)")
    ap.add_argument("--skip-1000", action="store_true", help="leave out the 1000 burst")
    ap.add_argument("--streams", type=_ints, metavar="R,R", help="stream counts (100,300,500)")
    ap.add_argument("--turns", type=int, help="sequential turns per series in phase 1 (60)")
    ap.add_argument("--pieces", type=int, help="pieces per streamed answer (200)")
    ap.add_argument("--runs", type=int, default=1, metavar="K", help="repeat K times; medians")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before every run, wait up to S s until other processes use < 10%% of the CPU",
    )
    ap.add_argument(
        "--out", default=str(hn.ROOT / "bench" / "results.json"), help="the JSON results file"
    )
    ap.add_argument(
        "--py-spy",
        metavar="PHASE",
        help="record a py-spy profile of prismd during one phase's prismd row: overhead, "
        "bursts:N or streams:R (first run only; py-spy takes CPU: it skews that row)",
    )
    ap.add_argument("--py-spy-out", metavar="FILE", help="speedscope JSON file for --py-spy")
    ap.add_argument(
        "--server-nofile", type=int, metavar="N", help="run prismd with soft = hard fd limit N"
    )
    ap.add_argument("--deadline", type=int, metavar="S", help="hard deadline for the whole run")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dirs (logs, homes)")
    ap.add_argument(
        "--scale-out",
        action="store_true",
        help="also the same phases against prismd serve --workers 2 on a throwaway PostgreSQL "
        "+ Redis, with their operations and CPU per turn and per chunk (issue 10)",
    )
    ap.add_argument(
        "--local",
        action="store_true",
        help="time to first token, tokens/s and per-turn overhead on the local model (issue 13)",
    )
    return ap.parse_args(argv)


def config_for(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else FULL
    cfg = Config(**vars(base))
    cfg.bursts = list(base.bursts)
    cfg.streams = list(base.streams)
    if args.bursts:
        cfg.bursts = args.bursts
    if args.skip_1000:
        cfg.bursts = [n for n in cfg.bursts if n != 1000]
    if args.streams:
        cfg.streams = args.streams
    if args.turns:
        cfg.turns = args.turns
        cfg.blocks = max(1, min(cfg.blocks, args.turns))
    if args.pieces:
        cfg.stream_pieces = args.pieces
    return cfg


def summarize_runs(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    done = [r for r in runs if "run_s" in r]
    if not done:
        return None
    summary, spread = aggregate(done) if len(done) > 1 else (dict(done[0]), {})
    summary.pop("run_s", None)
    return summary, spread


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local:
        return not_built(
            "--local",
            "issue 13: time to first token, tokens/s and per-turn overhead against the local "
            "llama.cpp runtime, directly and through prismd",
        )
    hn.SERVER_NOFILE = args.server_nofile
    if args.py_spy and not (
        args.py_spy == "overhead" or args.py_spy.split(":")[0] in ("bursts", "streams")
    ):
        print("--py-spy: overhead, bursts:N or streams:R", file=sys.stderr)
        return 2
    cfg = config_for(args)
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {**vars(cfg), "phases": args.phases, "runs": args.runs},
        "machine": hn.machine(),
        "source": hn.source(),
        "fd_limit_client": list(hn.raise_nofile()),
        "targets": TARGETS,
        "json": args.out,
        "runs": [],
        "runs_done": 0,
    }
    if args.scale_out:
        out["scale_out"] = {"workers": WORKERS, "runs": [], "runs_done": 0}
    t_bench = hn.perf()

    def finish(failure: str | None = None) -> None:
        runs = [r for r in out["runs"] if "run_s" in r]
        out["runs_done"] = len(runs)
        summary = summarize_runs(runs)
        if summary:
            out["summary"], out["spread"] = summary
            if any("profile" in r for r in runs):
                out["profile"] = next(r["profile"] for r in runs if "profile" in r)
            out["verdicts"] = verdicts(out["summary"])
        so = out.get("scale_out")
        if so is not None:
            so["runs_done"] = len([r for r in so["runs"] if "run_s" in r])
            summary = summarize_runs(so["runs"])
            if summary:
                so["summary"], so["spread"] = summary
                if "summary" in out:
                    out["verdicts"].append(scale_out_verdict(out["summary"], so["summary"]))
        if failure:
            out["failure"] = failure
        out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out["bench_s"] = round(hn.perf() - t_bench, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")

    tmps: list[tempfile.TemporaryDirectory[str]] = []

    def on_stop(signum: int) -> None:
        finish(f"stopped by signal {signum} (partial results)")
        for t in tmps:
            shutil.rmtree(t.name, ignore_errors=True)
        print(f"partial results in {args.out}", file=sys.stderr)

    configs: list[tuple[type[Run], dict[str, Any]]] = [(Run, out)]
    if args.scale_out:
        configs.append((ScaleOutRun, out["scale_out"]))
    per_run = cfg.deadline_s * len(configs) + int(args.wait_quiet)
    deadline = args.deadline or (per_run * args.runs + 60)
    hn.install_deadline(deadline, on_stop)
    rc = 0
    failure = None
    try:
        for k in range(args.runs):
            print(f"run {k + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            quiet = None
            if args.wait_quiet > 0:  # other people's tests come and go: before every run
                quiet = hn.wait_quiet(args.wait_quiet)
            for run_cls, into in configs:  # embedded, then (--scale-out) 2 workers
                tmp_obj = tempfile.TemporaryDirectory(prefix="prismd-bench-")
                tmps.append(tmp_obj)
                res: dict[str, Any] = {}
                into["runs"].append(res)
                if quiet is not None:
                    res["quiet_wait"] = quiet
                try:
                    hn.run_async(run_cls(args, cfg, Path(tmp_obj.name), res, k).run())
                finally:
                    logs = {c.name: c for c in hn.CHILDREN}
                    hn.stop_children()
                    if "prismd" in logs:
                        res["server_log"] = lg = hn.scan_log(logs["prismd"].output())
                        if lg["errors"] + lg["warnings"] or "server_log" not in into:
                            into["server_log"] = lg  # the last run's, or one with problems
                    if args.keep_tmp:
                        kept = Path(tempfile.mkdtemp(prefix="prismd-bench-kept-"))
                        subprocess.run(["cp", "-r", tmp_obj.name + "/.", str(kept)], check=False)
                        res["kept_tmp"] = str(kept)
                    tmp_obj.cleanup()
    except Exception as exc:  # noqa: BLE001
        failure = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        print(f"bench failed: {failure}", file=sys.stderr)
        rc = 1
    finally:
        signal.alarm(0)
        hn.stop_children()
    finish(failure)
    if out["runs_done"]:
        print_report(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
