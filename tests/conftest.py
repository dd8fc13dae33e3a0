"""Fixtures: scripted fake model servers and a real prismd server process on 127.0.0.1.

Every test talks to prismd over a real WebSocket (or real HTTP); prismd talks to the fake model
over real HTTP with server-sent events.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings
from websockets.sync.client import connect

from prismd.testing.fake_models import FakeModelServer

ROOT = Path(__file__).resolve().parent.parent

# `make test` runs the same property-based examples every time (a run on a clean clone decides
# whether a change lands, so it must not depend on luck); `HYPOTHESIS_PROFILE=explore make test`
# draws new ones and keeps what it finds in .hypothesis/ to replay.
# No deadline either: timings never decide a test (a loaded CI machine is slower, not wrong).
settings.register_profile("default", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrismdServer:
    """`prismd serve` in a subprocess, with its own PRISMD_HOME."""

    def __init__(self, home: Path, env: dict[str, str], config: str | None = None) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"
        if config is not None:
            (home / "config.toml").write_text(config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def start(self) -> PrismdServer:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "ANTHROPIC_", "PRISMD_", "OLLAMA_"))
        }
        # No offline default model unless a test asks for it (PRISMD_LOCAL_ENABLED=true): a
        # server with no provider would otherwise start a llama.cpp runtime it never uses.
        env.update({"PRISMD_HOME": str(self.home), "PRISMD_LOCAL_ENABLED": "false", **self.env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prismd", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prismd exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"prismd did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> PrismdServer:
        self.stop()
        return self.start()

    def client(self) -> Client:
        return Client(self.ws_url)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


class Client:
    """A synchronous WebSocket client that speaks JSON frames."""

    def __init__(self, url: str) -> None:
        self._cm = connect(url, max_size=None, open_timeout=10)
        self.ws = self._cm.__enter__()
        self.connected = self.recv()
        assert self.connected["type"] == "connected"

    def send(self, **frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def send_raw(self, data: str | bytes) -> None:
        self.ws.send(data)

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def until(self, *types: str, timeout: float = 15) -> list[dict[str, Any]]:
        """Frames up to and including the first of one of `types`."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            frames.append(frame)
            if frame["type"] in types:
                return frames

    def turn(self, timeout: float = 15, **chat: Any) -> list[dict[str, Any]]:
        """Send a chat and collect its frames up to `context_usage` or a turn-ending error."""
        self.send(type="chat", **chat)
        return self.until_turn_end(timeout)

    def until_turn_end(self, timeout: float = 15) -> list[dict[str, Any]]:
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            frames.append(frame)
            if frame["type"] == "context_usage" or frame["type"] == "error":
                return frames

    def no_frame(self, within: float = 0.3) -> bool:
        try:
            self.ws.recv(timeout=within)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["delta"] for f in frames if f["type"] == "chunk")


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeModelServer]:
    with FakeModelServer("openai") as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeModelServer]:
    with FakeModelServer("anthropic") as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> None:
    for name in ("fake_openai", "fake_anthropic"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def openai_env(fake: FakeModelServer, model: str = "gpt-4o-mini") -> dict[str, str]:
    return {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "test-key", "PRISMD_MODEL": model}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    """A prismd shared by the tests of one module, on the fake OpenAI-compatible model."""
    srv = PrismdServer(tmp_path_factory.mktemp("prismd"), openai_env(fake_openai))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    """Build a dedicated prismd (own home, env, config); stopped at the end of the test."""
    servers: list[PrismdServer] = []

    def make(env: dict[str, str], config: str | None = None, start: bool = True) -> PrismdServer:
        home = tmp_path / f"home{len(servers)}"
        home.mkdir()
        srv = PrismdServer(home, env, config)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()
