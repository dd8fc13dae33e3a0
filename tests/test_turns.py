"""Turns belong to sessions: stop, disconnect, resume, two tabs, one turn at a time,
idempotent send, and restart with sessions intact."""

from __future__ import annotations

import threading
import time
from typing import Any

from prismd.testing.fake_models import Reply

from .conftest import of_type, openai_env, text_of
from .waiting import wait_for

# Run in both configurations: one process on SQLite, and PostgreSQL + Redis (conftest.py).
BACKENDS = ("embedded", "scaled")

SLOW = Reply(text=[f"w{i} " for i in range(40)], delay_s=0.05)


def test_stop_closes_upstream_keeps_partial_and_ends_with_done(server, fake_openai):
    fake_openai.script(SLOW)
    with server.client() as c:
        c.send(type="chat", message="long story")
        head = c.until("chunk")
        for _ in range(3):
            head.append(c.recv())
        c.send(type="stop")
        rest = c.until("context_usage")
    frames = head + rest
    kinds = [f["type"] for f in frames]
    assert "stopped" in kinds and kinds.index("stopped") < kinds.index("done")
    stopped = of_type(frames, "stopped")[0]
    assert stopped["seq"] and stopped["turnId"] == frames[1]["turnId"]
    done = of_type(frames, "done")[0]
    assert done["stopReason"] == "stopped"
    partial = text_of(frames)
    assert done["finalContent"] == partial
    assert 0 < len(partial) < len("".join(SLOW.text))
    # The upstream request was really closed, not left generating.
    assert fake_openai.wait_aborted(1)
    msgs = server.get(f"/api/sessions/{frames[0]['sessionId']}/messages").json()
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["status"] == "stopped" and msgs[1]["content"] == partial


def test_session_takes_a_new_turn_after_stop(server, fake_openai):
    fake_openai.script(SLOW, match="slow")
    with server.client() as c:
        c.send(type="chat", message="slow")
        c.until("chunk")
        c.send(type="stop")
        c.until("context_usage")
        frames = c.turn(message="and now?")
    assert of_type(frames, "done")[0]["stopReason"] == "end"


def test_disconnect_does_not_stop_the_turn_and_resume_replays_without_loss(server, fake_openai):
    fake_openai.script(Reply(text=[f"p{i} " for i in range(30)], delay_s=0.03))
    c = server.client()
    c.send(type="chat", message="go")
    seen = c.until("chunk")
    seen += [c.recv(), c.recv()]
    sid = seen[0]["sessionId"]
    last_seq = seen[-1]["seq"]
    c.close()  # page reload in the middle of the answer
    with server.client() as r:
        r.send(type="resume", sessionId=sid, lastSeq=last_seq)
        reply = r.recv()
        assert reply["type"] == "session" and reply["sessionId"] == sid
        assert reply["turnRunning"] is True and reply["lastSeq"] >= last_seq
        rest = r.until("context_usage", timeout=20)
    seqs = [f["seq"] for f in rest]
    assert seqs == list(range(last_seq + 1, last_seq + 1 + len(rest)))  # no gap, no duplicate
    whole = text_of(seen) + text_of(rest)
    assert whole == "".join(f"p{i} " for i in range(30))
    assert of_type(rest, "done")[0]["finalContent"] == whole
    assert fake_openai.aborted == 0


def test_turn_finishes_and_is_stored_with_nobody_connected(server, fake_openai):
    fake_openai.script(Reply(text=["a", "b", "c"], delay_s=0.1))
    c = server.client()
    c.send(type="chat", message="go")
    sid = c.until("start")[0]["sessionId"]
    c.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msgs = server.get(f"/api/sessions/{sid}/messages").json()
        if msgs and msgs[-1]["status"] == "complete":
            break
        time.sleep(0.1)
    assert msgs[-1]["content"] == "abc" and msgs[-1]["status"] == "complete"
    # A later resume from the beginning replays the whole turn.
    with server.client() as r:
        r.send(type="resume", sessionId=sid, lastSeq=0)
        frames = r.until("context_usage")
    assert text_of(frames) == "abc"
    assert [f["seq"] for f in frames[1:]] == list(range(1, len(frames)))


def test_resume_without_last_seq_shows_the_running_turn(server, fake_openai):
    fake_openai.script(Reply(text=[f"x{i}" for i in range(20)], delay_s=0.03))
    with server.client() as a:
        a.send(type="chat", message="go")
        first = a.until("chunk")
        sid = first[0]["sessionId"]
        with server.client() as b:
            b.send(type="resume", sessionId=sid)
            frames = b.until("context_usage")
        a.until("context_usage")
    assert frames[0]["type"] == "session" and frames[0]["turnRunning"] is True
    assert frames[1]["type"] == "start"
    assert text_of(frames) == "".join(f"x{i}" for i in range(20))


def test_resume_gap_when_last_seq_is_outside_the_log(server):
    with server.client() as c:
        sid = c.turn(message="hi")[0]["sessionId"]
        c.send(type="resume", sessionId=sid, lastSeq=10_000)
        err = c.recv()
    assert err["type"] == "error" and err["code"] == "resume_gap"


def test_two_tabs_receive_the_same_events(server, fake_openai):
    fake_openai.script(Reply(text=["one ", "two ", "three"], delay_s=0.05))
    with server.client() as a, server.client() as b:
        sid = a.turn(message="warm up")[0]["sessionId"]
        b.send(type="resume", sessionId=sid, lastSeq=a_last(server, sid))
        assert b.recv()["type"] == "session"
        a.send(type="chat", message="count")
        fa = a.until("context_usage")
        fb = b.until("context_usage")
    assert fa == fb
    assert text_of(fb) == "one two three"


def a_last(server, sid: str) -> int:
    return server.get(f"/api/sessions/{sid}").json()["last_seq"]


def test_two_chats_back_to_back_start_exactly_one_turn(server, fake_openai):
    fake_openai.script(Reply(text=["only ", "once"], delay_s=0.05))
    with server.client() as c:
        c.send(type="chat", message="first", clientMessageId="a")
        c.send(type="chat", message="second", clientMessageId="b")
        frames = c.until("context_usage")
    errors = of_type(frames, "error")
    assert len(errors) == 1 and errors[0]["code"] == "turn_in_progress"
    assert errors[0]["error"] == "A turn is already in progress — wait for it to finish"
    assert "seq" not in errors[0]
    assert len(of_type(frames, "start")) == 1
    assert len(fake_openai.requests) == 1


def test_two_tabs_racing_start_exactly_one_turn(server, fake_openai):
    fake_openai.script(Reply(text=["x"], delay_s=0.2))
    with server.client() as a:
        sid = a.turn(message="warm")[0]["sessionId"]
    fake_openai.reset()
    fake_openai.script(Reply(text=["slow"], first_delay_s=0.3))
    tabs = [server.client() for _ in range(4)]
    results: list[list[dict]] = [[] for _ in tabs]
    barrier = threading.Barrier(len(tabs))

    def fire(i: int) -> None:
        barrier.wait()
        tabs[i].send(type="chat", message=f"tab {i}", sessionId=sid)
        results[i] = tabs[i].until("context_usage", "error")

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(len(tabs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for t in tabs:
        t.close()
    ended = [r[-1]["type"] for r in results]
    assert ended.count("context_usage") == 1
    assert ended.count("error") == 3
    assert all(r[-1]["code"] == "turn_in_progress" for r in results if r[-1]["type"] == "error")
    assert len(fake_openai.requests) == 1


def test_repeated_client_message_id_replays_instead_of_rerunning(server, fake_openai):
    fake_openai.script(Reply(text=["unique ", "answer"]))
    with server.client() as c:
        first = c.turn(message="q", clientMessageId="cm-1")
        sid = first[0]["sessionId"]
    with server.client() as c:
        c.send(type="chat", message="q", clientMessageId="cm-1", sessionId=sid)
        again = c.until("context_usage")
    assert len(fake_openai.requests) == 1
    assert again[0]["type"] == "session"
    assert again[1:] == first[1:]  # the same events, same seqs
    msgs = server.get(f"/api/sessions/{sid}/messages").json()
    assert len(msgs) == 2


def test_restart_keeps_sessions_history_and_seq(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai))
    fake_openai.script(Reply(text=["remembered"]), match="first")
    with srv.client() as c:
        frames = c.turn(message="first")
    sid, last = frames[0]["sessionId"], frames[-1]["seq"]
    srv.restart()
    fake_openai.script(Reply(text=["again"]), match="second")
    with srv.client() as c:
        c.send(type="resume", sessionId=sid, lastSeq=last)
        assert c.recv()["lastSeq"] == last
        frames2 = c.turn(message="second", sessionId=sid)
    assert frames2[0]["seq"] == last + 1  # seq survives the restart
    msgs = fake_openai.requests[-1]["messages"]
    assert [(m["role"], m["content"]) for m in msgs[1:]] == [
        ("user", "first"),
        ("assistant", "remembered"),
        ("user", "second"),
    ]
    # Replay after the restart reaches back into the first server's events.
    with srv.client() as c:
        c.send(type="resume", sessionId=sid, lastSeq=0)
        replay = c.until("context_usage")
        replay += c.until("context_usage")
    assert [f["seq"] for f in replay[1:]] == list(range(1, frames2[-1]["seq"] + 1))


def test_kill_mid_stream_keeps_the_partial_answer(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai))
    fake_openai.script(Reply(text=[f"k{i} " for i in range(100)], delay_s=0.02), match="long")
    with srv.client() as c:
        c.send(type="chat", message="long")
        frames = c.until("chunk")
        while len(of_type(frames, "chunk")) < 40:
            frames.append(c.recv())
        srv.kill()
    sid = frames[0]["sessionId"]
    srv.start()

    # One process: repaired at start. Several (scaled): once the dead process's lease on the
    # session has run out, by whichever process notices first.
    def repaired() -> list[dict[str, Any]] | None:
        msgs: list[dict[str, Any]] = srv.get(f"/api/sessions/{sid}/messages").json()
        return msgs if msgs[-1]["status"] != "streaming" else None

    msgs = wait_for(repaired, "the crashed turn to be repaired")
    assert msgs[-1]["role"] == "assistant" and msgs[-1]["status"] == "interrupted"
    assert msgs[-1]["content"].startswith(text_of(frames))
    session = srv.get(f"/api/sessions/{sid}").json()
    assert session["last_seq"] >= frames[-1]["seq"]
    with srv.client() as c:
        after = c.turn(message="still there?", sessionId=sid)
    assert after[1]["seq"] == session["last_seq"] + 1
    assert of_type(after, "done")[0]["stopReason"] == "end"


def test_closed_session_is_reactivated_by_chat(server):
    with server.client() as c:
        sid = c.turn(message="a")[0]["sessionId"]
        c.send(type="new_session")
        c.recv()
    assert server.get(f"/api/sessions/{sid}").json()["status"] == "closed"
    with server.client() as c:
        c.turn(message="b", sessionId=sid)
    assert server.get(f"/api/sessions/{sid}").json()["status"] == "active"


def test_many_sessions_get_distinct_ids(server):
    ids = set()
    clients = [server.client() for _ in range(10)]
    for c in clients:
        c.send(type="chat", message="hi")
    for c in clients:
        ids.add(c.until("session")[0]["sessionId"])
        c.until("context_usage")
        c.close()
    assert len(ids) == 10
