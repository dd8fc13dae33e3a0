"""Fixtures: scripted fake model servers and a real prismd server process on 127.0.0.1.

Every test talks to prismd over a real WebSocket (or real HTTP); prismd talks to the fake model
over real HTTP with server-sent events.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from hypothesis import settings
from pydantic import ConfigDict, Field, TypeAdapter
from websockets.sync.client import connect

from prismd.protocol import ServerEvent
from prismd.testing.fake_models import FakeModelServer

# Throwaway database servers (PostgreSQL), started on first use.
from .services import make_pg_database, pg_module_url, postgres, redis_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

# Every frame a test receives must be one of the protocol's event types (protocol.py's
# TypedDicts), with their fields' types and no field they do not declare.
_SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(
    Annotated[ServerEvent, Field(discriminator="type")], config=ConfigDict(extra="forbid")
)


def checked_event(frame: Any) -> dict[str, Any]:
    """`frame` (a decoded server frame), after checking it against the protocol's types."""
    _SERVER_EVENT.validate_python(frame, strict=True)
    return frame


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
        # A PostgreSQL store's URL ([store] url in the config, or the environment's).
        self.database_url = env.get("PRISMD_DATABASE_URL")
        if config is not None:
            (home / "config.toml").write_text(config)
            if "[store]" in config:
                import tomllib

                self.database_url = tomllib.loads(config)["store"]["url"]

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
        return checked_event(json.loads(self.ws.recv(timeout=timeout)))

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

    def nothing_pending(self) -> bool:
        """No frame waits for this client: the answer to a ping sent now is the next frame (a
        connection's frames arrive in order, so one queued before the pong comes first). A
        barrier, not a wait: use it once whatever could send a stray frame is over."""
        self.send(type="ping")
        return self.recv() == {"type": "pong"}

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stored_rows(srv: PrismdServer, table: str, session_id: str, columns: str = "*") -> list:
    """A session's rows of one table in the server's database (read-only, beside it)."""
    sql = f"SELECT {columns} FROM {table} WHERE session_id="
    url = srv.database_url
    if url:
        import asyncio

        import asyncpg

        async def fetch() -> list:
            conn = await asyncpg.connect(url)
            try:
                return [tuple(r) for r in await conn.fetch(sql + "$1", session_id)]
            finally:
                await conn.close()

        return asyncio.run(fetch())
    db = sqlite3.connect(f"file:{srv.data_dir / 'prismd.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql + "?", (session_id,)).fetchall()
    finally:
        db.close()


def uploaded_bytes(srv: PrismdServer, path: str) -> bytes:
    """The bytes of an upload (`path` as POST /api/upload answers it): a file under the data
    directory, or a row of the PostgreSQL store."""
    if not srv.database_url:
        return (srv.data_dir / path).read_bytes()
    import asyncio

    import asyncpg

    async def fetch() -> bytes:
        conn = await asyncpg.connect(srv.database_url)
        try:
            data = await conn.fetchval("SELECT data FROM uploads WHERE id=$1", path.rsplit("/")[-1])
            return bytes(data)
        finally:
            await conn.close()

    return asyncio.run(fetch())


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


# The configurations a module's servers run in: `embedded` (one process, SQLite, the
# in-process bus) and `scaled` (PostgreSQL and Redis, the multi-process coordination). A module
# that sets BACKENDS = ("embedded", "scaled") runs its `server` and `make_server` tests in both:
# the same tests, parametrised, not copied.
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = getattr(metafunc.module, "BACKENDS", ("embedded",))
        metafunc.parametrize("backend", backends, scope="module")


@pytest.fixture(scope="module")
def backend() -> str:
    return "embedded"


def backend_config(request: pytest.FixtureRequest, backend: str) -> str:
    """The config.toml sections that put a server in `backend` (a fresh database each call).
    In the file, not the environment, so that `prismd users|tokens` on the same home reach the
    same store."""
    if backend == "embedded":
        return ""
    redis = request.getfixturevalue("redis_server")
    database = request.getfixturevalue("make_pg_database")()
    return f'\n[store]\nurl = "{database}"\n\n[bus]\nurl = "{redis.url}"\n'


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai: FakeModelServer,
    backend: str,
) -> Iterator[PrismdServer]:
    """A prismd shared by the tests of one module, on the fake OpenAI-compatible model."""
    config = backend_config(request, backend)
    srv = PrismdServer(tmp_path_factory.mktemp("prismd"), openai_env(fake_openai), config)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> Iterator[Any]:
    """Build a dedicated prismd (own home, env, config); stopped at the end of the test."""
    servers: list[PrismdServer] = []

    def make(env: dict[str, str], config: str | None = None, start: bool = True) -> PrismdServer:
        home = tmp_path / f"home{len(servers)}"
        home.mkdir()
        srv = PrismdServer(home, env, (config or "") + backend_config(request, backend))
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()
