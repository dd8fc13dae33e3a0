"""The `prismd` command line: serve, chat, sessions, agents."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[tuple[str, ...], Any] = {
        ("server", "host"): getattr(args, "host", None),
        ("server", "port"): getattr(args, "port", None),
        ("server", "data_dir"): getattr(args, "data_dir", None),
    }
    return load_settings(args.config, overrides)


# ---------------------------------------------------------------- serve


def _client_errors_are_not_server_errors(record: logging.LogRecord) -> bool:
    """uvicorn logs a client's invalid UTF-8 frame as an exception with a traceback; it is
    the client's fault (the connection is closed with 1007), so log one line at INFO."""
    if "Invalid UTF-8" in str(record.msg):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
    return True


def _raise_open_files_limit() -> None:
    """Each connection, upstream stream and open session database needs file descriptors;
    the usual soft limit of 1024 is too low for a busy server, the hard limit rarely is."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    except (ImportError, ValueError, OSError):
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.app import create_app

    settings = _settings(args)
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The SDKs log every HTTP request at INFO: one line per model call is noise here.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_client_errors_are_not_server_errors)
    _raise_open_files_limit()
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        access_log=False,
        ws_max_size=settings.server.hard_frame_bytes,
        # Compression costs more CPU than it saves on small, unique streaming frames.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,
    )
    return 0


# ---------------------------------------------------------------- chat


async def _chat(args: argparse.Namespace) -> int:
    import websockets

    url = args.url
    session_id: str | None = args.session
    out = sys.stdout
    async with websockets.connect(url, max_size=None) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "connected":
            print(f"unexpected greeting: {hello}", file=sys.stderr)
            return 1

        async def turn(text: str) -> int:
            nonlocal session_id
            frame: dict[str, Any] = {"type": "chat", "message": text}
            if session_id:
                frame["sessionId"] = session_id
            if args.agent:
                frame["agentId"] = args.agent
            await ws.send(json.dumps(frame))
            while True:
                try:
                    ev = json.loads(await ws.recv())
                except asyncio.CancelledError:
                    raise
                kind = ev.get("type")
                if kind == "session":
                    if session_id != ev["sessionId"] and not args.quiet:
                        print(f"[session {ev['sessionId']}]", file=sys.stderr)
                    session_id = ev["sessionId"]
                elif kind == "chunk":
                    out.write(ev["delta"])
                    out.flush()
                elif kind == "reasoning" and args.show_reasoning:
                    print(f"\n[reasoning] {ev['content']}", file=sys.stderr)
                elif kind == "done":
                    out.write("\n")
                    if not args.quiet:
                        cost = ev.get("costUsd")
                        cost_s = f"${cost:.6f}" if cost is not None else "cost unknown"
                        print(
                            f"[{ev['resolvedModel']} · {ev['tokensIn']} in / "
                            f"{ev['tokensOut']} out · {cost_s} · {ev['durationMs']} ms"
                            + (" · stopped" if ev.get("stopReason") == "stopped" else "")
                            + "]",
                            file=sys.stderr,
                        )
                    return 0
                elif kind == "error":
                    print(f"\nerror ({ev.get('code')}): {ev['error']}", file=sys.stderr)
                    if ev.get("seq") is not None or ev.get("code") != "turn_in_progress":
                        return 2

        async def run_turn(text: str) -> int:
            task = asyncio.ensure_future(turn(text))
            try:
                return await asyncio.shield(task)
            except (KeyboardInterrupt, asyncio.CancelledError):
                await ws.send(json.dumps({"type": "stop"}))
                return await task

        if args.message is not None:
            return await run_turn(args.message)
        print(
            "prismd chat — type a message; /new starts a new session, /quit ends.", file=sys.stderr
        )
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await loop.run_in_executor(None, lambda: input("> "))
            except EOFError:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/new":
                await ws.send(json.dumps({"type": "new_session"}))
                session_id = None
                continue
            await run_turn(line)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url is None:
        settings = _settings(args)
        host = settings.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        args.url = f"ws://{host}:{settings.server.port}/ws"
    try:
        return asyncio.run(_chat(args))
    except OSError as exc:
        print(f"Cannot connect to {args.url}: {exc}. Is `prismd serve` running?", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- sessions, agents


async def _with_store(settings: Settings, fn: Any) -> Any:
    from .store.sqlite import SqliteStore

    store = SqliteStore(settings.data_dir)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def cmd_sessions(args: argparse.Namespace) -> int:
    from .protocol import SESSION_ID_RE

    settings = _settings(args)
    if args.action in ("show", "delete") and not SESSION_ID_RE.match(args.id or ""):
        print("error: give a valid session id", file=sys.stderr)
        return 2

    async def run(store: Any) -> int:
        if args.action == "list":
            records, total = await store.list_sessions(args.limit, 0)
            if args.json:
                print(json.dumps([r.to_json() for r in records], indent=2))
                return 0
            print(f"{'ID':<30} {'STATUS':<8} {'AGENT':<12} {'TURNS':>5}  LAST ACTIVITY")
            for r in records:
                print(
                    f"{r.id:<30} {r.status:<8} {r.agent_id:<12} {r.turn_count:>5}  "
                    f"{r.last_turn_at or r.started_at}"
                )
            print(f"({len(records)} of {total})", file=sys.stderr)
            return 0
        record = await store.get_session(args.id)
        if record is None:
            print(f'error: session "{args.id}" not found', file=sys.stderr)
            return 1
        if args.action == "delete":
            await store.delete_session(args.id)
            print(f"deleted {args.id}")
            return 0
        messages = await store.load_messages(args.id)
        if args.json:
            print(
                json.dumps(
                    {"session": record.to_json(), "messages": [m.to_json() for m in messages]},
                    indent=2,
                )
            )
            return 0
        print(f"session {record.id} · agent {record.agent_id} · {record.status}")
        for m in messages:
            files = "".join(f" [file: {f.filename}]" for f in m.files)
            flag = "" if m.status == "complete" else f" ({m.status})"
            print(f"\n{m.role}{flag}:{files}\n{m.content}")
        return 0

    return int(asyncio.run(_with_store(settings, run)))


def cmd_agents(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for a in settings.all_agents():
        mark = "*" if a.id == settings.default_agent else " "
        model = f"{a.provider or 'default'}/{a.model or 'default'}"
        print(f"{mark} {a.id:<16} {a.name:<20} {model:<32} {a.description}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prismd",
        description="prismd: a self-hosted agentic AI server speaking CortexPrism's protocol.",
    )
    parser.add_argument("--version", action="version", version=f"prismd {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default: $PRISMD_HOME/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server", description="Run the prismd server.")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 3000)")
    serve.add_argument("--data-dir", help="where sessions are stored (default $PRISMD_HOME/data)")
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser(
        "chat",
        help="chat with a running server from the terminal",
        description="A terminal client over the WebSocket. Ctrl-C stops the answer.",
    )
    chat.add_argument("--url", help="WebSocket URL (default from the config: ws://HOST:PORT/ws)")
    chat.add_argument("--session", help="resume this session id")
    chat.add_argument("--agent", help="agent id to talk to")
    chat.add_argument("-m", "--message", help="send one message, print the answer and exit")
    chat.add_argument("-q", "--quiet", action="store_true", help="print only the answer")
    chat.add_argument("--show-reasoning", action="store_true", help="print model reasoning")
    chat.set_defaults(func=cmd_chat)

    sessions = sub.add_parser(
        "sessions", help="list, show or delete stored sessions", description="Stored sessions."
    )
    sessions.add_argument("--data-dir", help="data directory (default from the config)")
    ssub = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    sl = ssub.add_parser("list", help="list sessions, newest first")
    sl.add_argument("--limit", type=int, default=50)
    sl.add_argument("--json", action="store_true")
    ss = ssub.add_parser("show", help="print a session's messages")
    ss.add_argument("id")
    ss.add_argument("--json", action="store_true")
    sd = ssub.add_parser("delete", help="delete a session and its database")
    sd.add_argument("id")
    sessions.set_defaults(func=cmd_sessions)

    agents = sub.add_parser("agents", help="list agents", description="Configured agents.")
    asub = agents.add_subparsers(dest="action", required=True, metavar="ACTION")
    asub.add_parser("list", help="list agents (* marks the default)")
    agents.set_defaults(func=cmd_agents)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"prismd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
