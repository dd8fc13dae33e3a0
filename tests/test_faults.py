"""Transport faults between prismd and its model, injected by a TCP proxy (FaultProxy) in front
of the scripted fake: refused and reset connections, resets and clean closes after the first
token, stalls, slow trickles, and a body that ends cleanly before the stream is complete.

Every turn must end (bounded), with `done` or a turn-ending `error` (`provider_error` or
`provider_timeout`); a retry happens only while nothing has streamed; the streamed prefix is
stored; and the session takes its next turn with the history intact. HTTP-level failures (429,
5xx, invalid JSON) are scripted in the fake and covered by test_providers.py.

Timings decide nothing here: the receive deadlines only bound the waits, and what must not
happen (a retry, a late frame) is checked once the turn is over on the server (`turn_over`),
when nothing more can come of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prismd.testing.fake_models import FakeModelServer, Reply
from prismd.testing.fault_proxy import Fault, FaultProxy

from .conftest import Client, PrismdServer, of_type, text_of

TIMEOUT_S = 1.0  # idle timeout of the provider
RETRIES = 2
CONFIG = f"""
[providers.openai]
timeout_s = {TIMEOUT_S}
max_retries = {RETRIES}
"""
# The backoff before retries 1 and 2 (the SDK's, or the turn runner's for a stream that broke
# after its headers) is at most 0.5 s + 1.0 s.
BACKOFF_S = 1.5
# Receive deadlines: they only bound a wait (a turn that never ends fails), far past its end.
WAIT_S = 30

# Event 1 of an OpenAI stream is the role chunk, event 2 the first token ("kept ").
FIRST_TOKEN = 2


def long_reply() -> Reply:
    """Still streaming when a fault strikes after the first token (an upstream close shows: the
    fake counts an abort only while it has pieces left to send, 12 s of them); answers one
    request only, so the next turn gets the fake's echo."""
    return Reply(text=["kept ", "text ", *["more "] * 60], delay_s=0.2, times=1)


@pytest.fixture(scope="module")
def proxy(fake_openai: FakeModelServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", fake_openai.port) as p:
        yield p


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, proxy: FaultProxy, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    env = {
        "OPENAI_BASE_URL": proxy.url_for("/v1"),
        "OPENAI_API_KEY": "test-key",
        "PRISMD_MODEL": "gpt-4o-mini",
    }
    server = PrismdServer(tmp_path_factory.mktemp("faults"), env, CONFIG)
    server.start()
    fake_openai.reset()  # no rule left over from another module
    with server.client() as c:  # warm up (lazy SDK import, first client): timings stay tight
        assert of_type(c.turn(message="warm up"), "done")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean_proxy(proxy: FaultProxy, fake_openai: FakeModelServer) -> Iterator[None]:
    proxy.reset()
    yield
    proxy.reset()


# ---------------------------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def turn_over(srv: PrismdServer) -> None:
    """Wait until no turn runs on the server. A turn retries and publishes only while it runs
    (its task ends the turn last), so what has not happened by then never will."""
    assert wait_for(lambda: srv.get("/api/health").json()["runningTurns"] == 0, timeout=WAIT_S)


def assert_turn_error(frames: list[dict[str, Any]], code: str) -> dict[str, Any]:
    """The turn ended with a coded error that carries the turn's id and the next seq."""
    err = frames[-1]
    assert err["type"] == "error", [f["type"] for f in frames]
    assert err["code"] == code, err
    start = of_type(frames, "start")[0]
    assert err["turnId"] == start["turnId"] and err["sessionId"] == start["sessionId"]
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap: error is the last seq
    assert of_type(frames, "done") == []
    assert "test-key" not in err["error"]
    return err


def stored(srv: PrismdServer, sid: str) -> list[dict[str, Any]]:
    resp = srv.get(f"/api/sessions/{sid}/messages")
    assert resp.status_code == 200
    return resp.json()


def history(request: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in request["messages"] if m["role"] != "system"]


def assert_next_turn_ok(
    c: Client, sid: str, fake: FakeModelServer, expected: list[tuple[str, Any]]
) -> None:
    """The session takes a normal turn (message "and now?"), and the model gets `expected`:
    the earlier turn as history, then the new message."""
    frames = c.turn(message="and now?", sessionId=sid)
    done = of_type(frames, "done")
    assert done and done[0]["stopReason"] == "end", frames[-1]
    assert done[0]["finalContent"].startswith("You said: ")  # the fake's echo
    assert history(fake.requests[-1]) == expected


# ------------------------------------------------- faults before the first token: retried

# Event 1 (the role chunk) carries no text: a fault after it is after the headers but before
# the first token. The SDK retries failures before the response headers; prismd's turn runner
# retries a stream that broke after them as long as nothing was produced.
AFTER_HEADERS = 1


@pytest.mark.parametrize(
    ("fault", "requests"),
    [
        pytest.param(Fault.refuse(), 1, id="refused"),
        pytest.param(Fault.reset_before_response(), 2, id="reset-before-response"),
        pytest.param(Fault.truncate_after_bytes(0), 2, id="closed-before-response"),
        pytest.param(Fault.reset_after_bytes(40), 2, id="reset-inside-headers"),
        pytest.param(Fault.stall_after_bytes(0), 2, id="stall-before-response"),
        pytest.param(Fault.reset_after_events(AFTER_HEADERS), 2, id="reset-after-headers"),
        pytest.param(Fault.truncate_after_events(AFTER_HEADERS), 2, id="truncate-after-headers"),
        pytest.param(Fault.stall_after_events(AFTER_HEADERS), 2, id="stall-after-headers"),
        pytest.param(  # the first token's event is cut in the middle: no text came out
            Fault.reset_after_events(AFTER_HEADERS, n=60), 2, id="reset-inside-first-token"
        ),
        pytest.param(
            Fault.end_body_after_events(AFTER_HEADERS),
            2,
            id="clean-end-of-body-after-headers",
        ),
    ],
)
def test_fault_before_the_first_token_is_retried_once_and_succeeds(
    srv, proxy, fake_openai, fault, requests
):
    fake_openai.script(Reply(text=["all ", "good"]))
    proxy.set_fault(fault, times=1)
    with srv.client() as c:
        # A stall is ended by the 1 s idle timeout: were it not, the turn would not end.
        frames = c.turn(message="hi", timeout=WAIT_S)
        sid = frames[0]["sessionId"]
        done = of_type(frames, "done")
        assert done, frames[-1]
        assert done[0]["stopReason"] == "end" and done[0]["finalContent"] == "all good"
        assert text_of(frames) == "all good"  # streamed once, nothing duplicated
        turn_over(srv)
        counts = (len(fake_openai.requests), proxy.faulted, proxy.connections)
        assert counts == (requests, 1, 2), counts  # one retry, on a new connection
        msgs = stored(srv, sid)
        assert [(m["role"], m["status"], m["content"]) for m in msgs] == [
            ("user", "complete", "hi"),
            ("assistant", "complete", "all good"),
        ]


@pytest.mark.parametrize(
    ("fault", "code", "requests", "says"),
    [
        pytest.param(Fault.refuse(), "provider_error", 0, "Cannot reach", id="refused"),
        pytest.param(
            Fault.reset_before_response(), "provider_error", 3, "Cannot reach", id="reset"
        ),
        pytest.param(Fault.stall_after_bytes(0), "provider_timeout", 3, "timed out", id="stall"),
        pytest.param(
            Fault.reset_after_events(AFTER_HEADERS),
            "provider_error",
            3,
            "broke",
            id="reset-after-headers",
        ),
        pytest.param(
            Fault.stall_after_events(AFTER_HEADERS),
            "provider_timeout",
            3,
            "timed out",
            id="stall-after-headers",
        ),
    ],
)
def test_persistent_fault_before_the_first_token_exhausts_the_retries(
    srv, proxy, fake_openai, fault, code, requests, says
):
    proxy.set_fault(fault)  # every connection, until cleared
    with srv.client() as c:
        frames = c.turn(message="hi", timeout=WAIT_S)
        err = assert_turn_error(frames, code)
        assert says in err["error"]
        assert text_of(frames) == ""
        turn_over(srv)
        assert proxy.faulted == RETRIES + 1  # the first try and two retries, no more
        assert len(fake_openai.requests) == requests
        assert c.nothing_pending()  # nothing after the turn-ending error
        sid = frames[0]["sessionId"]
        msgs = stored(srv, sid)
        assert [(m["role"], m["status"], m["content"]) for m in msgs] == [
            ("user", "complete", "hi"),
            ("assistant", "error", ""),
        ]
        proxy.clear()
        # Nothing was answered, so the two user messages reach the model as one.
        assert_next_turn_ok(c, sid, fake_openai, [("user", "hi\n\nand now?")])


def stop_while_waiting_to_retry(
    srv: PrismdServer, proxy: FaultProxy, c: Client
) -> list[dict[str, Any]]:
    """Start a turn whose first try breaks after the headers, and `stop` it while the runner
    waits to retry; the frames up to `done`."""
    proxy.set_fault(Fault.reset_after_events(AFTER_HEADERS))
    c.send(type="chat", message="hi")
    c.until("start", timeout=WAIT_S)
    # Try 1 broke and its connection is gone: the runner now waits 0.5 s to retry.
    assert wait_for(lambda: proxy.faulted == 1 and proxy.active == 0, timeout=WAIT_S)
    c.send(type="stop")
    return c.until("done", "error", timeout=WAIT_S)


def test_stop_while_waiting_to_retry_ends_the_turn_and_sends_nothing_more(srv, proxy, fake_openai):
    with srv.client() as c:
        frames = stop_while_waiting_to_retry(srv, proxy, c)
        done = frames[-1]
        assert done["type"] == "done" and done["stopReason"] == "stopped", done
        assert done["finalContent"] == ""
        turn_over(srv)
        assert proxy.faulted == 1 and len(fake_openai.requests) == 1  # no retry after stop
        msgs = stored(srv, done["sessionId"])
        assert (msgs[-1]["role"], msgs[-1]["status"]) == ("assistant", "stopped")


def test_stop_while_waiting_to_retry_still_reports_context_usage(srv, proxy, fake_openai):
    with srv.client() as c:
        stop_while_waiting_to_retry(srv, proxy, c)
        assert c.recv()["type"] == "context_usage"


# ---------------------------------------- faults after the first token: kept, never retried


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        pytest.param(Fault.reset_after_events(FIRST_TOKEN), "provider_error", id="reset"),
        pytest.param(
            Fault.reset_after_events(FIRST_TOKEN, n=25), "provider_error", id="reset-mid-event"
        ),
        pytest.param(Fault.truncate_after_events(FIRST_TOKEN), "provider_error", id="truncate"),
        pytest.param(
            Fault.truncate_after_events(FIRST_TOKEN, n=25),
            "provider_error",
            id="truncate-mid-event",
        ),
        pytest.param(Fault.stall_after_events(FIRST_TOKEN), "provider_timeout", id="stall"),
        pytest.param(
            Fault.stall_after_events(FIRST_TOKEN, n=25), "provider_timeout", id="stall-mid-event"
        ),
        pytest.param(
            Fault.end_body_after_events(FIRST_TOKEN),
            "provider_error",
            id="clean-end-of-body",
        ),
    ],
)
def test_fault_after_the_first_token_keeps_the_partial_and_is_not_retried(
    srv, proxy, fake_openai, fault, code
):
    fake_openai.script(long_reply())
    # Only the first connection is faulty: a retry would succeed and repeat "kept ".
    proxy.set_fault(fault, times=1)
    with srv.client() as c:
        c.send(type="chat", message="hi")
        frames = c.until("chunk", timeout=WAIT_S)
        frames += c.until_turn_end(timeout=WAIT_S)
        assert text_of(frames) == "kept "
        assert_turn_error(frames, code)
        # The turn gave up before the model's answer was over: the upstream request was closed
        # while the fake still had pieces to send, not left running (a stall: by the idle
        # timeout; the other faults: at once, or the code would be provider_timeout).
        assert fake_openai.wait_aborted(1)
        turn_over(srv)
        assert len(fake_openai.requests) == 1  # not retried: the user already saw text
        assert proxy.connections == 1
        assert wait_for(lambda: proxy.active == 0)  # prismd closed the broken connection
        assert c.nothing_pending()
        sid = frames[0]["sessionId"]
        msgs = stored(srv, sid)
        assert [(m["role"], m["status"], m["content"]) for m in msgs] == [
            ("user", "complete", "hi"),
            ("assistant", "error", "kept "),
        ]
        assert msgs[1]["meta"].get("error")
        assert_next_turn_ok(
            c, sid, fake_openai, [("user", "hi"), ("assistant", "kept "), ("user", "and now?")]
        )


def test_reset_after_the_first_token_is_not_retried_even_with_retries_left(srv, proxy, fake_openai):
    """max_retries = 2 and the next connection would work, yet a retry would show the user
    the answer twice: the turn ends in an error after exactly one request."""
    fake_openai.script(Reply(text=["once ", "only ", "please"], delay_s=0.1))
    proxy.set_fault(Fault.reset_after_events(FIRST_TOKEN), times=1)
    with srv.client() as c:
        frames = c.turn(message="hi", timeout=10)
    assert_turn_error(frames, "provider_error")
    assert [f["delta"] for f in of_type(frames, "chunk")] == ["once "]
    assert len(of_type(frames, "start")) == 1
    turn_over(srv)  # a late retry would have been made by now
    assert len(fake_openai.requests) == 1 and proxy.connections == 1


# --------------------------------------------------------------------------- slow streams


def test_slow_trickle_within_the_idle_timeout_succeeds(srv, proxy, fake_openai):
    words = ["slow ", "but ", "stéady ", "wïns ", "the ", "räce ", "日本語"]
    fake_openai.script(Reply(text=words))
    # ~1.4 kB one byte at a time (multi-byte characters split across reads) at 1 kB/s: well
    # past the 1 s timeout in total, never idle for long.
    proxy.set_fault(Fault.trickle(bytes_per_s=1000, chunk=1), times=1)
    with srv.client() as c:
        started = time.monotonic()
        frames = c.turn(message="hi", timeout=20)
        elapsed = time.monotonic() - started
        sid = frames[0]["sessionId"]
    done = of_type(frames, "done")
    assert done, frames[-1]
    assert done[0]["finalContent"] == "".join(words) == text_of(frames)
    assert done[0]["stopReason"] == "end"
    assert elapsed > 1.3 * TIMEOUT_S  # the timeout is an idle timeout, not a total one
    assert len(fake_openai.requests) == 1 and proxy.faulted == 1
    assert stored(srv, sid)[-1]["status"] == "complete"


def test_a_client_gone_during_a_stall_gets_the_error_on_resume(srv, proxy, fake_openai):
    fake_openai.script(long_reply())
    proxy.set_fault(Fault.stall_after_events(FIRST_TOKEN), times=1)
    c = srv.client()
    c.send(type="chat", message="hi")
    seen = c.until("chunk", timeout=10)
    sid, last = seen[-1]["sessionId"], seen[-1]["seq"]
    c.close()  # the turn goes on without any client, and times out
    assert wait_for(lambda: stored(srv, sid)[-1]["status"] == "error", timeout=WAIT_S)
    with srv.client() as r:
        r.send(type="resume", sessionId=sid, lastSeq=last)
        bound = r.recv()
        assert bound["type"] == "session" and bound["turnRunning"] is False
        err = r.recv()
        assert (err["type"], err["code"], err["seq"]) == ("error", "provider_timeout", last + 1)
        assert err["turnId"] == seen[-1]["turnId"]
        assert r.nothing_pending()
    assert stored(srv, sid)[-1]["content"] == "kept "


def test_a_fault_on_one_stream_leaves_a_concurrent_stream_alone(srv, proxy, fake_openai):
    fake_openai.script(Reply(text=[f"a{i} " for i in range(8)], delay_s=0.1), match="first")
    fake_openai.script(long_reply(), match="second")
    with srv.client() as a, srv.client() as b:
        a.send(type="chat", message="first")
        head = a.until("chunk", timeout=10)
        # Stream A holds its connection, so B's request needs a new one: only B is faulted.
        proxy.set_fault(Fault.reset_after_events(FIRST_TOKEN), times=1, drop=False)
        frames_b = b.turn(message="second", timeout=10)
        frames_a = head + a.until_turn_end(timeout=10)
    assert_turn_error(frames_b, "provider_error")
    assert text_of(frames_b) == "kept "
    assert of_type(frames_a, "done")[0]["finalContent"] == "".join(f"a{i} " for i in range(8))
    assert text_of(frames_a) == "".join(f"a{i} " for i in range(8))
    assert proxy.faulted == 1 and len(fake_openai.requests) == 2


def test_stop_during_a_stall_mid_event_ends_the_turn_with_the_partial(srv, proxy, fake_openai):
    fake_openai.script(long_reply())
    proxy.set_fault(Fault.stall_after_events(FIRST_TOKEN, n=25), times=1)
    with srv.client() as c:
        c.send(type="chat", message="hi")
        frames = c.until("chunk", timeout=10)
        c.send(type="stop")
        frames += c.until("context_usage", "error", timeout=WAIT_S)
        done = of_type(frames, "done")  # the stop ended it: the idle timeout ends in an error
        assert done, frames[-1]
        assert done[0]["stopReason"] == "stopped" and done[0]["finalContent"] == "kept "
        assert fake_openai.wait_aborted(1)
        assert wait_for(lambda: proxy.active == 0)
        sid = frames[0]["sessionId"]
        msgs = stored(srv, sid)
        assert (msgs[-1]["status"], msgs[-1]["content"]) == ("stopped", "kept ")
        assert_next_turn_ok(
            c, sid, fake_openai, [("user", "hi"), ("assistant", "kept "), ("user", "and now?")]
        )


# ------------------------------------------------------------------ mixed and later rounds


@pytest.mark.parametrize(
    ("last", "ok"),
    [pytest.param(None, True, id="third-try-succeeds"), pytest.param(500, False, id="third-500")],
)
def test_connection_and_status_failures_share_one_retry_budget(srv, proxy, fake_openai, last, ok):
    """Try 1 is refused by the proxy, try 2 is a 429 from the model, try 3 is the last."""
    fake_openai.script(Reply(status=429, headers={"Retry-After": "0"}, times=1))
    if last is not None:
        fake_openai.script(Reply(status=last, times=1))
    fake_openai.script(Reply(text=["third ", "time"]))
    proxy.set_fault(Fault.refuse(), times=1)
    with srv.client() as c:
        frames = c.turn(message="hi", timeout=BACKOFF_S + 10)
    assert len(fake_openai.requests) == 2 and proxy.faulted == 1
    if ok:
        assert of_type(frames, "done")[0]["finalContent"] == "third time"
    else:
        err = assert_turn_error(frames, "provider_error")
        assert "500" in err["error"]


def test_failure_in_a_later_round_keeps_the_tool_round_and_a_valid_history(srv, proxy, fake_openai):
    """Round 1 calls a tool; round 2 is cut after its first token (the fake hangs up: round 2
    reuses round 1's pooled connection, so a per-connection proxy fault cannot target it)."""
    args = {"id": "call_1", "name": "current_time", "arguments": "{}"}
    fake_openai.script(Reply(text=[], tool_calls=[args], times=1))
    fake_openai.script(Reply(text=["Half ", "an ", "answer"], disconnect_after=1, times=1))
    with srv.client() as c:
        frames = c.turn(message="what time is it?", timeout=15)
        assert_turn_error(frames, "provider_error")
        assert [f["status"] for f in of_type(frames, "tool_end")] == ["ok"]
        assert text_of(frames) == "Half "
        assert len(fake_openai.requests) == 2  # round 2 was not retried either
        sid = frames[0]["sessionId"]
        msgs = stored(srv, sid)
        assert [(m["role"], m["status"]) for m in msgs] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("tool", "complete"),
            ("assistant", "error"),
        ]
        assert json.loads(msgs[1]["tool_calls"])[0]["name"] == "current_time"
        assert msgs[3]["content"] == "Half "
        frames = c.turn(message="and now?", sessionId=sid)
    assert of_type(frames, "done")[0]["stopReason"] == "end"
    sent = [m for m in fake_openai.requests[-1]["messages"] if m["role"] != "system"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["tool_calls"][0]["id"] == sent[2]["tool_call_id"]
    assert sent[3]["content"] == "Half "
