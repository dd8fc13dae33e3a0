"""Fallback models and modelMode "auto" (issue 14).

End to end: a server whose default model (the scripted OpenAI fake) fails in each way a model
can fail before its first token (HTTP 5xx after its retries, a refused connection) answers with
the next configured model (the Anthropic fake), and `done` says so (`autoFallback`,
`autoFallbackReason`, `resolvedProvider`/`resolvedModel`); a model that fails after text reached
the user does not fall back (the text would be duplicated or contradicted). In process: an
unconfigured provider falls back at planning, and the `auto` routing rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prismd.agent.runner import TurnRunner
from prismd.auth.service import LOCAL_PRINCIPAL
from prismd.config import AgentSettings, Settings
from prismd.protocol import Chat, ProtocolError
from prismd.providers.registry import ProviderRegistry
from prismd.testing.fake_models import FakeModelServer, Reply

from .conftest import PrismdServer, free_port, of_type, openai_env, text_of


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai: FakeModelServer,
    fake_anthropic: FakeModelServer,
) -> Iterator[PrismdServer]:
    closed = free_port()  # nothing listens there: a refused connection
    config = f"""
fallback = ["anthropic:claude-fallback"]

[providers.openai]
max_retries = 1

[providers.anthropic]
api_key = "test-key"
base_url = "{fake_anthropic.url}"

[providers.ollama]
base_url = "http://127.0.0.1:{closed}"
model = "llama3"
max_retries = 0

[[agents]]
id = "offline"
name = "Offline"
provider = "ollama"
fallback = ["ollama:other", "anthropic:claude-second"]

[[agents]]
id = "alone"
name = "Alone"
fallback = []
"""
    server = PrismdServer(tmp_path_factory.mktemp("fallback"), openai_env(fake_openai), config)
    server.start()
    yield server
    server.stop()


def _done(frames: list[dict[str, Any]]) -> dict[str, Any]:
    done = of_type(frames, "done")
    assert done, [f.get("type") for f in frames]
    return done[0]


def test_server_error_falls_back_after_retries(
    srv: PrismdServer, fake_openai: FakeModelServer, fake_anthropic: FakeModelServer
) -> None:
    fake_openai.script(Reply(status=500, text="upstream exploded"))
    fake_anthropic.script(Reply(text=["from ", "the ", "fallback"]))
    with srv.client() as c:
        frames = c.turn(message="hello")
    done = _done(frames)
    assert text_of(frames) == "from the fallback"
    assert done["autoFallback"] is True
    assert "openai:gpt-4o-mini" in done["autoFallbackReason"]
    assert "500" in done["autoFallbackReason"]
    assert (done["resolvedProvider"], done["resolvedModel"]) == ("anthropic", "claude-fallback")
    assert done["model"] == "claude-fallback"
    assert done["tokensIn"] > 0 and done["tokensOut"] == 3  # the fallback's usage only
    assert len(fake_openai.requests) == 2  # the first try and its one retry, then the fallback
    assert [r["model"] for r in fake_anthropic.requests] == ["claude-fallback"]
    # The model that answered is the one stored and shown in the session's history.
    messages = srv.get(f"/api/sessions/{done['sessionId']}/messages").json()
    answer = messages[-1]
    assert answer["role"] == "assistant" and answer["content"] == "from the fallback"


def test_refused_connection_falls_back_in_order(
    srv: PrismdServer, fake_anthropic: FakeModelServer
) -> None:
    """The agent's own list (not the server's): the first fallback (the same refusing
    endpoint) fails too; the second answers; the reason names the last failure."""
    with srv.client() as c:
        frames = c.turn(message="anyone there?", agentId="offline")
    done = _done(frames)
    assert text_of(frames) == "You said: anyone there?"
    assert (done["resolvedProvider"], done["resolvedModel"]) == ("anthropic", "claude-second")
    assert done["autoFallback"] is True
    assert done["autoFallbackReason"].startswith("ollama:other: ")
    assert "reach" in done["autoFallbackReason"].lower()


def test_no_fallback_left_is_the_original_error(
    srv: PrismdServer, fake_openai: FakeModelServer, fake_anthropic: FakeModelServer
) -> None:
    fake_openai.script(Reply(status=500))
    with srv.client() as c:
        frames = c.turn(message="hello", agentId="alone")
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "provider_error"
    assert "500" in error["error"]
    assert fake_anthropic.requests == []


def test_failure_after_text_does_not_fall_back(
    srv: PrismdServer, fake_openai: FakeModelServer, fake_anthropic: FakeModelServer
) -> None:
    fake_openai.script(Reply(text=["partial ", "answer ", "more"], disconnect_after=2, times=3))
    with srv.client() as c:
        frames = c.turn(message="hello")
    assert frames[-1]["type"] == "error"
    assert text_of(frames) == "partial answer "
    assert fake_anthropic.requests == []


def test_a_working_model_reports_no_fallback(srv: PrismdServer) -> None:
    with srv.client() as c:
        done = _done(c.turn(message="hello"))
    assert done["autoFallback"] is False and done["autoFallbackReason"] is None
    assert done["resolvedProvider"] == "openai" and "modelChoice" not in done


def test_auto_mode_routes_by_size(
    tmp_path: Path, fake_openai: FakeModelServer, fake_anthropic: FakeModelServer
) -> None:
    config = f"""
[routing]
small = "openai:small-model"
large = "anthropic:large-model"
large_above_tokens = 20

[providers.anthropic]
api_key = "test-key"
base_url = "{fake_anthropic.url}"
"""
    server = PrismdServer(tmp_path, openai_env(fake_openai), config).start()
    try:
        with server.client() as c:
            short = _done(c.turn(message="hi", modelMode="auto"))
            long = _done(c.turn(message="tell me " * 40, modelMode="auto"))
            manual = _done(c.turn(message="hi"))
            chosen = _done(c.turn(message="hi", modelMode="auto", model="gpt-4o"))
    finally:
        server.stop()
    assert (short["resolvedProvider"], short["resolvedModel"]) == ("openai", "small-model")
    assert short["requestedModelMode"] == "auto" and short["modelChoice"].startswith("auto: small")
    assert (long["resolvedProvider"], long["resolvedModel"]) == ("anthropic", "large-model")
    assert long["modelChoice"].startswith("auto: large")
    assert manual["resolvedModel"] == "gpt-4o-mini" and "modelChoice" not in manual
    assert chosen["resolvedModel"] == "gpt-4o"  # a chat's own model wins over routing
    assert [r["model"] for r in fake_openai.requests] == ["small-model", "gpt-4o-mini", "gpt-4o"]
    assert [r["model"] for r in fake_anthropic.requests] == ["large-model"]


# ------------------------------------------------------------------ in process: planning


def _runner(tmp: Path, config: dict[str, Any]) -> TurnRunner:
    settings = Settings.model_validate({"server": {"data_dir": str(tmp)}, **config})
    return TurnRunner(settings, ProviderRegistry(settings, False), None, None)  # type: ignore[arg-type]


def test_unconfigured_provider_falls_back_at_planning(tmp_path: Path) -> None:
    runner = _runner(
        tmp_path,
        {
            "fallback": ["anthropic:claude-x", "ollama:llama3"],
            "providers": {"ollama": {"model": "llama3"}},
        },
    )
    agent = AgentSettings(id="a", name="A", provider="openai")
    plan = runner.plan(Chat(type="chat", message="hi"), agent, LOCAL_PRINCIPAL)
    # openai has no key and anthropic none either: ollama answers; the reason says why.
    assert (plan.provider.kind, plan.model) == ("ollama", "llama3")
    assert plan.fallbacks == []
    assert plan.fallback_reason is not None and "ANTHROPIC_API_KEY" in plan.fallback_reason


def test_unconfigured_without_fallback_is_a_coded_error(tmp_path: Path) -> None:
    runner = _runner(tmp_path, {"fallback": ["anthropic:claude-x"]})
    agent = AgentSettings(id="a", name="A", provider="openai")
    with pytest.raises(ProtocolError) as err:
        runner.plan(Chat(type="chat", message="hi"), agent, LOCAL_PRINCIPAL)
    assert err.value.code.value == "provider_unconfigured"


def test_auto_rules(tmp_path: Path) -> None:
    routing = {"small": "ollama:tiny", "large": "ollama:huge", "large_above_tokens": 100}
    runner = _runner(tmp_path, {"routing": routing, "providers": {"ollama": {"model": "default"}}})
    plain = AgentSettings(id="a", name="A", provider="ollama")
    tooled = AgentSettings(id="t", name="T", provider="ollama", tools=["read_file"])

    def choose(agent: AgentSettings, **chat: Any) -> tuple[str, str | None]:
        plan = runner.plan(Chat(type="chat", modelMode="auto", **chat), agent, LOCAL_PRINCIPAL)
        return plan.model, plan.choice

    model, choice = choose(plain, message="short")
    assert model == "tiny" and choice is not None and choice.startswith("auto: small, the message")
    assert choose(plain, message="x" * 800)[0] == "huge"
    assert choose(tooled, message="short")[0] == "tiny"  # large_for_tools is off by default
    file = {"filename": "a.txt", "mimeType": "text/plain", "data": "aGVsbG8="}
    assert choose(plain, message="short", files=[file])[0] == "huge"
    assert choose(plain, message="short", model="pinned") == ("pinned", None)
    runner.settings.routing.large_for_tools = True
    assert choose(tooled, message="short")[0] == "huge"
    runner.settings.routing = type(runner.settings.routing)()  # unset: the agent's model
    assert choose(plain, message="short") == (
        "default",
        "auto: no routing configured, the agent's model",
    )
