"""Scripted fake model servers speaking the OpenAI and Anthropic streaming chat APIs.

Each :class:`FakeModelServer` is a real HTTP server (a Starlette app served by uvicorn in a
background daemon thread on a free 127.0.0.1 port) that the official ``openai`` and
``anthropic`` SDKs talk to unchanged::

    with FakeModelServer("openai") as fake:              # fake.url == "http://127.0.0.1:PORT/v1"
        fake.script(Reply(status=429, headers={"Retry-After": "0"}, times=1))
        fake.script(Reply(text=["Hel", "lo"], delay_s=0.01), match="greet")
        ...                                               # fake.requests, fake.aborted, ...

Rules: a request is answered by the first non-exhausted rule whose ``match`` is a substring of
the text of the last ``role == "user"`` message (None matches anything), else by ``default``
(``Reply()``: an echo).  Note that in an OpenAI tool loop the last *user* message stays the
same across turns, so use ``times=1`` for a rule that should answer only the first turn.

Wire format
  openai     ``POST /v1/chat/completions`` (SSE when ``stream`` is true): a role chunk
             (``{"role": "assistant", "content": ""}``) sent with the headers, one chunk per
             piece (``reasoning_content`` deltas, then ``content`` deltas, then ``tool_calls``
             deltas: the first names the call, the next ones carry up to 3 slices of the
             arguments), a chunk with ``finish_reason`` "stop" or "tool_calls", the usage chunk
             (``choices: []``) when ``stream_options.include_usage``, and ``data: [DONE]``.
             ``GET /v1/models`` lists "fake-model".
  anthropic  ``POST /v1/messages``: ``message_start`` sent with the headers, then a thinking
             block (thinking_delta pieces, then a signature_delta), a text block and tool_use
             blocks (input_json_delta pieces), ``message_delta`` (stop_reason "end_turn" or
             "tool_use", usage.output_tokens) and ``message_stop``.
  Without ``stream`` both answer one JSON body (chat.completion / Message).  Non-200 replies
  answer the provider's error JSON (message = ``Reply.text`` if given).

Pieces are the reasoning, text and tool-call deltas in order; ``completion`` usage defaults to
their number.  ``disconnect_after`` / ``stall_after`` / ``bad_json_after`` = N act before
piece N (0-based), so N >= the number of pieces acts after the last piece and before the
final events.  After the bad line the stream goes on normally.  For non-stream requests the
delay is ``first_delay_s + delay_s * (pieces - 1)``, ``stall_after`` (any N) never answers,
``disconnect_after`` sends the headers and hangs up, and ``bad_json_after`` sends a broken body.

``stamp`` prefixes the first text piece with ``"@<t0> "``, ``t0`` being the moment the answer's
pieces are scheduled from (``time.monotonic()``, the machine-wide monotonic clock), so that a
client on the same machine can tell how late each piece arrives (piece i is due at
``t0 + i * delay_s``).

Counters: ``completed`` counts responses (stream or not) sent in full, ``aborted`` those the
client went away from first (detected server-side by watching for ``http.disconnect``).

It doubles as the peer of the load benchmark::

    python -m prismd.testing.fake_models --kind openai --port 8001 --pieces 200 --rate 50

Per-piece work is kept small: every frame is pre-serialised once per request (identical
pieces share one ``bytes`` object), body frames bypass Starlette's send wrappers, pacing
follows an absolute schedule with ``asyncio.sleep`` so the rate does not drift, and the
listening socket is drained greedily (see :class:`_UvicornServer`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["FakeModelServer", "Reply", "main"]


@dataclass
class Reply:
    """What the fake model answers to one request (see the module docs for the wire format)."""

    # Pieces streamed as separate deltas; a str is one piece; None -> echo of the last user
    # message ("You said: <text>" split into words that keep their trailing spaces).
    text: list[str] | str | None = None
    # Reasoning deltas sent before the text (openai: delta.reasoning_content,
    # anthropic: a thinking block with thinking_delta and a signature_delta).
    reasoning: list[str] = field(default_factory=list)
    delay_s: float = 0.0  # pause between pieces
    first_delay_s: float = 0.0  # pause before the first piece (headers are already sent)
    # (prompt/input tokens, completion/output tokens); None -> computed:
    # prompt = total chars of all request messages // 4 + 1, completion = number of pieces.
    usage: tuple[int, int] | None = None
    reasoning_tokens: int = 0  # openai: usage.completion_tokens_details.reasoning_tokens
    status: int = 200  # non-200: an error JSON body in the provider's format (no stream)
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # requests this rule serves before it is used up (None = forever)
    disconnect_after: int | None = None  # after N pieces, close the TCP connection abruptly
    stall_after: int | None = None  # after N pieces, send nothing until the client goes away
    bad_json_after: int | None = None  # after N pieces, send one SSE data line that is not JSON
    # [{"id": "call_1", "name": "x", "arguments": "{...json...}"}], streamed after the text.
    tool_calls: list[dict] = field(default_factory=list)
    # Prefix the first text piece with "@<t0> ": t0 is the answer's schedule origin on the
    # machine's monotonic clock (time.monotonic(), CLOCK_MONOTONIC), so a client on the same
    # machine knows that text piece i was due at t0 + i * delay_s (load benchmark lag).
    stamp: bool = False


# --------------------------------------------------------------------------------------------
# helpers


class _HangUp(Exception):
    """Raised inside the ASGI app to make uvicorn drop the TCP connection mid-response."""


class _QuietHangUps(logging.Filter):
    """Hide uvicorn's "Exception in ASGI application" log for deliberate hang-ups."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _HangUp)


_quiet_filter = _QuietHangUps()
logging.getLogger("uvicorn.error").addFilter(_quiet_filter)

_dumps = json.dumps
_RAW_ASGI = "prismd.fake_models.raw_asgi"
_WORDS = re.compile(r"\S+\s*")
_ARG_SPLITS = 3  # tool-call arguments are streamed in up to this many pieces
_STAMP = "@stamp@"  # Reply.stamp placeholder, replaced by "@<t0>" when the answer starts
_STAMP_B = _STAMP.encode()


def _js(value: Any) -> str:
    return _dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the joined text parts/blocks of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or ""
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text")
        )
    return ""


def _chars_of(value: Any) -> int:
    """Characters of text in a message (content, parts, tool calls, tool results)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars_of(v) for v in value)
    if isinstance(value, dict):
        n = 0
        for key in ("content", "text", "arguments", "function", "tool_calls", "thinking"):
            if key in value:
                n += _chars_of(value[key])
        if "input" in value and not isinstance(value["input"], str):  # anthropic tool_use
            n += len(_js(value["input"]))
        return n
    return 0


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _text_of(msg.get("content"))
    return ""


def _split_args(args: str) -> list[str]:
    if not args:
        return []
    size = max(1, -(-len(args) // _ARG_SPLITS))
    return [args[i : i + size] for i in range(0, len(args), size)]


def _tool_args(call: dict) -> str:
    args = call.get("arguments", "")
    return args if isinstance(args, str) else _js(args)


_OPENAI_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout_error", "timeout"),
    409: ("conflict_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class _Plan:
    """A fully pre-serialised response."""

    status: int
    headers: list[tuple[bytes, bytes]]
    stream: bool
    body: bytes = b""  # non-stream body
    head: bytes = b""  # stream: sent together with the headers
    pieces: list[bytes] = field(default_factory=list)
    bad: bytes = b""  # stream: the invalid SSE line for bad_json_after
    tail: bytes = b""  # stream: sent after the last piece
    n_pieces: int = 0  # non-stream: pieces the answer would have had (for the delay)
    counted: bool = True  # counts towards completed/aborted (not for GET /v1/models)
    reply: Reply = field(default_factory=Reply)


@dataclass
class _Rule:
    reply: Reply
    match: str | None
    left: int | None


class _UvicornServer(uvicorn.Server):
    """uvicorn with a greedy accept loop.

    libuv (under uvloop) accepts one connection per event-loop iteration, so while hundreds of
    streams keep the loop busy a burst of new connections waits in the kernel's accept queue
    for seconds.  We listen ourselves, accept everything that is pending on each wake-up, and
    hand the sockets to uvicorn's HTTP protocol via ``loop.connect_accepted_socket``.
    """

    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.sock = sock
        self._greedy = False
        self._conn_tasks: set[asyncio.Task] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = loop = asyncio.get_running_loop()
        config = self.config
        if not config.loaded:
            config.load()
        try:
            factory = functools.partial(
                config.http_protocol_class,  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=getattr(self.lifespan, "state", {}),
            )
            self.sock.listen(config.backlog)
            self.sock.setblocking(False)
            loop.add_reader(self.sock.fileno(), self._on_accept, factory)
        except (AttributeError, TypeError, NotImplementedError):  # pragma: no cover
            await super().startup(sockets=[self.sock])  # plain uvicorn listening
            return
        self._greedy = True
        await super().startup(sockets=[])  # lifespan etc.; no listeners of its own

    def _on_accept(self, factory: Callable[..., asyncio.Protocol]) -> None:
        loop = self.loop
        assert loop is not None
        for _ in range(1024):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:  # e.g. EMFILE: back off instead of spinning on a ready socket
                loop.remove_reader(self.sock.fileno())
                loop.call_later(0.05, loop.add_reader, self.sock.fileno(), self._on_accept, factory)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(loop.connect_accepted_socket(factory, conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task) -> None:
        self._conn_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("uvicorn.error").warning("accept failed: %r", task.exception())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._greedy and self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        await super().shutdown(sockets=sockets)


def _pick(opts: tuple[str, ...], module: str) -> str:
    try:
        __import__(module)
    except ImportError:
        return opts[1]
    return opts[0]


# --------------------------------------------------------------------------------------------
# the server


class FakeModelServer:
    """A scripted OpenAI- or Anthropic-compatible chat server on 127.0.0.1 (see module docs)."""

    def __init__(
        self,
        kind: str = "openai",
        default: Reply | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record: bool = True,
    ) -> None:
        if kind not in ("openai", "anthropic"):
            raise ValueError(f"kind must be 'openai' or 'anthropic', not {kind!r}")
        self.kind = kind
        self.default = default if default is not None else Reply()
        self.host = host
        self.record = record  # False: don't keep request bodies (long benchmark runs)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._requests: list[dict] = []
        self._aborted = 0
        self._completed = 0
        self._active = 0
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._sock = self._bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        netloc = f"[{host}]" if ":" in host else host
        root = f"http://{netloc}:{self.port}"
        self.url: str = root + "/v1" if kind == "openai" else root
        if kind == "openai":
            routes = [
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                # Ollama's native model list, so the fake can stand in for a local Ollama.
                Route("/api/tags", self._ollama_tags, methods=["GET"]),
            ]
        else:
            routes = [
                Route("/v1/messages", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        self.app = Starlette(routes=routes)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Stash uvicorn's own receive/send: the per-piece path skips Starlette's wrappers.
        scope[_RAW_ASGI] = (receive, send)
        await self.app(scope, receive, send)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return sock

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeModelServer:
        if self._thread is not None:
            return self
        if self._sock.fileno() == -1:  # uvicorn closed it on a previous stop(): rebind
            self._sock = self._bind(self.host, self.port)
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            proxy_headers=False,
            log_level="warning",
            log_config=None,  # don't reconfigure the host process' logging
            access_log=False,
            loop=_pick(("uvloop", "asyncio"), "uvloop"),
            http=_pick(("httptools", "h11"), "httptools"),
            ws="none",
            lifespan="off",
            backlog=2048,
            timeout_graceful_shutdown=2,
        )
        self._server = _UvicornServer(config, self._sock)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._server.run,
            name=f"fake-{self.kind}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake {self.kind} server failed to start on {self.url}")
            time.sleep(0.005)
        with socket.create_connection(
            ("127.0.0.1" if ":" not in self.host else self.host, self.port), timeout=5
        ):
            pass
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            self._sock.close()  # never started: just release the port
            return
        self._stopping = True
        loop = server.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._cancel_streams)
        server.should_exit = True
        thread.join(timeout=10)
        self._server = self._thread = None

    def _cancel_streams(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeModelServer(kind={self.kind!r}, url={self.url!r})"

    # -- scripting and inspection -----------------------------------------------------------------

    def script(self, reply: Reply, match: str | None = None) -> None:
        """Add a rule: the first non-exhausted rule whose ``match`` is a substring of the last
        user message text (None matches anything) answers; no rule -> ``self.default``."""
        with self._lock:
            self._rules.append(_Rule(reply, match, reply.times))

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self._requests.clear()
            self._aborted = self._completed = 0

    @property
    def requests(self) -> list[dict]:
        """JSON bodies received, in order (a snapshot copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def aborted(self) -> int:
        """Responses the client went away from before they were finished."""
        with self._lock:
            return self._aborted

    @property
    def completed(self) -> int:
        """Responses (streamed or not) that were sent in full."""
        with self._lock:
            return self._completed

    @property
    def active(self) -> int:
        """Responses currently being served."""
        with self._lock:
            return self._active

    def wait_aborted(self, n: int = 1, timeout: float = 5.0) -> bool:
        return self._wait(lambda: self._aborted >= n, timeout)

    def wait_completed(self, n: int = 1, timeout: float = 5.0) -> bool:
        return self._wait(lambda: self._completed >= n, timeout)

    def _wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if cond():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _choose(self, body: dict) -> Reply:
        text = _last_user_text(body.get("messages"))
        with self._lock:
            if self.record:
                self._requests.append(body)
            for rule in self._rules:
                if rule.left == 0 or (rule.match is not None and rule.match not in text):
                    continue
                if rule.left is not None:
                    rule.left -= 1
                return rule.reply
        return self.default

    # -- endpoints ---------------------------------------------------------------------------------

    async def _models(self, request: Request) -> _Raw:
        if self.kind == "openai":
            data: dict = {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}],
            }
        else:
            data = {
                "data": [
                    {
                        "type": "model",
                        "id": "fake-model",
                        "display_name": "Fake Model",
                        "created_at": "2024-01-01T00:00:00Z",
                    }
                ],
                "has_more": False,
                "first_id": "fake-model",
                "last_id": "fake-model",
            }
        return _Raw(
            self, _Plan(200, list(_JSON_HEADERS), False, body=_js(data).encode(), counted=False)
        )

    async def _ollama_tags(self, request: Request) -> _Raw:
        data = {"models": [{"name": "fake-llama:latest", "model": "fake-llama:latest"}]}
        return _Raw(
            self, _Plan(200, list(_JSON_HEADERS), False, body=_js(data).encode(), counted=False)
        )

    async def _chat(self, request: Request) -> _Raw:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            plan = self._error_plan(Reply(status=400, text=f"invalid JSON body: {exc}"))
            return _Raw(self, plan)
        reply = self._choose(body)
        if reply.status != 200:
            return _Raw(self, self._error_plan(reply))
        if self.kind == "openai":
            return _Raw(self, _openai_plan(reply, body))
        return _Raw(self, _anthropic_plan(reply, body))

    def _error_plan(self, reply: Reply) -> _Plan:
        status = reply.status
        message = "".join(reply.text) if isinstance(reply.text, list) else reply.text
        message = message or f"fake {self.kind} error (status {status})"
        if self.kind == "openai":
            etype, code = _OPENAI_ERRORS.get(status, ("server_error", "server_error"))
            data: dict = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        else:
            etype = _ANTHROPIC_ERRORS.get(status, "api_error")
            data = {"type": "error", "error": {"type": etype, "message": message}}
        return _Plan(
            status, _headers(_JSON_HEADERS, reply), False, body=_js(data).encode(), reply=reply
        )


def _headers(base: list[tuple[bytes, bytes]], reply: Reply) -> list[tuple[bytes, bytes]]:
    out = list(base)
    for k, v in reply.headers.items():
        out.append((k.lower().encode("latin-1"), str(v).encode("latin-1")))
    return out


def _text_pieces(reply: Reply, body: dict) -> list[str]:
    if reply.text is None:
        out = _WORDS.findall("You said: " + _last_user_text(body.get("messages")))
    elif isinstance(reply.text, str):
        out = [reply.text]
    else:
        out = list(reply.text)
    if reply.stamp and out:
        out[0] = _STAMP + " " + out[0]  # the origin is filled in when the answer starts
    return out


def _stamped(frames: list[bytes], t0: float) -> list[bytes]:
    """The frames with the stamp placeholder (in the first text piece) replaced by t0."""
    stamp = b"@%.6f" % t0
    out = list(frames)
    for i, frame in enumerate(out):
        if _STAMP_B in frame:
            out[i] = frame.replace(_STAMP_B, stamp, 1)
            break
    return out


def _usage(reply: Reply, body: dict, n_pieces: int) -> tuple[int, int]:
    if reply.usage is not None:
        return reply.usage
    return _chars_of(body.get("messages")) // 4 + 1, n_pieces


# --------------------------------------------------------------------------------------------
# OpenAI wire format


def _openai_plan(reply: Reply, body: dict) -> _Plan:
    model = body.get("model") or "fake-model"
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    texts = _text_pieces(reply, body)
    n_tool_pieces = sum(1 + len(_split_args(_tool_args(c))) for c in reply.tool_calls)
    n_pieces = len(reply.reasoning) + len(texts) + n_tool_pieces
    prompt, completion = _usage(reply, body, n_pieces)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
    }
    finish = "tool_calls" if reply.tool_calls else "stop"

    if not body.get("stream"):
        message: dict = {"role": "assistant", "content": "".join(texts) if texts else None}
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {"name": c.get("name", ""), "arguments": _tool_args(c)},
                }
                for i, c in enumerate(reply.tool_calls)
            ]
        data = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": usage,
        }
        return _Plan(
            200,
            _headers(_JSON_HEADERS, reply),
            False,
            body=_js(data).encode(),
            n_pieces=n_pieces,
            reply=reply,
        )

    prefix = (
        'data: {"id":' + _js(cid) + ',"object":"chat.completion.chunk","created":' + str(created)
    )
    prefix += ',"model":' + _js(model)
    choice = prefix + ',"choices":[{"index":0,"delta":'
    mid = ',"finish_reason":null}]}\n\n'
    cache: dict[tuple[str, str], bytes] = {}

    def delta(key: str, piece: str) -> bytes:
        frame = cache.get((key, piece))
        if frame is None:
            frame = cache[(key, piece)] = (
                choice + '{"' + key + '":' + _js(piece) + "}" + mid
            ).encode()
        return frame

    pieces = [delta("reasoning_content", p) for p in reply.reasoning]
    pieces += [delta("content", p) for p in texts]
    for i, call in enumerate(reply.tool_calls):
        first = {
            "index": i,
            "id": call.get("id") or f"call_{i}",
            "type": "function",
            "function": {"name": call.get("name", ""), "arguments": ""},
        }
        pieces.append((choice + '{"tool_calls":[' + _js(first) + "]}" + mid).encode())
        for part in _split_args(_tool_args(call)):
            d = {"index": i, "function": {"arguments": part}}
            pieces.append((choice + '{"tool_calls":[' + _js(d) + "]}" + mid).encode())

    head = (choice + '{"role":"assistant","content":""}' + mid).encode()
    tail = choice + '{},"finish_reason":' + _js(finish) + "}]}\n\n"
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        tail += prefix + ',"choices":[],"usage":' + _js(usage) + "}\n\n"
    tail += "data: [DONE]\n\n"
    return _Plan(
        200,
        _headers(_SSE_HEADERS, reply),
        True,
        head=head,
        pieces=pieces,
        bad=b'data: {"id":"broken", this is not JSON\n\n',
        tail=tail.encode(),
        reply=reply,
    )


# --------------------------------------------------------------------------------------------
# Anthropic wire format


def _sse(event: str, data: dict | str) -> str:
    payload = data if isinstance(data, str) else _js(data)
    return "event: " + event + "\ndata: " + payload + "\n\n"


def _anthropic_plan(reply: Reply, body: dict) -> _Plan:
    model = body.get("model") or "fake-model"
    mid = "msg_" + uuid.uuid4().hex[:24]
    texts = _text_pieces(reply, body)
    calls = [
        (c.get("id") or f"toolu_{i}", c.get("name", ""), _tool_args(c))
        for i, c in enumerate(reply.tool_calls)
    ]
    n_tool_pieces = sum(len(_split_args(a)) or 1 for _, _, a in calls)
    n_pieces = len(reply.reasoning) + len(texts) + n_tool_pieces
    n_in, n_out = _usage(reply, body, n_pieces)
    stop_reason = "tool_use" if calls else "end_turn"
    signature = "fake-signature-" + uuid.uuid4().hex[:16]

    if not body.get("stream"):
        content: list[dict] = []
        if reply.reasoning:
            content.append(
                {"type": "thinking", "thinking": "".join(reply.reasoning), "signature": signature}
            )
        if texts:
            content.append({"type": "text", "text": "".join(texts)})
        for cid, name, args in calls:
            try:
                parsed = json.loads(args) if args else {}
            except ValueError:
                parsed = {}
            content.append({"type": "tool_use", "id": cid, "name": name, "input": parsed})
        data = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out},
        }
        return _Plan(
            200,
            _headers(_JSON_HEADERS, reply),
            False,
            body=_js(data).encode(),
            n_pieces=n_pieces,
            reply=reply,
        )

    start = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": 1},
        },
    }
    head = _sse("message_start", start).encode()
    pieces: list[bytes] = []
    index = -1
    pending = ""  # structural events (block stop/start) glued in front of the next piece

    def block_stop() -> str:
        return _sse(
            "content_block_stop", '{"type":"content_block_stop","index":' + str(index) + "}"
        )

    def block_start(block: dict) -> str:
        nonlocal index
        index += 1
        return _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )

    def deltas(kind: str, key: str, items: list[str]) -> None:
        nonlocal pending
        pre = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":' + str(
            index
        )
        pre += ',"delta":{"type":"' + kind + '","' + key + '":'
        cache: dict[str, bytes] = {}
        for i, item in enumerate(items):
            frame = cache.get(item) if i else None
            if frame is None:
                frame = (pre + _js(item) + "}}\n\n").encode()
                if i == 0:
                    frame = pending.encode() + frame
                    pending = ""
                else:
                    cache[item] = frame
            pieces.append(frame)

    if reply.reasoning:
        pending += block_start({"type": "thinking", "thinking": "", "signature": ""})
        deltas("thinking_delta", "thinking", reply.reasoning)
        pending += _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "signature_delta", "signature": signature},
            },
        )
        pending += block_stop()
    if texts:
        pending += block_start({"type": "text", "text": ""})
        deltas("text_delta", "text", texts)
        pending += block_stop()
    for cid, name, args in calls:
        pending += block_start({"type": "tool_use", "id": cid, "name": name, "input": {}})
        deltas("input_json_delta", "partial_json", _split_args(args) or [""])
        pending += block_stop()

    tail = pending + _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": n_out},
        },
    )
    tail += _sse("message_stop", '{"type":"message_stop"}')
    return _Plan(
        200,
        _headers(_SSE_HEADERS, reply),
        True,
        head=head,
        pieces=pieces,
        bad=b'event: content_block_delta\ndata: {"type": this is not JSON\n\n',
        tail=tail.encode(),
        reply=reply,
    )


# --------------------------------------------------------------------------------------------
# sending


class _Raw:
    """ASGI response that plays a :class:`_Plan`, watching for the client going away."""

    __slots__ = ("srv", "plan")

    def __init__(self, srv: FakeModelServer, plan: _Plan) -> None:
        self.srv = srv
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        srv, plan = self.srv, self.plan
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False, "gone": False}
        receive, raw_send = scope.get(_RAW_ASGI, (receive, send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:
                state["gone"] = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        srv._tasks.add(task)
        with srv._lock:
            srv._active += 1
        try:
            await self._play(send, raw_send, plan, state)
        except asyncio.CancelledError:
            if state["gone"]:  # the client went away: swallow our own cancellation
                task.uncancel()
                if plan.counted:
                    with srv._lock:
                        srv._aborted += 1
            elif srv._stopping:  # stop(): drop the connection without log noise
                task.uncancel()
                raise _HangUp("server stopping") from None
            else:
                raise
        finally:
            state["done"] = True
            watcher.cancel()
            srv._tasks.discard(task)
            with srv._lock:
                srv._active -= 1

    async def _play(self, send: Send, raw_send: Send, plan: _Plan, state: dict) -> None:
        reply = plan.reply
        loop = asyncio.get_running_loop()
        if not plan.stream:
            delay = reply.first_delay_s + reply.delay_s * max(0, plan.n_pieces - 1)
            if delay > 0:
                await asyncio.sleep(delay)
            if reply.stall_after is not None:
                await loop.create_future()  # until the client goes away (or stop())
            body = plan.body
            if reply.stamp:
                body = _stamped([body], time.monotonic())[0]
            if reply.bad_json_after is not None and plan.status == 200:
                body = b'{"this is": not JSON'
            headers = plan.headers + [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": plan.status, "headers": headers})
            if reply.disconnect_after is not None:  # headers, then no body: a truncated reply
                raise _HangUp("disconnect_after")
            state["done"] = True
            await send({"type": "http.response.body", "body": body, "more_body": False})
            if plan.status == 200 and plan.counted:
                self._count_completed()
            return

        # The start goes through Starlette (its middlewares track "response started"); the
        # body frames go straight to uvicorn.
        await send({"type": "http.response.start", "status": 200, "headers": plan.headers})
        send = raw_send
        msg: dict = {"type": "http.response.body", "body": plan.head, "more_body": True}
        await send(msg)
        disconnect, stall, bad = reply.disconnect_after, reply.stall_after, reply.bad_json_after
        delay = reply.delay_s
        t = loop.time() + reply.first_delay_s
        pieces = plan.pieces
        if reply.stamp:
            pieces = _stamped(pieces, time.monotonic() + reply.first_delay_s)
        n = len(pieces)
        for i in range(n + 1):
            if i == disconnect:
                raise _HangUp("disconnect_after")
            if i == stall:
                await loop.create_future()  # until the client goes away (or stop())
            if i == bad:
                msg["body"] = plan.bad
                await send(msg)
            if i == n:
                break
            wait = t - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            msg["body"] = pieces[i]
            await send(msg)
            t += delay
        state["done"] = True
        await send({"type": "http.response.body", "body": plan.tail, "more_body": False})
        self._count_completed()

    def _count_completed(self) -> None:
        with self.srv._lock:
            self.srv._completed += 1


# --------------------------------------------------------------------------------------------
# CLI


def _raise_nofile_limit() -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m prismd.testing.fake_models",
        description="Serve a fake streaming chat model forever (benchmark peer).",
    )
    parser.add_argument("--kind", choices=["openai", "anthropic"], default="openai")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pieces", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="pieces per second; 0 = no delay")
    parser.add_argument("--piece-text", default="tok ")
    parser.add_argument("--first-delay", type=float, default=0.0, help="seconds before 1st piece")
    parser.add_argument(
        "--stamp", action="store_true", help='prefix each answer with "@<t0> " (Reply.stamp)'
    )
    args = parser.parse_args(argv)

    _raise_nofile_limit()
    default = Reply(
        text=[args.piece_text] * args.pieces,
        delay_s=1.0 / args.rate if args.rate > 0 else 0.0,
        first_delay_s=args.first_delay,
        stamp=args.stamp,
    )
    server = FakeModelServer(args.kind, default, host=args.host, port=args.port, record=False)
    server.start()
    print(f"ready {server.url}", flush=True)
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
