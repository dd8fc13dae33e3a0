"""The tool loop over a real WebSocket, against the scripted fake model: native and text tool
calling, approvals, refusals, stop, round limit, MCP, and tools in the stored history."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from prismd.testing.fake_models import Reply

from .conftest import PrismdServer, of_type, openai_env, text_of

HERE = Path(__file__).resolve().parent


def call(name: str, args: dict, call_id: str = "call_1") -> dict:
    return {"id": call_id, "name": name, "arguments": json.dumps(args)}


def script_rounds(fake, *replies: Reply, match: str | None = None) -> None:
    for reply in replies:
        reply.times = 1
        fake.script(reply, match=match)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, fake_openai):
    config = """
[tools]
approval_timeout_s = 1.5
max_rounds = 4

[[agents]]
id = "assistant"
name = "Assistant"

[[agents]]
id = "ops"
name = "Ops"
auto_approve = ["shell"]

[[agents]]
id = "reader"
name = "Reader"
tools = ["file_read", "file_list"]
"""
    srv = PrismdServer(tmp_path_factory.mktemp("tools"), openai_env(fake_openai), config)
    srv.start()
    yield srv
    srv.stop()


def test_native_multi_round_turn_writes_then_reads_a_file(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(
            text=["Let me write it. "],
            tool_calls=[call("file_write", {"path": "notes/a.txt", "content": "hello tools"})],
            usage=(10, 1),
        ),
        Reply(tool_calls=[call("file_read", {"path": "notes/a.txt"}, "call_2")], usage=(20, 2)),
        Reply(text=["The file says ", "hello tools."], usage=(30, 3)),
    )
    with tool_server.client() as c:
        frames = c.turn(message="write and read")
    kinds = [f["type"] for f in frames]
    assert kinds.count("tool_start") == 2 and kinds.count("tool_end") == 2
    first_start, second_start = of_type(frames, "tool_start")
    assert first_start["name"] == "file_write" and first_start["input"]["path"] == "notes/a.txt"
    assert first_start["id"] == "call_1" and second_start["id"] == "call_2"
    ends = of_type(frames, "tool_end")
    assert [e["status"] for e in ends] == ["ok", "ok"]
    assert "hello tools" in ends[1]["output"]
    done = of_type(frames, "done")[0]
    assert done["rounds"] == 3 and done["stopReason"] == "end"
    assert done["finalContent"] == "The file says hello tools."
    # The turn's tool time holds each tool's (one a round: their sum), and the model's and the
    # tools' times do not overlap within the turn (0.1 ms: each figure is rounded).
    latency = done["latency"]
    assert latency["toolMs"] >= sum(e["durationMs"] for e in ends) - 0.1
    assert latency["llmMs"] + latency["toolMs"] <= latency["totalMs"] + 0.1
    # Every round's usage is summed; context usage is the last call's.
    assert done["tokensIn"] == 60 and done["tokensOut"] == 6
    assert frames[-1]["usedTokens"] == 33
    seqs = [f["seq"] for f in frames[1:]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The model saw its calls and their results.
    third = fake_openai.requests[-1]
    roles = [m["role"] for m in third["messages"]]
    assert roles[-4:] == ["assistant", "tool", "assistant", "tool"]
    assert third["messages"][-1]["tool_call_id"] == "call_2"
    assert "hello tools" in third["messages"][-1]["content"]
    assert {t["function"]["name"] for t in third["tools"]} >= {"file_read", "shell"}
    workspace = tool_server.data_dir / "workspaces" / "assistant"
    assert (workspace / "notes" / "a.txt").read_text() == "hello tools"


def test_latency_figures_hold_the_time_the_model_and_the_tools_took(tool_server, fake_openai):
    """A tool that runs 0.3 s between two model calls that each wait 0.2 s before their first
    piece: `tool_end.durationMs`, `done.latency` and `done.durationMs` include those waits,
    add up within the turn, and the turn fits in what the client saw."""
    script_rounds(
        fake_openai,
        Reply(
            text=["Napping. "],
            tool_calls=[call("shell", {"command": "sleep 0.3"})],
            first_delay_s=0.2,
        ),
        Reply(text=["Slept."], first_delay_s=0.2),
    )
    with tool_server.client() as c:
        sent = time.monotonic()
        frames = c.turn(message="nap", agentId="ops")
        seen_ms = (time.monotonic() - sent) * 1000  # the same monotonic clock: one machine
    (end,) = of_type(frames, "tool_end")
    assert end["status"] == "ok" and end["durationMs"] >= 300
    done = of_type(frames, "done")[0]
    assert done["rounds"] == 2 and done["finalContent"] == "Slept."
    latency = done["latency"]
    assert latency["toolMs"] >= end["durationMs"]
    assert latency["llmMs"] >= 2 * 200
    assert 200 <= latency["firstTokenMs"] <= latency["totalMs"]  # "Napping. ", in round 1
    assert latency["llmMs"] + latency["toolMs"] <= latency["totalMs"] + 0.1
    assert abs(done["durationMs"] - latency["totalMs"]) <= 0.55  # the same time, rounded
    assert latency["totalMs"] <= seen_ms


def test_tool_calls_are_stored_and_sent_again_next_turn(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("current_time", {})]),
        Reply(text=["It is now."]),
        Reply(text=["Yes, I checked the time before."]),
    )
    with tool_server.client() as c:
        first = c.turn(message="time?")
        sid = first[0]["sessionId"]
        c.turn(message="did you check?")
    msgs = tool_server.get(f"/api/sessions/{sid}/messages").json()
    assert [m["role"] for m in msgs] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert json.loads(msgs[1]["tool_calls"])[0]["name"] == "current_time"
    assert json.loads(msgs[2]["tool_result"])["status"] == "ok"
    last = fake_openai.requests[-1]["messages"]
    assert [m["role"] for m in last[1:]] == ["user", "assistant", "tool", "assistant", "user"]


def test_approval_granted_runs_the_shell(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo approved-run"})]),
        Reply(text=["ran it"]),
    )
    with tool_server.client() as c:
        c.send(type="chat", message="run it")
        head = c.until("approval_request")
        req = head[-1]
        assert req["request"]["tool"] == "shell"
        assert "echo approved-run" in req["request"]["query"]
        assert req["request"]["sessionId"] == head[0]["sessionId"]
        assert req["request"]["agentId"] == "assistant"
        assert req["seq"] and req["requestId"]
        c.send(type="approval_response", requestId=req["requestId"], approved=True)
        rest = c.until("context_usage")
    end = of_type(rest, "tool_end")[0]
    assert end["status"] == "ok" and "approved-run" in end["output"]
    assert of_type(rest, "approval_resolved")[0]["approved"] is True


def test_approval_denied(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "touch should-not-exist"})]),
        Reply(text=["ok, I will not"]),
    )
    with tool_server.client() as c:
        c.send(type="chat", message="run it")
        req = c.until("approval_request")[-1]
        c.send(type="approval_response", requestId=req["requestId"], approved=False)
        rest = c.until("context_usage")
    end = of_type(rest, "tool_end")[0]
    assert end["status"] == "denied"
    assert not (tool_server.data_dir / "workspaces" / "assistant" / "should-not-exist").exists()
    result = fake_openai.requests[-1]["messages"][-1]
    assert result["role"] == "tool" and "Denied" in result["content"]


def test_approval_times_out_as_denied(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo never"})]),
        Reply(text=["timed out"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="run it")
    end = of_type(frames, "tool_end")[0]
    assert end["status"] == "denied" and "within" in end["output"]


def test_unknown_approval_is_a_coded_error(tool_server):
    with tool_server.client() as c:
        c.turn(message="hello")
        c.send(type="approval_response", requestId="appr_nope", approved=True)
        err = c.recv()
    assert err["code"] == "tool_error" and "seq" not in err


def test_auto_approved_agent_runs_without_asking(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo trusted"})]),
        Reply(text=["done"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="go", agentId="ops")
    assert of_type(frames, "approval_request") == []
    assert "trusted" in of_type(frames, "tool_end")[0]["output"]


def test_agent_allow_list_limits_the_tools(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo no"})]),
        Reply(text=["fine"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="go", agentId="reader")
    sent = {t["function"]["name"] for t in fake_openai.requests[0]["tools"]}
    assert sent == {"file_read", "file_list"}
    end = of_type(frames, "tool_end")[0]
    assert end["status"] == "error" and "Unknown tool 'shell'" in end["output"]


def test_path_escape_and_private_fetch_are_refused(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(
            tool_calls=[
                call("file_read", {"path": "../../../etc/passwd"}, "c1"),
                call("web_fetch", {"url": f"http://127.0.0.1:{tool_server.port}/api/health"}, "c2"),
            ]
        ),
        Reply(text=["both refused"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="try")
    ends = {e["id"]: e for e in of_type(frames, "tool_end")}
    assert ends["c1"]["status"] == "error" and "escapes" in ends["c1"]["output"]
    assert ends["c2"]["status"] == "error"
    assert "127.0.0.1" in ends["c2"]["output"] or "private" in ends["c2"]["output"].lower()


def test_invalid_arguments_are_reported_to_the_model(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[{"id": "bad", "name": "file_read", "arguments": "{not json"}]),
        Reply(tool_calls=[call("file_read", {"wrong": 1}, "bad2")]),
        Reply(text=["gave up"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="go")
    ends = of_type(frames, "tool_end")
    assert [e["status"] for e in ends] == ["error", "error"]
    assert "not valid JSON" in ends[0]["output"]
    assert "Invalid arguments" in ends[1]["output"]


def test_round_limit_ends_with_max_rounds(tool_server, fake_openai):
    fake_openai.script(Reply(tool_calls=[call("current_time", {})]), match="loop forever")
    with tool_server.client() as c:
        frames = c.turn(message="loop forever")
    done = of_type(frames, "done")[0]
    assert done["stopReason"] == "max_rounds" and done["rounds"] == 4
    assert len(of_type(frames, "tool_end")) == 3
    assert len(fake_openai.requests) == 4


def test_stop_during_a_long_shell_command_kills_it(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo $$ > pid.txt; exec sleep 30"})]),
        Reply(text=["never reached"]),
    )
    pid_file = tool_server.data_dir / "workspaces" / "ops" / "pid.txt"
    pid_file.unlink(missing_ok=True)
    with tool_server.client() as c:
        c.send(type="chat", message="sleep", agentId="ops")
        c.until("tool_start")
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        c.send(type="stop")
        rest = c.until("context_usage")
    done = of_type(rest, "done")[0]
    assert done["stopReason"] == "stopped"
    end = of_type(rest, "tool_end")[0]
    assert end["status"] == "error" and "Stopped" in end["output"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"process {pid} survived the stop")
    assert len(fake_openai.requests) == 1


def test_tool_events_are_replayed_on_resume(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("current_time", {})]),
        Reply(text=["done"]),
    )
    with tool_server.client() as c:
        frames = c.turn(message="time")
    sid = frames[0]["sessionId"]
    with tool_server.client() as r:
        r.send(type="resume", sessionId=sid, lastSeq=0)
        replay = r.until("context_usage")
    assert [f["type"] for f in replay[1:]] == [f["type"] for f in frames[1:]]


def test_tools_endpoint_lists_schemas_and_policy(tool_server):
    body = tool_server.get("/api/tools").json()
    tools = {t["name"]: t for t in body["tools"]}
    assert {
        "file_read",
        "file_write",
        "file_edit",
        "file_list",
        "file_search",
        "shell",
        "code_exec",
        "web_fetch",
        "memory_note",
        "memory_search",
        "current_time",
    } <= set(tools)
    assert tools["shell"]["parameters"]["type"] == "object"
    assert tools["shell"]["agents"] == {"assistant": "approve", "ops": "allow", "reader": "deny"}
    assert tools["file_read"]["agents"]["reader"] == "allow"
    assert "network" in body["sandbox"] and "shell" in body["sandbox"]


def test_text_protocol_turn_streams_clean_text(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai), config='[providers.openai]\ntool_calling = "text"\n')
    markup = (
        '<tool_call>{"tool": "file_write", '
        '"args": {"path": "t.txt", "content": "via text"}}</tool_call>'
    )
    pieces = ["I'll save it. "] + [markup[i : i + 3] for i in range(0, len(markup), 3)]
    script_rounds(fake_openai, Reply(text=pieces), Reply(text=["Saved ", "it."]))
    with srv.client() as c:
        frames = c.turn(message="save")
    assert "tools" not in fake_openai.requests[0]
    assert "<tool_call>" in fake_openai.requests[0]["messages"][0]["content"]  # described
    assert all("<" not in f["delta"] for f in of_type(frames, "chunk"))
    assert text_of(frames) == "I'll save it. Saved it."
    assert of_type(frames, "tool_end")[0]["status"] == "ok"
    assert (srv.data_dir / "workspaces" / "assistant" / "t.txt").read_text() == "via text"
    second = fake_openai.requests[1]["messages"]
    assert second[-1]["role"] == "user" and "<tool_result" in second[-1]["content"]
    assert "<tool_call>" in second[-2]["content"]
    assert of_type(frames, "done")[0]["finalContent"] == "Saved it."


def test_text_protocol_malformed_call_gets_one_corrective_reprompt(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai), config='[providers.openai]\ntool_calling = "text"\n')
    script_rounds(
        fake_openai,
        Reply(text=['<tool_call>{"tool": "file_write", "args": </tool_call>']),
        Reply(text=['<tool_call>{"tool": "current_time", "args": {}}</tool_call>']),
        Reply(text=["fixed"]),
    )
    with srv.client() as c:
        frames = c.turn(message="go")
    assert of_type(frames, "done")[0]["finalContent"] == "fixed"
    retry = fake_openai.requests[1]["messages"][-1]
    assert retry["role"] == "user" and "could not be understood" in retry["content"]
    assert [e["name"] for e in of_type(frames, "tool_end")] == ["current_time"]


def test_mcp_tools_round_trip(make_server, fake_openai):
    config = f"""
[[mcp_servers]]
name = "fx"
command = "{sys.executable}"
args = ["{HERE / "mcp_fixture_server.py"}", "stdio"]
"""
    srv = make_server(openai_env(fake_openai), config=config)
    tools = {t["name"]: t for t in srv.get("/api/tools").json()["tools"]}
    assert tools["fx__add"]["source"] == "mcp:fx"
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("fx__add", {"a": 2, "b": 3})]),
        Reply(text=["2 + 3 = 5"]),
    )
    with srv.client() as c:
        frames = c.turn(message="add")
    end = of_type(frames, "tool_end")[0]
    assert end["status"] == "ok" and end["output"].strip() == "5"


def test_approval_is_denied_when_no_client_is_connected(tool_server, fake_openai):
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": "echo alone"})], first_delay_s=0.5),
        Reply(text=["nobody there"]),
    )
    sid = "approval-with-nobody-there"
    c = tool_server.client()
    c.send(type="chat", message="run it", sessionId=sid)
    # Gone before the model asks for the tool: the server reads the close right after the chat
    # (no round trip to the client in between), the model answers 0.5 s later.
    c.close()
    deadline = time.monotonic() + 30
    while True:
        resp = tool_server.get(f"/api/sessions/{sid}/messages")
        msgs = resp.json() if resp.status_code == 200 else []
        if msgs and msgs[-1]["role"] == "assistant" and msgs[-1]["status"] == "complete":
            break
        assert time.monotonic() < deadline, msgs
        time.sleep(0.1)
    tool = [m for m in msgs if m["role"] == "tool"][0]
    assert json.loads(tool["tool_result"])["status"] == "denied"
    assert "no client" in tool["content"]


def test_anthropic_native_tool_use_round_trip(make_server, fake_anthropic):
    srv = make_server(
        {
            "ANTHROPIC_BASE_URL": fake_anthropic.url,
            "ANTHROPIC_API_KEY": "test",
            "PRISMD_MODEL": "claude-sonnet-4-5",
        }
    )
    script_rounds(
        fake_anthropic,
        Reply(
            text=["Checking. "], tool_calls=[call("current_time", {"timezone": "UTC"}, "toolu_1")]
        ),
        Reply(text=["It is late."]),
    )
    with srv.client() as c:
        frames = c.turn(message="time?")
    assert of_type(frames, "tool_end")[0]["status"] == "ok"
    assert of_type(frames, "done")[0]["finalContent"] == "It is late."
    first, second = fake_anthropic.requests
    assert {t["name"] for t in first["tools"]} >= {"current_time", "file_read"}
    assert "input_schema" in first["tools"][0]
    assistant, result = second["messages"][-2:]
    assert assistant["role"] == "assistant"
    assert assistant["content"][-1] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "current_time",
        "input": {"timezone": "UTC"},
    }
    assert result["role"] == "user" and result["content"][0]["type"] == "tool_result"
    assert result["content"][0]["tool_use_id"] == "toolu_1"
    assert result["content"][0]["is_error"] is False
