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


@pytest.mark.parametrize("flag", ["--scale-out", "--local"])
def test_unbuilt_modes_say_so(flag, tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH), flag, "--out", str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "not built yet" in run.stderr
    assert not (tmp_path / "r.json").exists()
