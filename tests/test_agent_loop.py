"""The agent loop in-process: the turn runner, the markup filter and the sessions service with
a model that is a Python function (prismd.testing.function_model) and a real SQLite store in a
temporary directory. No server, no sockets: each test takes milliseconds. The end-to-end tests
(test_tool_turns.py, test_turns.py) cover the same paths over real HTTP and WebSockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prismd.agent.runner import TurnPlan, TurnRunner
from prismd.auth.service import LOCAL_PRINCIPAL, Principal
from prismd.config import AgentSettings, Settings
from prismd.protocol import Chat
from prismd.providers.base import (
    ModelRequest,
    ProviderError,
    StreamPart,
    TextDelta,
    ToolCall,
    Usage,
)
from prismd.providers.registry import ProviderRegistry
from prismd.sessions.bus import LocalBus
from prismd.sessions.service import SessionService
from prismd.store.sqlite import SqliteStore
from prismd.testing.function_model import FunctionProvider
from prismd.tools.builtins import builtin_tools
from prismd.tools.registry import ToolRegistry

from .conftest import checked_event


class Tab:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.ended = asyncio.Event()
        self.changed = asyncio.Event()

    def deliver(self, seq: int, frame: str) -> None:
        event = checked_event(json.loads(frame))
        self.frames.append(event)
        self.changed.set()
        if event["type"] in ("context_usage", "error"):
            self.ended.set()

    def session_gone(self, session_id: str, reason: str) -> None:
        pass

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    def text(self) -> str:
        return "".join(f["delta"] for f in self.of("chunk"))


async def _turn(
    tmp: Path,
    model: Any,
    message: str = "hi",
    *,
    agent: AgentSettings | None = None,
    caller: Any = LOCAL_PRINCIPAL,
    settings: dict[str, Any] | None = None,
    during: Any = None,
) -> tuple[Tab, FunctionProvider, SessionService]:
    """Run one turn of `model` to its end; `during(sessions, live, tab)` runs once it
    started."""
    config = Settings.model_validate({"server": {"data_dir": str(tmp)}, **(settings or {})})
    store = SqliteStore(config.data_dir)
    await store.open()
    sessions = SessionService(store, LocalBus())
    await sessions.start()
    runner = TurnRunner(
        config, ProviderRegistry(config, False), sessions, ToolRegistry(config, builtin_tools())
    )
    provider = FunctionProvider(model)
    agent = agent or AgentSettings(id="assistant", name="Assistant")
    live = sessions.create(agent.id)
    tab = Tab()
    sessions.subscribe(live, tab)
    chat = Chat(type="chat", message=message)
    plan = TurnPlan(agent, caller, provider, provider.default_model, message, [], chat)
    await runner.start(live, plan)
    if during is not None:
        await during(sessions, live, tab)
    async with asyncio.timeout(10):
        await tab.ended.wait()
    await store.close()
    return tab, provider, sessions


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_tool_round_then_an_answer(tmp_path):
    def model(request: ModelRequest) -> list[StreamPart]:
        if not any(m.role == "tool" for m in request.messages):
            args = json.dumps({"timezone": "UTC"})
            return [TextDelta("Let me look. "), ToolCall("c1", "current_time", args), Usage(5, 1)]
        result = next(m for m in request.messages if m.role == "tool")
        assert result.tool_call_id == "c1" and "UTC" in result.text
        return [TextDelta("It is "), TextDelta("now."), Usage(9, 2)]

    tab, provider, _ = run(_turn(tmp_path, model))
    assert [f["name"] for f in tab.of("tool_start")] == ["current_time"]
    assert [f["status"] for f in tab.of("tool_end")] == ["ok"]
    done = tab.of("done")[0]
    assert done["finalContent"] == "It is now." and done["rounds"] == 2
    assert (done["tokensIn"], done["tokensOut"]) == (14, 3)
    assert len(provider.requests) == 2
    seqs = [f["seq"] for f in tab.frames]
    assert seqs == list(range(1, len(seqs) + 1))


def test_tool_markup_written_as_text_is_run_not_shown(tmp_path):
    """A model that writes a tool call as text: it runs, and no markup reaches a chunk."""

    def model(request: ModelRequest) -> list[StreamPart]:
        if any(m.role == "tool" for m in request.messages):
            return [TextDelta("Done.")]
        markup = '<tool_call>{"tool": "current_time", "args": {}}</tool_call>'
        return [TextDelta(piece) for piece in ("Sure. ", markup[:17], markup[17:])]

    tab, _, _ = run(_turn(tmp_path, model, settings={"providers": {"openai": {}}}))
    assert [f["name"] for f in tab.of("tool_end")] == ["current_time"]
    assert "<tool_call>" not in tab.text() and "tool_call" not in tab.of("done")[0]["finalContent"]


def test_the_round_limit_ends_the_turn(tmp_path):
    def model(request: ModelRequest) -> list[StreamPart]:
        return [ToolCall(f"c{len(request.messages)}", "current_time", "{}")]

    tab, provider, _ = run(_turn(tmp_path, model, settings={"tools": {"max_rounds": 3}}))
    assert tab.of("done")[0]["stopReason"] == "max_rounds"
    assert len(provider.requests) == 3 and len(tab.of("tool_end")) == 2


def test_stop_keeps_the_partial_answer(tmp_path):
    release = asyncio.Event()

    async def model(request: ModelRequest) -> AsyncIterator[StreamPart]:
        yield TextDelta("partial ")
        await release.wait()  # never set: only `stop` ends this stream
        yield TextDelta("never")

    async def stop_after_first_piece(sessions: SessionService, live: Any, tab: Tab) -> None:
        while not tab.of("chunk"):
            tab.changed.clear()
            await tab.changed.wait()
        assert await sessions.request_stop(live)

    tab, _, _ = run(_turn(tmp_path, model, during=stop_after_first_piece))
    done = tab.of("done")[0]
    assert done["stopReason"] == "stopped" and done["finalContent"] == "partial "
    assert [f["type"] for f in tab.frames].count("stopped") == 1


def test_a_users_turn_has_no_host_level_tools(tmp_path):
    """The model asks for `shell` on a non-admin's turn: it is not offered, and not run."""
    seen: list[set[str]] = []

    def model(request: ModelRequest) -> list[StreamPart]:
        seen.append({t.name for t in request.tools})
        if len(seen) == 1:
            return [ToolCall("c1", "shell", json.dumps({"command": "id"}))]
        return [TextDelta("no")]

    bob = Principal("u_bob", "bob", False, "token")
    tab, _, _ = run(_turn(tmp_path, model, caller=bob))
    assert "shell" not in seen[0] and "file_read" in seen[0]
    end = tab.of("tool_end")[0]
    assert end["status"] == "error" and "Unknown tool 'shell'" in end["output"]
    assert tab.of("approval_request") == []


def test_broken_tool_markup_gets_one_corrective_reprompt_in_native_mode(tmp_path):
    """A native-tool model that writes a tool call as text that cannot be parsed is told so
    once (it would never see a result for it), instead of looping to the round limit."""

    def model(request: ModelRequest) -> list[StreamPart]:
        if any(m.text.startswith("[prismd]") for m in request.messages if m.role == "user"):
            return [TextDelta("Sorry, here it is without a tool.")]
        return [TextDelta('<tool_call>{"tool": "current_time", "args": {nope</tool_call>')]

    tab, provider, _ = run(_turn(tmp_path, model))
    done = tab.of("done")[0]
    assert done["stopReason"] == "end" and len(provider.requests) == 2
    assert done["finalContent"] == "Sorry, here it is without a tool."
    assert "<tool_call>" not in tab.text()


def test_a_call_with_invalid_arguments_is_shown_to_the_model_with_its_error(tmp_path):
    """Native arguments that are not JSON: the call runs as an error, and the next request
    holds both the call and its error result (an unpaired result would be dropped, and the
    model asked the same thing again with nothing to go on)."""

    def model(request: ModelRequest) -> list[StreamPart]:
        results = [m for m in request.messages if m.role == "tool"]
        if not results:
            return [ToolCall("c1", "current_time", '{"timezone": ')]
        calls = [c for m in request.messages for c in m.tool_calls]
        assert [c.id for c in calls] == ["c1"] and results[0].tool_call_id == "c1"
        assert "not valid JSON" in results[0].text
        return [TextDelta("fixed")]

    tab, provider, _ = run(_turn(tmp_path, model))
    assert tab.of("done")[0]["finalContent"] == "fixed" and len(provider.requests) == 2


def test_the_corrective_reprompt_goes_once_it_has_worked(tmp_path):
    seen: list[list[str]] = []

    def model(request: ModelRequest) -> list[StreamPart]:
        seen.append([m.text for m in request.messages if m.role == "user"])
        if len(seen) == 1:
            return [TextDelta('<tool_call>{"tool": "current_time", "args": {nope</tool_call>')]
        if len(seen) == 2:
            return [ToolCall("c1", "current_time", "{}")]
        return [TextDelta("done")]

    tab, _, _ = run(_turn(tmp_path, model))
    assert tab.of("done")[0]["finalContent"] == "done" and len(seen) == 3
    assert any(text.startswith("[prismd]") for text in seen[1])
    assert not any(text.startswith("[prismd]") for text in seen[2])


def _stored(tmp: Path) -> Any:
    async def read() -> Any:
        store = SqliteStore(tmp)
        await store.open()
        try:
            (sid,) = [s.id for s in (await store.list_sessions(10, 0))[0]]
            return (
                await store.load_messages(sid),
                await store.open_log(sid),
                await store.usage_totals(None),
            )
        finally:
            await store.close()

    return run(read())


def test_an_internal_error_ends_the_turn_in_the_store_too(tmp_path):
    """A bug in the middle of a turn: the client gets `error internal`, and the store holds
    the turn as ended in an error with what streamed (not `running`, to be repaired later)."""

    def model(request: ModelRequest) -> Any:
        yield TextDelta("half ")
        raise RuntimeError("a bug")

    tab, _, _ = run(_turn(tmp_path, model))
    assert tab.of("error")[0]["code"] == "internal" and tab.of("done") == []
    messages, log, _ = _stored(tmp_path)
    assert [(m.role, m.status, m.content) for m in messages][-1] == ("assistant", "error", "half ")
    assert log.running_turns == [] and log.streaming == []


def test_a_failed_turn_records_what_its_model_calls_used(tmp_path):
    def model(request: ModelRequest) -> list[StreamPart]:
        if not any(m.role == "tool" for m in request.messages):
            return [ToolCall("c1", "current_time", "{}"), Usage(10, 4)]
        raise ProviderError("the model went away")

    tab, _, _ = run(_turn(tmp_path, model))
    assert tab.of("error")[0]["code"] == "provider_error"
    _, _, totals = _stored(tmp_path)
    assert (totals.turns, totals.tokens_in, totals.tokens_out) == (1, 10, 4)
