"""Model providers over real HTTP: OpenAI-compatible and Anthropic SDKs against the scripted
fakes, retries, timeouts, broken streams, and the unconfigured case."""

from __future__ import annotations

import pytest

from prismd.testing.fake_models import Reply

from .conftest import of_type, openai_env, text_of

STALL_CONFIG = """
[providers.openai]
timeout_s = 1.0
max_retries = 1
"""


@pytest.fixture(scope="module")
def flaky_server(tmp_path_factory, fake_openai):
    from .conftest import PrismdServer

    srv = PrismdServer(tmp_path_factory.mktemp("flaky"), openai_env(fake_openai), STALL_CONFIG)
    srv.start()
    yield srv
    srv.stop()


def test_retry_on_5xx_before_the_first_token(flaky_server, fake_openai):
    fake_openai.script(Reply(status=503, times=1, headers={"Retry-After": "0"}))
    fake_openai.script(Reply(text=["recovered"]))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert text_of(frames) == "recovered"
    assert len(fake_openai.requests) == 2


def test_retry_on_429_honours_retry_after(flaky_server, fake_openai):
    fake_openai.script(Reply(status=429, times=1, headers={"Retry-After": "0"}))
    fake_openai.script(Reply(text=["ok"]))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert of_type(frames, "done")[0]["finalContent"] == "ok"


def test_persistent_5xx_is_a_provider_error_and_the_session_goes_on(flaky_server, fake_openai):
    fake_openai.script(Reply(status=500, times=2, headers={"Retry-After": "0"}))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
        err = frames[-1]
        assert err["type"] == "error" and err["code"] == "provider_error"
        assert "500" in err["error"]
        assert err["seq"] and err["turnId"] == frames[1]["turnId"]  # it ends the turn
        assert of_type(frames, "done") == []
        again = c.turn(message="next")
    assert of_type(again, "done")[0]["stopReason"] == "end"
    assert len(fake_openai.requests) == 3  # two tries, then the next turn


def test_client_errors_are_not_retried(flaky_server, fake_openai):
    fake_openai.script(Reply(status=400, times=1))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert frames[-1]["code"] == "provider_error"
    assert len(fake_openai.requests) == 1


def test_stream_cut_mid_answer_keeps_the_partial_text(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["kept ", "text ", "lost"], disconnect_after=2))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
        sid = frames[0]["sessionId"]
    assert text_of(frames) == "kept text "
    assert frames[-1]["code"] == "provider_error"
    msgs = flaky_server.get(f"/api/sessions/{sid}/messages").json()
    assert msgs[-1]["status"] == "error" and msgs[-1]["content"] == "kept text "


def test_stalled_stream_times_out(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["a ", "b"], stall_after=1))
    with flaky_server.client() as c:
        frames = c.turn(message="hi", timeout=15)
    assert text_of(frames) == "a "
    assert frames[-1]["code"] == "provider_timeout"
    assert fake_openai.wait_aborted(1)


def test_invalid_json_in_the_stream_is_a_provider_error(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["a ", "b"], bad_json_after=1))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "provider_error"


def test_unreachable_endpoint_is_a_provider_error(make_server):
    from .conftest import free_port

    srv = make_server(
        {
            "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "OPENAI_API_KEY": "k",
        },
        config="[providers.openai]\nmax_retries = 0\n",
    )
    with srv.client() as c:
        frames = c.turn(message="hi")
    assert frames[-1]["code"] == "provider_error"
    assert "Cannot reach" in frames[-1]["error"]


def test_unconfigured_server_starts_and_explains(make_server):
    srv = make_server({"OLLAMA_BASE_URL": "http://127.0.0.1:9"})
    assert srv.get("/api/health").json()["providerConfigured"] is False
    with srv.client() as c:
        c.send(type="chat", message="hi")
        err = c.recv()
    assert err["code"] == "provider_unconfigured"
    assert "OPENAI_API_KEY" in err["error"] and "ANTHROPIC_API_KEY" in err["error"]
    assert "Ollama" in err["error"]
    assert "seq" not in err


def test_anthropic_provider_streams_text_reasoning_and_usage(make_server, fake_anthropic):
    srv = make_server(
        {
            "ANTHROPIC_BASE_URL": fake_anthropic.url,
            "ANTHROPIC_API_KEY": "test",
            "PRISMD_MODEL": "claude-sonnet-4-5",
        }
    )
    assert srv.get("/api/health").json()["provider"] == "anthropic"
    fake_anthropic.script(Reply(text=["Bonjour", " !"], reasoning=["hmm"], usage=(100, 20)))
    with srv.client() as c:
        frames = c.turn(message="salut", reasoningEffort="low")
        second = c.turn(message="encore")
    done = of_type(frames, "done")[0]
    assert done["finalContent"] == "Bonjour !" == text_of(frames)
    assert of_type(frames, "reasoning")[0]["content"] == "hmm"
    assert done["resolvedProvider"] == "anthropic"
    assert done["tokensIn"] == 100 and done["tokensOut"] == 20
    assert done["costUsd"] == pytest.approx(100 * 3e-6 + 20 * 15e-6)
    assert done["costSource"]["provider"] == "anthropic"
    assert frames[-1]["maxContext"] == 200000
    first_req, second_req = fake_anthropic.requests
    assert first_req["thinking"]["type"] == "enabled"
    assert first_req["system"]
    assert [m["role"] for m in second_req["messages"]] == ["user", "assistant", "user"]
    assert of_type(second, "done")


def test_agent_from_config_uses_its_own_model_prompt_and_temperature(make_server, fake_openai):
    config = """
[[agents]]
id = "poet"
name = "Poet"
description = "Writes verse"
model = "gpt-4o"
system_prompt = "Answer in verse."
temperature = 0.3
"""
    srv = make_server(openai_env(fake_openai), config=config)
    with srv.client() as c:
        frames = c.turn(message="rain", agentId="poet")
    assert frames[0]["agentId"] == "poet" and frames[0]["agentName"] == "Poet"
    req = fake_openai.requests[-1]
    assert req["model"] == "gpt-4o" and req["temperature"] == 0.3
    assert req["messages"][0] == {"role": "system", "content": "Answer in verse."}
    agents = srv.get("/api/agents").json()
    assert {a["id"] for a in agents} == {"assistant", "poet"}


def test_ollama_is_detected_when_nothing_else_is_configured(make_server, fake_openai):
    base = fake_openai.url.removesuffix("/v1")
    srv = make_server({"OLLAMA_BASE_URL": base})
    assert srv.get("/api/health").json()["provider"] == "ollama"
    with srv.client() as c:
        frames = c.turn(message="local?")
    done = of_type(frames, "done")[0]
    assert done["resolvedProvider"] == "ollama" and done["resolvedModel"] == "fake-llama:latest"
    assert done["costUsd"] is None and done["costSource"] is None  # local models are not priced
    assert fake_openai.requests[-1]["model"] == "fake-llama:latest"


def test_openai_key_wins_over_anthropic_key(make_server, fake_openai):
    env = {**openai_env(fake_openai), "ANTHROPIC_API_KEY": "also-set"}
    srv = make_server(env)
    assert srv.get("/api/health").json()["provider"] == "openai"


def test_stream_broken_before_the_first_token_is_retried(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["never seen"], disconnect_after=0, times=1))
    fake_openai.script(Reply(text=["second ", "try"]))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert text_of(frames) == "second try" == of_type(frames, "done")[0]["finalContent"]
    assert len(fake_openai.requests) == 2


def test_stall_before_the_first_token_is_retried_then_times_out(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["x"], stall_after=0))
    with flaky_server.client() as c:
        frames = c.turn(message="hi", timeout=20)
    assert frames[-1]["code"] == "provider_timeout"
    assert len(fake_openai.requests) == 2  # max_retries = 1 in this server's config
    assert text_of(frames) == ""


def test_stream_broken_after_text_is_not_retried(flaky_server, fake_openai):
    fake_openai.script(Reply(text=["seen ", "lost"], disconnect_after=1))
    with flaky_server.client() as c:
        frames = c.turn(message="hi")
    assert text_of(frames) == "seen "
    assert frames[-1]["code"] == "provider_error" and "broke" in frames[-1]["error"]
    assert len(fake_openai.requests) == 1


def test_anthropic_thinking_stays_on_across_tool_rounds(make_server, fake_anthropic):
    """The signed thinking block of the round that asked for a tool goes back, unchanged, with
    the tool's result, so extended thinking stays on for the whole tool loop (and later turns)."""
    srv = make_server(
        {
            "ANTHROPIC_BASE_URL": fake_anthropic.url,
            "ANTHROPIC_API_KEY": "test",
            "PRISMD_MODEL": "claude-sonnet-4-5",
        }
    )
    call = {"id": "toolu_1", "name": "current_time", "arguments": '{"timezone": "UTC"}'}
    fake_anthropic.script(Reply(reasoning=["need ", "the time"], tool_calls=[call], times=1))
    fake_anthropic.script(Reply(reasoning=["now answer"], text=["It is late."], times=1))
    fake_anthropic.script(Reply(reasoning=["again"], text=["Still late."], times=1))
    with srv.client() as c:
        frames = c.turn(message="what time is it?", reasoningEffort="low")
        later = c.turn(message="and now?", reasoningEffort="low")
    assert of_type(frames, "done")[0]["finalContent"] == "It is late."
    assert of_type(later, "done")[0]["finalContent"] == "Still late."
    first, second, third = fake_anthropic.requests
    assert all(r["thinking"]["type"] == "enabled" for r in (first, second, third))
    asked = second["messages"][1]
    assert asked["role"] == "assistant"
    thinking, tool_use = asked["content"][0], asked["content"][-1]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "need the time"
    assert thinking["signature"].startswith("fake-signature-")
    assert tool_use["type"] == "tool_use" and tool_use["id"] == "toolu_1"
    assert second["messages"][2]["content"][0]["type"] == "tool_result"
