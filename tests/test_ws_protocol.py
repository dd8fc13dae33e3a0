"""Protocol parts A and B1/B2/B4 over a real WebSocket: every message type, every refusal."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from prismd.testing.fake_models import Reply

from .conftest import of_type, text_of
from .waiting import wait_for

# Run in both configurations: one process on SQLite, and PostgreSQL + Redis (conftest.py).
BACKENDS = ("embedded", "scaled")


def test_connected_carries_protocol_server_and_connection_id(server):
    with server.client() as c:
        hello = c.connected
        assert hello["protocol"] == 1
        assert hello["server"].startswith("prismd/")
        assert hello["connectionId"]
    with server.client() as other:
        assert other.connected["connectionId"] != hello["connectionId"]


def test_plain_get_ws_answers_426(server):
    resp = httpx.get(f"{server.url}/ws")
    assert resp.status_code == 426


def test_ping_pong(server):
    with server.client() as c:
        c.send(type="ping")
        assert c.recv() == {"type": "pong"}


def test_chat_streams_a_turn_in_protocol_order(server, fake_openai):
    # The model waits 0.2 s before its first piece and 0.05 s between pieces: at least 0.35 s.
    paced = {"first_delay_s": 0.2, "delay_s": 0.05}
    fake_openai.script(Reply(text=["Hel", "lo ", "there", "!"], usage=(42, 7), **paced))
    with server.client() as c:
        sent = time.monotonic()
        frames = c.turn(message="hi")
        seen_ms = (time.monotonic() - sent) * 1000  # from the chat sent to all frames read
    kinds = [f["type"] for f in frames]
    # Pieces that arrive while the previous event is still being logged are merged into one
    # `chunk` (tests/test_sessions_service.py): how many chunks depends on timing, the text
    # does not.
    chunks = len(of_type(frames, "chunk"))
    assert 1 <= chunks <= 4
    assert kinds == ["session", "start", *["chunk"] * chunks, "done", "context_usage"]
    session, start, *_ = frames
    done, usage = frames[-2], frames[-1]
    sid = session["sessionId"]
    assert session["agentId"] == "assistant" and session["agentName"] == "Assistant"
    assert "seq" not in session
    # seq grows by exactly one per event, all events carry session and turn.
    seqs = [f["seq"] for f in frames[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {f["sessionId"] for f in frames[1:]} == {sid}
    assert {f["turnId"] for f in frames[1:]} == {start["turnId"]}
    assert text_of(frames) == "Hello there!" == done["finalContent"]
    assert done["tokensIn"] == 42 and done["tokensOut"] == 7
    assert done["stopReason"] == "end"
    assert done["model"] == done["resolvedModel"] == "gpt-4o-mini"
    assert done["resolvedProvider"] == "openai"
    assert done["requestedModelMode"] == "manual"
    assert done["autoFallback"] is False and done["autoFallbackReason"] is None
    assert done["reasoningEffort"] is None
    # The figures measure the turn: the model's pauses are in them, they fit in the turn, and
    # the turn fits in what the client saw (the same monotonic clock: one machine).
    latency = done["latency"]
    assert latency["firstTokenMs"] >= 200
    assert latency["llmMs"] >= 200 + 3 * 50
    assert latency["toolMs"] == 0
    assert latency["firstTokenMs"] <= latency["totalMs"] and latency["llmMs"] <= latency["totalMs"]
    assert abs(done["durationMs"] - latency["totalMs"]) <= 0.55  # the same time, rounded
    assert latency["totalMs"] <= seen_ms
    # Priced by genai-prices: gpt-4o-mini is $0.15/M in, $0.60/M out.
    assert done["costUsd"] == pytest.approx(42 * 0.15e-6 + 7 * 0.6e-6)
    assert done["costSource"]["table"] == "genai-prices"
    assert done["costSource"]["version"]
    assert usage["usedTokens"] == 49
    assert usage["maxContext"] == 128000
    assert usage["percentage"] == pytest.approx(round(100 * 49 / 128000, 1))
    assert set(usage["breakdown"]) == {
        "systemPrompt",
        "userMessages",
        "assistantMessages",
        "reasoningOverhead",
    }
    assert sum(usage["breakdown"].values()) == 49


def test_model_receives_system_prompt_and_message(server, fake_openai):
    with server.client() as c:
        c.turn(message="what is 2+2?")
    body = fake_openai.requests[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "what is 2+2?"}


def test_second_turn_in_session_sends_history_and_continues_seq(server, fake_openai):
    fake_openai.script(Reply(text=["first answer"]), match="one")
    fake_openai.script(Reply(text=["second answer"]), match="two")
    with server.client() as c:
        first = c.turn(message="one")
        second = c.turn(message="two")
    assert of_type(second, "session") == []  # already bound
    assert second[0]["seq"] == first[-1]["seq"] + 1
    msgs = fake_openai.requests[-1]["messages"]
    assert [(m["role"], m["content"]) for m in msgs[1:]] == [
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "two"),
    ]


def test_reasoning_is_forwarded_before_done(server, fake_openai):
    fake_openai.script(Reply(text=["42"], reasoning=["Let me ", "think."], reasoning_tokens=5))
    with server.client() as c:
        frames = c.turn(message="q")
    kinds = [f["type"] for f in frames]
    assert kinds.index("reasoning") < kinds.index("done")
    assert of_type(frames, "reasoning")[0]["content"] == "Let me think."
    assert frames[-1]["breakdown"]["reasoningOverhead"] == 5
    assert frames[-2]["finalContent"] == "42"


def test_unknown_model_has_null_cost_and_source(server, fake_openai):
    with server.client() as c:
        done = of_type(c.turn(message="x", model="my-local-finetune"), "done")[0]
    assert done["costUsd"] is None and done["costSource"] is None
    assert done["resolvedModel"] == "my-local-finetune"
    assert fake_openai.requests[-1]["model"] == "my-local-finetune"


def test_reasoning_effort_and_model_mode_echo(server, fake_openai):
    with server.client() as c:
        done = of_type(c.turn(message="x", reasoningEffort="high", modelMode="auto"), "done")[0]
    assert done["reasoningEffort"] == "high"
    assert done["requestedModelMode"] == "auto"
    assert fake_openai.requests[-1]["reasoning_effort"] == "high"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1,2]", "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        ('{"message": "no type"}', "invalid_message"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "chat", "message": 42}', "invalid_message"),
        ('{"type": "chat", "message": "x", "files": "nope"}', "invalid_message"),
        ('{"type": "chat", "message": "x", "reasoningEffort": "max"}', "invalid_message"),
        ('{"type": "select_agent"}', "invalid_message"),
        ('{"type": "resume", "sessionId": "s", "lastSeq": -1}', "invalid_message"),
        ('{"type": "chat", "message": "   "}', "empty_message"),
        ('{"type": "chat", "message": "x", "sessionId": "../../etc/passwd"}', "invalid_session_id"),
        ('{"type": "chat", "message": "x", "sessionId": ""}', "invalid_session_id"),
        ('{"type": "chat", "message": "x", "agentId": "nobody"}', "agent_not_found"),
        ('{"type": "resume", "sessionId": "sess_never_seen"}', "session_not_found"),
        ('{"type": "audio_chunk", "data": "%%%", "session": true}', "invalid_message"),
        ('{"type": "audio_end"}', "transcription_failed"),
        ('{"type": "speak", "text": "  "}', "empty_message"),
        ('{"type": "voice_stream", "action": "jump"}', "invalid_message"),
        ('{"type": "voice_stream", "action": "start", "sampleRate": 5}', "invalid_message"),
        ('{"type": "approval_response", "requestId": "r1", "approved": true}', "tool_error"),
        ('{"type": "voice_state", "speaking": true}', "session_not_found"),
    ],
)
def test_bad_input_gets_a_coded_error_and_the_socket_stays_open(server, raw, code):
    with server.client() as c:
        c.send_raw(raw)
        err = c.recv()
        assert err["type"] == "error" and err["code"] == code, err
        assert isinstance(err["error"], str) and err["error"]
        assert "seq" not in err
        assert "Traceback" not in err["error"]
        c.send(type="ping")
        assert c.recv()["type"] == "pong"


def test_invalid_message_names_the_field(server):
    with server.client() as c:
        c.send(type="chat", message="hi", files=[{"filename": "a.txt", "data": 7}])
        err = c.recv()
    assert err["code"] == "invalid_message"
    assert err["details"]["field"] == "files.0.data"


def test_agent_not_found_message_matches_cortexprism(server):
    with server.client() as c:
        c.send(type="select_agent", agentId="ghost")
        err = c.recv()
    assert err["error"] == 'Agent "ghost" not found' and err["code"] == "agent_not_found"


def test_binary_frame_is_refused_with_a_code(server):
    with server.client() as c:
        c.send_raw(b"\x00\x01\x02")
        err = c.recv()
        assert err["code"] == "invalid_message"
        c.send(type="ping")
        assert c.recv()["type"] == "pong"


def test_select_agent_and_new_session(server):
    with server.client() as c:
        c.send(type="select_agent", agentId="assistant")
        assert c.recv() == {
            "type": "agent_selected",
            "agentId": "assistant",
            "agentName": "Assistant",
        }
        first = c.turn(message="hello")
        sid = first[0]["sessionId"]
        c.send(type="new_session")
        assert c.recv() == {"type": "session_ended"}
        second = c.turn(message="again")
        assert second[0]["type"] == "session" and second[0]["sessionId"] != sid
        assert second[1]["seq"] == 1  # a new session numbers from 1
    status = server.get(f"/api/sessions/{sid}").json()["status"]
    assert status == "closed"


def test_new_session_without_a_session_still_answers(server):
    with server.client() as c:
        c.send(type="new_session")
        assert c.recv() == {"type": "session_ended"}


def test_stop_with_nothing_running_is_answered(server):
    with server.client() as c:
        c.send(type="stop")
        frame = c.recv()
    assert frame["type"] == "stopped" and frame["turnRunning"] is False and "seq" not in frame


def test_chat_with_unknown_well_formed_session_id_creates_it(server):
    sid = "my-own-session_01"
    with server.client() as c:
        frames = c.turn(message="hello", sessionId=sid)
    assert frames[0] == {
        "type": "session",
        "sessionId": sid,
        "agentId": "assistant",
        "agentName": "Assistant",
    }
    stored = server.get(f"/api/sessions/{sid}")
    assert stored.status_code == 200 and stored.json()["id"] == sid


def test_oversized_frame_gets_payload_too_large(make_server, fake_openai):
    from .conftest import openai_env

    srv = make_server(openai_env(fake_openai), config="[server]\nmax_frame_bytes = 4096\n")
    with srv.client() as c:
        c.send(type="chat", message="x" * 5000)
        err = c.recv()
        assert err["code"] == "payload_too_large"
        c.send(type="ping")
        assert c.recv()["type"] == "pong"


def test_file_limits(make_server, fake_openai):
    from .conftest import openai_env

    srv = make_server(
        openai_env(fake_openai), config="[server]\nmax_files = 2\nmax_file_bytes = 100\n"
    )
    small = base64.b64encode(b"tiny").decode()
    with srv.client() as c:
        c.send(
            type="chat",
            message="x",
            files=[
                {"filename": f"{i}.txt", "mimeType": "text/plain", "data": small} for i in range(3)
            ],
        )
        assert c.recv()["code"] == "payload_too_large"
        big = base64.b64encode(b"y" * 101).decode()
        c.send(type="chat", message="x", files=[{"filename": "big.txt", "data": big}])
        assert c.recv()["code"] == "payload_too_large"
        c.send(type="chat", message="x", files=[{"filename": "bad.txt", "data": "@@not base64@@"}])
        err = c.recv()
        assert err["code"] == "invalid_message" and err["details"]["field"] == "files.0.data"
    assert fake_openai.requests == []


def test_voice_state_is_relayed_to_the_other_tabs(server):
    with server.client() as a, server.client() as b:
        sid = a.turn(message="hi")[0]["sessionId"]
        b.send(type="resume", sessionId=sid)
        b.until("session")
        a.send(type="voice_state", enabled=True)
        assert b.recv() == {"type": "voice_state", "sessionId": sid, "speaking": True}
        assert a.nothing_pending()  # relayed to b by now: to a it was not


def test_frames_are_compact_json_objects(server):
    with server.client() as c:
        c.send(type="ping")
        raw = c.ws.recv(timeout=5)
    assert json.loads(raw) == {"type": "pong"}


def test_message_rate_limit(make_server, fake_openai):
    from .conftest import openai_env

    srv = make_server(
        openai_env(fake_openai), config="[server]\nrate_messages_per_s = 5\nrate_burst = 10\n"
    )
    with srv.client() as c:
        started = time.monotonic()
        for _ in range(30):
            c.send(type="ping")
        replies = [c.recv() for _ in range(30)]
        took = time.monotonic() - started
        pongs = [r for r in replies if r["type"] == "pong"]
        limited = [r for r in replies if r.get("code") == "rate_limited"]
        assert len(pongs) + len(limited) == 30
        # The burst of 10, and no more than 5 per second refilled while the 30 were handled
        # (they were handled within the `took` seconds the client saw pass).
        assert 10 <= len(pongs) <= 10 + 5 * took, (len(pongs), took)
        assert limited[0]["retryAfterMs"] > 0 and "per second" in limited[0]["error"]
        # Refilled after the wait it names: a ping is answered again. Nothing else came in
        # between (each reply is the answer to the ping just sent).
        deadline = time.monotonic() + 10
        while True:
            c.send(type="ping")
            reply = c.recv()
            if reply["type"] == "pong":
                break
            assert reply["code"] == "rate_limited", reply
            assert time.monotonic() < deadline, "the allowance never refilled"
            time.sleep(reply["retryAfterMs"] / 1000)


def test_connection_limit_per_client_address(make_server, fake_openai):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from .conftest import openai_env

    srv = make_server(
        openai_env(fake_openai),
        config="[server]\nmax_connections_per_client = 2\nlimit_loopback = true\n",
    )
    first, second = srv.client(), srv.client()
    with connect(srv.ws_url) as third:
        err = json.loads(third.recv(timeout=5))
        assert err["type"] == "error" and err["code"] == "rate_limited"
        with pytest.raises(ConnectionClosed) as closed:
            third.recv(timeout=5)
    assert closed.value.rcvd.code == 1013
    first.close()

    # Its slot is free once the server has seen it go: a new connection is admitted then.
    def admitted() -> bool:
        with connect(srv.ws_url) as fourth:
            hello = json.loads(fourth.recv(timeout=5))
            if hello["type"] != "connected":
                assert hello["code"] == "rate_limited", hello
                return False
            fourth.send(json.dumps({"type": "ping"}))
            assert json.loads(fourth.recv(timeout=5))["type"] == "pong"
            return True

    wait_for(admitted, "the closed connection's slot to be freed", 10)
    second.close()
