"""kill -9 at random points of a turn, restart: nothing a client saw is lost, seq continues,
resume works, and the next turn's history is consistent."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time

import pytest

from prismd.testing.fake_models import Reply

from .conftest import of_type, openai_env, text_of

CONFIG = """
[[agents]]
id = "assistant"
name = "Assistant"
auto_approve = ["shell"]
"""
PIECES = [f"w{i:03d} " for i in range(120)]


# More rounds: PRISMD_CRASH_SEEDS=100 make test (the soak does).
@pytest.mark.parametrize("seed", range(int(os.environ.get("PRISMD_CRASH_SEEDS", "5"))))
def test_kill_at_random_points_then_restart(make_server, fake_openai, seed):
    rng = random.Random(seed)
    srv = make_server(openai_env(fake_openai), config=CONFIG)
    fake_openai.script(Reply(text=["warm ", "up"]), match="warm")
    with srv.client() as c:
        warm = c.turn(message="warm")
    sid = warm[0]["sessionId"]

    fake_openai.reset()
    frames, point = _kill_during_turn(srv, fake_openai, rng, sid)
    seen_text = text_of(frames)
    seen_seq = max(f["seq"] for f in frames if "seq" in f)
    srv.start()

    # The session is intact; the answer holds exactly what had streamed, marked interrupted.
    msgs = srv.get(f"/api/sessions/{sid}/messages").json()
    assert [m["role"] for m in msgs[:2]] == ["user", "assistant"]
    assert msgs[2]["content"] == "crash me"
    answers = [m for m in msgs[3:] if m["role"] == "assistant"]
    if point == "during_tool":
        # The round that asked for the tool had ended; the tool never returned.
        assert answers[-1]["status"] == "complete" and answers[-1]["tool_calls"]
        assert not [m for m in msgs if m["role"] == "tool"]
    else:
        assert answers and answers[-1]["status"] == "interrupted", (point, msgs)
        assert answers[-1]["content"] == seen_text, point

    # seq continues after what the client saw; resume from there works and ends the turn.
    with srv.client() as c:
        c.send(type="resume", sessionId=sid, lastSeq=seen_seq)
        bound = c.recv()
        assert bound["type"] == "session" and bound["lastSeq"] >= seen_seq
        assert bound["turnRunning"] is False
        tail = c.until("context_usage")
    # The turn is closed in the log: `done` (interrupted, with the text that was kept), then
    # its context_usage, so a waiting client stops waiting.
    done = of_type(tail, "done")[0]
    assert done["stopReason"] == "interrupted" and tail[-1]["seq"] == bound["lastSeq"]
    if point != "during_tool":
        assert done["finalContent"] == seen_text
    assert {f["turnId"] for f in tail} == {of_type(frames, "start")[0]["turnId"]}
    assert all(f["seq"] > seen_seq for f in tail)

    # The next turn continues the numbering and sees a consistent history.
    fake_openai.reset()
    fake_openai.script(Reply(text=["after ", "crash"]))
    with srv.client() as c:
        after = c.turn(message="still there?", sessionId=sid)
    assert after[0]["type"] == "session" and after[1]["seq"] == bound["lastSeq"] + 1
    history = fake_openai.requests[-1]["messages"]
    roles = [m["role"] for m in history[1:]]
    assert roles[:3] == ["user", "assistant", "user"] and roles[-1] == "user"
    if point == "during_tool":
        # The call that never finished gets a result, or providers would refuse the history.
        tool = next(m for m in history if m["role"] == "tool")
        assert tool["tool_call_id"] == "t1" and "interrupted" in tool["content"]
    # The turn's clientMessageId is remembered across the crash: no second run.
    with srv.client() as c:
        c.send(type="chat", message="crash me", clientMessageId="crash-1", sessionId=sid)
        replay = c.until("context_usage")
    assert of_type(replay, "done")[0]["stopReason"] == "interrupted"
    assert len(fake_openai.requests) == 1

    # SQLite is consistent.
    db = sqlite3.connect(srv.data_dir / "prismd.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute(
        "SELECT seq, frame FROM session_events WHERE session_id=? ORDER BY seq", (sid,)
    ).fetchall()
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert all(json.loads(frame)["seq"] == seq for seq, frame in rows)


def _kill_during_turn(srv, fake, rng, sid: str) -> tuple[list[dict], str]:
    """Start a turn in `sid`, kill -9 the server at a random point of it; return the frames
    the client saw and the point. The random waits pick a point in a phase that does not end
    by itself before the kill (the model sends nothing, the tool runs 30 s): they decide where
    it is killed, never whether the phase is still on."""
    point = rng.choice(["before_first_chunk", "mid_stream", "mid_stream", "during_tool"])
    if point == "during_tool":
        call = {"id": "t1", "name": "shell", "arguments": '{"command": "sleep 30"}'}
        fake.script(Reply(tool_calls=[call]), match="crash me")
    else:
        silent = 0 if point == "before_first_chunk" else None  # no piece until it is killed
        fake.script(Reply(text=PIECES, delay_s=0.01, stall_after=silent), match="crash me")
    with srv.client() as c:
        c.send(type="chat", message="crash me", clientMessageId="crash-1", sessionId=sid)
        frames = c.until("start")
        if point == "mid_stream":
            wanted = rng.randint(1, 80)
            while len(of_type(frames, "chunk")) < wanted:
                frames.append(c.recv())
        elif point == "during_tool":
            frames += c.until("tool_start")
            time.sleep(rng.uniform(0.1, 0.5))
        else:
            time.sleep(rng.uniform(0.1, 0.8))
        srv.kill()
        try:
            while True:
                frames.append(c.recv(timeout=0.5))
        except Exception:  # noqa: BLE001 - the connection died with the server
            pass
    return frames, point
