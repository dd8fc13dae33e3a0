"""bench/load.py runs end to end: every phase beside its direct floor, and the verdicts.

The bench is run as `make bench` runs it (its own fake models and prismd in processes of their
own, on 127.0.0.1), in --quick mode. Only the shape and the completeness of the report are
asserted: all turns and streams complete, every row has its direct floor, every target has a
verdict. No figure is compared with a limit (timings never decide a test).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench" / "load.py"


@pytest.mark.timeout(400)
def test_quick_bench_reports_every_phase_with_its_floor(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["runs_done"] == 1 and "failure" not in res
    s = res["summary"]

    ov = s["overhead"]
    for series in ("prismd", "direct", "prismd_same_session", "direct_history"):
        row = ov[series]
        assert row["ok"] == row["turns"] > 0, (series, row["errors"])
        assert row["done_ms_p50"] > 0 and row["done_ms_p95"] >= row["done_ms_p50"]
        assert row["chunks_per_turn"] >= 1
        assert set(row["cpu_s"]) >= {"prismd", "fake", "client", "other"}
    assert ov["prismd"]["cpu_s"]["prismd"] > 0  # the direct rows do not touch prismd
    assert set(ov["vs_direct"]) >= {"done_diff_ms_p50", "done_ratio_p50", "done_diff_ms_p95"}

    cfg = res["config"]
    assert sorted(int(n) for n in s["bursts"]) == sorted(cfg["bursts"])
    for n, row in s["bursts"].items():
        for who in ("prismd", "direct"):
            assert row[who]["completed"] == int(n) and row[who]["errors"] == {}, (n, who)
            assert row[who]["wall_s"] > 0 and "prismd" in row[who]["cpu_s"]
        assert row["wall_ratio"] > 0
        assert row["prismd"]["rss_peak_mb"] > 0

    assert sorted(int(r) for r in s["streams"]) == sorted(cfg["streams"])
    for r, row in s["streams"].items():
        for who in ("prismd", "direct"):
            st = row[who]
            assert st["all_complete"] and st["errors"] == {}, (r, who, st["errors"])
            # every piece of every stream was timed against the fake model's stamp
            assert st["pieces"] == st["pieces_expected"] == int(r) * cfg["stream_pieces"]
            assert st["lag_ms_p99"] is not None and st["first_ms_p95"] is not None
        assert "lag_p99_diff_ms" in row

    assert s["memory"]["idle_mb"] > 0
    assert set(s["memory"]["burst_peak_mb"]) == {str(n) for n in cfg["bursts"]}

    verdicts = {v["id"]: v for v in res["verdicts"]}
    assert set(verdicts) == {
        "overhead",
        "burst_1000",
        "streams_300",
        "streams_500",
        "idle_rss",
        "burst_peak_rss",
    }
    # --quick measures the overhead and the idle memory; the 1000 burst, 300 and 500 streams
    # are the full run's, and say so instead of passing silently.
    assert verdicts["overhead"]["met"] in (True, False)
    assert verdicts["idle_rss"]["met"] in (True, False)
    for key in ("burst_1000", "streams_300", "streams_500", "burst_peak_rss"):
        assert verdicts[key]["met"] is None and verdicts[key]["by"] == "not measured"

    assert "Verdicts against issue 9's targets" in run.stdout
    for heading in ("1. Per-turn overhead", "2. Bursts", "3. Streams", "4. prismd memory"):
        assert heading in run.stdout


def _prismd_rows(s):
    """The prismd rows of a summary: the two overhead series, each burst, each stream count."""
    rows = {f"overhead {k}": s["overhead"][k] for k in ("prismd", "prismd_same_session")}
    for phase in ("bursts", "streams"):
        rows |= {f"{phase} {n}": row["prismd"] for n, row in s[phase].items()}
    return rows


@pytest.mark.timeout(400)
def test_quick_scale_out_reports_both_configurations_and_the_operations(tmp_path):
    """--scale-out: the same phases against `prismd serve --workers 2` on a throwaway
    PostgreSQL + Redis, beside the embedded run; per prismd row, the Redis and PostgreSQL
    operations and the CPU of every process; per phase, per turn and per chunk."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--scale-out", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "failure" not in res
    assert res["runs_done"] == 1 and res["scale_out"]["runs_done"] == 1
    cfg = res["config"]
    emb, so = res["summary"], res["scale_out"]["summary"]

    # every phase, complete, in both configurations
    for s in (emb, so):
        assert sorted(int(n) for n in s["bursts"]) == sorted(cfg["bursts"])
        assert sorted(int(r) for r in s["streams"]) == sorted(cfg["streams"])
        for label, row in _prismd_rows(s).items():
            assert row["errors"] in ([], {}), (label, row["errors"])
        for r, row in s["streams"].items():
            st = row["prismd"]
            assert st["all_complete"] and st["pieces"] == int(r) * cfg["stream_pieces"]
        for n, row in s["bursts"].items():
            assert row["prismd"]["completed"] == int(n)
        assert s["overhead"]["prismd"]["ok"] == s["overhead"]["prismd"]["turns"] > 0
        assert s["memory"]["idle_mb"] > 0

    dep = so["deployment"]
    assert dep["workers"] == 2 and dep["pg_stat_statements"] is True
    assert so["memory"]["idle_mb"] > emb["memory"]["idle_mb"]  # two workers' RSS summed

    # per prismd row: operations counted by Redis and PostgreSQL, CPU of every process
    for label, row in _prismd_rows(so).items():
        redis, pg = row["ops"]["redis"], row["ops"]["pg"]
        assert all(isinstance(v, int) and v >= 0 for v in redis["calls"].values()), label
        turns = row.get("turns", row.get("n"))
        # every turn's events are durable: at least one INSERT and one writing transaction
        assert pg["calls"]["insert"] >= turns and pg["xids"] >= 1, (label, pg)
        assert pg["rows"]["insert"] >= turns, (label, pg)
        cpu = row["cpu_s"]
        assert {"prismd", "postgres", "redis", "worker0", "worker1"} <= set(cpu), label
        assert cpu["prismd"] > 0 and cpu["postgres"] > 0, (label, cpu)
        conns = row.get("connections_per_worker") or so["overhead"]["connections_per_worker"]
        assert len(conns) == 2 and sum(conns) >= 1, label  # the overhead's 2 are per phase
    assert sum(_prismd_rows(so)["streams 50"]["ops"]["redis"]["calls"].values()) > 0

    # per phase, per turn and per chunk; pg_stat_database once the counters are published
    costs = so["costs"]
    for phase in ("overhead", "bursts", "streams"):
        unit = costs["phases"][phase]
        assert unit["turns"] > 0 and unit["chunks"] > 0, phase
        for per in ("per_turn", "per_chunk"):
            assert unit[per]["pg_statements"] > 0 and "redis_calls" in unit[per], (phase, per)
            assert set(unit[per]["cpu_s"]) == {"prismd", "postgres", "redis"}, (phase, per)
    db = costs["pg_database"]["run"]  # --quick: one window over the run
    assert db["turns"] > 0 and db["per_turn"]["xact_commit"] > 0
    assert db["per_turn"]["tup_inserted"] > 0
    assert costs["idle_per_s"]["window_s"] > 0
    for key in ("cpu_prismd", "cpu_postgres", "redis_calls", "pg_statements"):
        assert key in costs["marginal"]["per_turn"] and key in costs["marginal"]["per_chunk"]
    assert "cpu_prismd" in emb["costs"]["marginal"]["per_chunk"]

    verdicts = {v["id"]: v for v in res["verdicts"]}
    assert verdicts["scale_out"]["met"] in (True, False)
    checks = list(verdicts["scale_out"]["value"])  # one per phase row, each judged
    assert len(checks) == 1 + len(cfg["bursts"]) + len(cfg["streams"])
    assert checks[0].startswith("overhead done p50")
    for n in cfg["bursts"]:
        assert any(c.startswith(f"bursts {n}: wall") for c in checks)
    for r in cfg["streams"]:
        assert any(c.startswith(f"streams {r}: lag p99") for c in checks)
    for heading in ("EMBEDDED", "SCALE-OUT", "S1. Per-turn overhead", "S2. Bursts", "S3. Streams"):
        assert heading in run.stdout
    assert "S6. Operations per turn and per chunk" in run.stdout
    assert "2 workers no worse than one embedded process" in run.stdout


def test_unbuilt_modes_say_so(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH), "--local", "--out", str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "not built yet" in run.stderr
    assert not (tmp_path / "r.json").exists()
