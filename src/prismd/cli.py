"""The `prismd` command line: serve, chat, sessions, agents."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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


def _user_count(settings: Settings) -> int:
    """Users in the store, read without starting the server (0 if there is none)."""
    if settings.store.url:
        from .store.base import StoreUnavailable

        async def count(store: Any) -> int:
            return int(await store.count_users())

        try:
            return int(asyncio.run(_with_store(settings, count)))
        except StoreUnavailable:
            return 0  # refused below; serving would fail on the store anyway
    import sqlite3

    path = settings.data_dir / "prismd.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _store_refusal(settings: Settings) -> str | None:
    """A PostgreSQL store that cannot be reached (or migrated) stops the start with one clear
    line, not a traceback from the server's start-up."""
    if not settings.store.url:
        return None
    from .store.base import StoreUnavailable

    async def probe(store: Any) -> None:
        return None

    try:
        asyncio.run(_with_store(settings, probe))
    except StoreUnavailable as exc:
        return f"cannot use the store ({exc}); check store.url (PRISMD_DATABASE_URL)"
    return None


def _exposure_refusal(settings: Settings, insecure: bool) -> str | None:
    """Why the server must not start: reachable from other machines with nothing to log in."""
    from .auth.middleware import is_loopback

    host = settings.server.host
    if insecure or is_loopback(host) or settings.auth.token:
        return None
    if _user_count(settings) > 0:
        return None
    return (
        f"refusing to listen on {host} with no password: anyone who can reach it could use "
        "it. Set a password first with `prismd passwd` (or add users with `prismd users add "
        "NAME`), or configure a token ([auth] token in config.toml, or PRISMD_TOKEN); or pass "
        "--insecure to serve without authentication anyway."
    )


def _workers_refusal(settings: Settings, workers: int) -> str | None:
    if workers <= 1:
        return None
    if not settings.bus.url or not settings.store.url:
        return (
            f"--workers {workers} runs several processes, which share sessions through "
            "PostgreSQL and Redis: set PRISMD_DATABASE_URL (or [store] url) and "
            "PRISMD_REDIS_URL (or [bus] url), or run one worker"
        )
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.app import create_app

    settings = _settings(args)
    workers = args.workers or 1
    refusal = (
        _workers_refusal(settings, workers)
        or _store_refusal(settings)
        or _exposure_refusal(settings, args.insecure)
    )
    if refusal:
        print(f"prismd: {refusal}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(settings)
    if args.insecure and _exposure_refusal(settings, False):
        logging.getLogger("prismd").warning(
            "serving %s with no authentication (--insecure): anyone who can reach it can use "
            "it and its tools",
            settings.server.host,
        )
    _raise_open_files_limit()
    proxies = settings.server.trusted_proxies
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "log_level": settings.server.log_level,
        "access_log": False,
        # X-Forwarded-For/-Proto are read only from `server.trusted_proxies` (uvicorn would
        # trust 127.0.0.1 by default, or $FORWARDED_ALLOW_IPS: a local client could then
        # pose as any address and escape the per-address login limit).
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": list(proxies),
        "ws_max_size": settings.server.hard_frame_bytes,
        # Compression costs more CPU than it saves on small, unique streaming frames.
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": 5,
    }
    if workers > 1:
        # Each worker process builds the app from the same settings: the flags travel in the
        # environment (uvicorn starts the workers).
        for name, value in (
            ("PRISMD_CONFIG", args.config),
            ("PRISMD_HOST", args.host),
            ("PRISMD_PORT", args.port),
            ("PRISMD_DATA_DIR", args.data_dir),
        ):
            if value is not None:
                os.environ[name] = str(value)
        uvicorn.run("prismd.server.app:from_environment", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)
    return 0


# ---------------------------------------------------------------- chat


async def _chat(args: argparse.Namespace) -> int:
    import websockets

    url = args.url
    session_id: str | None = args.session
    out = sys.stdout
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    async with websockets.connect(url, max_size=None, additional_headers=headers) as ws:
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
    import os

    if args.token is None:
        args.token = os.environ.get("PRISMD_TOKEN")
    if args.url is None or args.token is None:
        settings = _settings(args)
        args.token = args.token or settings.auth.token
    if args.url is None:
        host = settings.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        args.url = f"ws://{host}:{settings.server.port}/ws"
    from websockets.exceptions import InvalidStatus

    try:
        return asyncio.run(_chat(args))
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = " (give an API token: --token or PRISMD_TOKEN)" if status in (401, 403) else ""
        print(f"{args.url} refused the connection: HTTP {status}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"Cannot connect to {args.url}: {exc}. Is `prismd serve` running?", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- sessions, agents


async def _with_store(settings: Settings, fn: Any) -> Any:
    from .store import make_store

    store = make_store(settings)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def cmd_sessions(args: argparse.Namespace) -> int:
    from .protocol import SESSION_ID_RE
    from .server.routes.rows import message_row, session_row

    settings = _settings(args)
    if args.action != "list" and not SESSION_ID_RE.match(args.id or ""):
        print("error: give a valid session id", file=sys.stderr)
        return 2

    out = str(Path(args.out or f"{args.id}.db").resolve()) if args.action == "export" else ""

    async def run(store: Any) -> int:
        if args.action == "list":
            records, total = await store.list_sessions(args.limit, 0)  # every owner, status
            if args.json:
                # The rows of GET /api/sessions.
                print(json.dumps([session_row(r) for r in records], indent=2, ensure_ascii=False))
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
            await store.delete_session_uploads(args.id)  # as DELETE /api/sessions/ID does
            print(f"deleted {args.id}")
            return 0
        if args.action == "export":
            await store.export_session(args.id, out)
            print(f"wrote {out}")
            return 0
        messages = await store.load_messages(args.id)
        if args.json:
            # The rows of GET /api/sessions/ID and GET /api/sessions/ID/messages.
            body = {"session": session_row(record), "messages": [message_row(m) for m in messages]}
            print(json.dumps(body, indent=2, ensure_ascii=False))
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
    if args.json:
        from .server.routes.rows import agent_config

        # The objects of GET /api/agents (CortexPrism's AgentConfig).
        configs = [
            agent_config(a, builtin=True, default=a.id == settings.default_agent)
            for a in sorted(settings.all_agents(), key=lambda a: a.name.lower())
        ]
        print(json.dumps(configs, indent=2, ensure_ascii=False))
        return 0
    for a in settings.all_agents():
        mark = "*" if a.id == settings.default_agent else " "
        model = f"{a.provider or 'default'}/{a.model or 'default'}"
        print(f"{mark} {a.id:<16} {a.name:<20} {model:<32} {a.description}")
    return 0


def cmd_uploads(args: argparse.Namespace) -> int:
    """`prismd uploads prune`: what the server's janitor does every `prune_interval_s`."""
    from .server.uploads import prune_uploads

    settings = _settings(args)
    days = args.older_than_days
    if days is None:
        days = settings.uploads.max_age_days
        if not days:
            print("uploads.max_age_days is 0: unused uploads are kept (give --older-than-days)")
            return 0
    if days < 0:
        print("error: --older-than-days must be 0 or more", file=sys.stderr)
        return 2

    async def run(store: Any) -> int:
        removed = await prune_uploads(store, days)
        print(f"removed {removed} upload(s) older than {days:g} days that no session refers to")
        return 0

    return int(asyncio.run(_with_store(settings, run)))


# ---------------------------------------------------------------- db (PostgreSQL)


def cmd_db(args: argparse.Namespace) -> int:
    from .store.base import StoreUnavailable
    from .store.postgres import describe_url, migrate
    from .store.sqlite_import import KINDS, ImportSourceError, import_sqlite

    settings = _settings(args)
    url = settings.store.url
    if not url:
        print(
            "prismd: no PostgreSQL database is configured: set PRISMD_DATABASE_URL or "
            '[store] url = "postgresql://user:password@host/db" in config.toml',
            file=sys.stderr,
        )
        return 2
    timeout_s = settings.store.timeout_s
    try:
        if args.action == "migrate":
            version = asyncio.run(migrate(url, timeout_s))
            print(f"{describe_url(url)}: schema version {version}")
            return 0
        source = Path(args.from_sqlite).expanduser()
        counts = asyncio.run(import_sqlite(source, url, timeout_s))
    except StoreUnavailable as exc:
        print(f"prismd: {exc}", file=sys.stderr)
        return 1
    except ImportSourceError as exc:
        print(f"prismd: {exc}", file=sys.stderr)
        return 1
    width = max(len(kind) for kind in KINDS)
    for kind in KINDS:
        print(f"{kind:<{width}}  {counts[kind]:>8}")
    if not any(counts.values()):
        print(f"nothing moved: everything in {source} is in {describe_url(url)} already")
    else:
        print(f"moved {sum(counts.values())} rows from {source} to {describe_url(url)}")
    return 0


# ---------------------------------------------------------------- users, passwords, tokens


def _read_password(args: argparse.Namespace, name: str) -> str:
    """From stdin (--password-stdin: the first line), else asked twice without echo."""
    from .auth.service import AccountError, check_password

    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            raise _CliError("the two passwords differ")
    try:
        return check_password(password)
    except AccountError as exc:
        raise _CliError(str(exc)) from None


class _CliError(Exception):
    pass


def _auth_command(fn: Any) -> Any:
    """Run `fn(args, auth)` with the credentials service on the core database (the same
    checks as the admin page's; the server need not run, and a running one sees the change)."""

    def run(args: argparse.Namespace) -> int:
        from .auth import AccountError, Auth

        settings = _settings(args)

        async def with_auth(store: Any) -> int:
            auth = Auth(settings, store)
            try:
                return int(await fn(args, auth))
            finally:
                await auth.aclose()

        try:
            return int(asyncio.run(_with_store(settings, with_auth)))
        except (_CliError, AccountError) as exc:
            print(f"prismd: {exc}", file=sys.stderr)
            return 1

    return run


async def _set_user_password(auth: Any, name: str, password: str, admin: bool) -> str:
    """Create the user, or change the password of an existing one. Returns what was done."""
    user = await auth.store.get_user_by_name(name)
    if user is None:
        user = await auth.add_user(name, password, admin)
        return f"added user {name}" + (" (admin)" if user.admin else "")
    await auth.set_password(user.id, password)
    return f"changed the password of {name} (their login sessions are ended)"


async def _users(args: argparse.Namespace, auth: Any) -> int:
    from .auth.service import check_username

    store = auth.store
    if args.action == "list":
        users = await store.list_users()
        if args.json:
            print(json.dumps([u.to_json() for u in users], indent=2))
            return 0
        for u in users:
            print(f"{u.name:<24} {'admin' if u.admin else 'user':<6} {u.id}  {u.created_at}")
        if not users:
            print("(no users: the server is open on loopback)", file=sys.stderr)
        return 0
    name = check_username(args.name)
    user = await store.get_user_by_name(name)
    if args.action == "add":
        if user is not None:
            raise _CliError(f"user {name} exists already (change the password: users passwd)")
        print(await _set_user_password(auth, name, _read_password(args, name), args.admin))
        return 0
    if user is None:
        raise _CliError(f"no user {name}")
    if args.action == "remove":
        await auth.remove_user(user.id)
        print(f"removed user {name} (their sessions are kept)")
        return 0
    print(await _set_user_password(auth, name, _read_password(args, name), False))
    return 0


async def _passwd(args: argparse.Namespace, auth: Any) -> int:
    admins = [u for u in await auth.store.list_users() if u.admin]
    name = admins[0].name if admins else "admin"
    print(await _set_user_password(auth, name, _read_password(args, name), True))
    return 0


async def _tokens(args: argparse.Namespace, auth: Any) -> int:
    store = auth.store
    users = {u.id: u for u in await store.list_users()}
    if args.action == "create":
        if args.user:
            user = next((u for u in users.values() if u.name == args.user), None)
            if user is None:
                raise _CliError(f"no user {args.user}")
        else:
            user = next((u for u in users.values() if u.admin), None)
            if user is None:
                raise _CliError(
                    "no user yet: add one first (prismd users add NAME), or give --user"
                )
        record, token = await auth.create_token(user.id, args.name or "")
        print(token)
        print(
            f"token {record.id} for {user.name}: shown once, keep it "
            "(send it as `Authorization: Bearer …`)",
            file=sys.stderr,
        )
        return 0
    if args.action == "list":
        tokens = await store.list_tokens()
        for t in tokens:
            owner = users[t.user_id].name if t.user_id in users else t.user_id
            used = t.last_used_at or "never used"
            print(f"{t.id:<28} {owner:<20} {t.name or '-':<20} {t.created_at}  {used}")
        if not tokens:
            print("(no tokens)", file=sys.stderr)
        return 0
    if not await auth.revoke_token(args.id):
        raise _CliError(f"no token {args.id}")
    print(f"revoked {args.id}")
    return 0


def _add_auth_commands(sub: Any) -> None:
    users = sub.add_parser(
        "users",
        help="add, list, remove users or change a password",
        description="Users who may log in (the first one is the admin). Once a user exists "
        "every request needs credentials.",
    )
    users.add_argument("--data-dir", help="data directory (default from the config)")
    usub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    ua = usub.add_parser("add", help="add a user (asks for the password)")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true", help="an admin sees every user's sessions")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    ul = usub.add_parser("list", help="list users")
    ul.add_argument("--json", action="store_true")
    ur = usub.add_parser("remove", help="remove a user (ends their logins, revokes tokens)")
    ur.add_argument("name")
    up = usub.add_parser("passwd", help="change a user's password")
    up.add_argument("name")
    up.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    users.set_defaults(func=_auth_command(_users))

    passwd = sub.add_parser(
        "passwd",
        help="set the admin's password (creating user `admin` if there is no user)",
        description="Set the admin's password; with no user yet, creates the user `admin`.",
    )
    passwd.add_argument("--data-dir", help="data directory (default from the config)")
    passwd.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    passwd.set_defaults(func=_auth_command(_passwd))

    tokens = sub.add_parser(
        "tokens",
        help="create, list or revoke API tokens",
        description="API tokens for scripts: `Authorization: Bearer TOKEN` (or `?token=` on "
        "the /ws upgrade). Only a hash is stored; a token is shown once.",
    )
    tokens.add_argument("--data-dir", help="data directory (default from the config)")
    tsub = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create a token and print it")
    tc.add_argument("--user", help="the user it acts as (default: the admin)")
    tc.add_argument("--name", help="a label to recognise it by")
    tsub.add_parser("list", help="list tokens (not their values)")
    tr = tsub.add_parser("revoke", help="revoke a token")
    tr.add_argument("id")
    tokens.set_defaults(func=_auth_command(_tokens))


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
    serve.add_argument(
        "--workers",
        type=int,
        help="processes serving the port (default 1; more need PostgreSQL and Redis)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback address even with no user or token (no authentication)",
    )
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser(
        "chat",
        help="chat with a running server from the terminal",
        description="A terminal client over the WebSocket. Ctrl-C stops the answer.",
    )
    chat.add_argument("--url", help="WebSocket URL (default from the config: ws://HOST:PORT/ws)")
    chat.add_argument("--token", help="API token when the server needs one (default $PRISMD_TOKEN)")
    chat.add_argument("--session", help="resume this session id")
    chat.add_argument("--agent", help="agent id to talk to")
    chat.add_argument("-m", "--message", help="send one message, print the answer and exit")
    chat.add_argument("-q", "--quiet", action="store_true", help="print only the answer")
    chat.add_argument("--show-reasoning", action="store_true", help="print model reasoning")
    chat.set_defaults(func=cmd_chat)

    sessions = sub.add_parser(
        "sessions",
        help="list, show, export or delete stored sessions",
        description="Stored sessions.",
    )
    sessions.add_argument("--data-dir", help="data directory (default from the config)")
    ssub = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    sl = ssub.add_parser("list", help="list sessions, newest first")
    sl.add_argument("--limit", type=int, default=50)
    sl.add_argument("--json", action="store_true")
    ss = ssub.add_parser("show", help="print a session's messages")
    ss.add_argument("id")
    ss.add_argument("--json", action="store_true")
    sd = ssub.add_parser("delete", help="delete a session and everything stored with it")
    sd.add_argument("id")
    se = ssub.add_parser(
        "export", help="write one session as a standalone SQLite file (per-session layout)"
    )
    se.add_argument("id")
    se.add_argument("--out", help="the file to write (default: ./<id>.db)")
    sessions.set_defaults(func=cmd_sessions)

    db = sub.add_parser(
        "db",
        help="PostgreSQL: apply schema migrations, import an embedded install",
        description="The PostgreSQL database of [store] url (PRISMD_DATABASE_URL).",
    )
    dsub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser(
        "migrate", help="apply the missing schema migrations and print the schema version"
    )
    di = dsub.add_parser(
        "import",
        help="move an embedded (SQLite) install into PostgreSQL; running it again moves "
        "nothing twice",
    )
    di.add_argument(
        "--from-sqlite",
        required=True,
        metavar="DATA_DIR",
        help="the embedded install's data directory (stop its server first)",
    )
    db.set_defaults(func=cmd_db)

    agents = sub.add_parser("agents", help="list agents", description="Configured agents.")
    asub = agents.add_subparsers(dest="action", required=True, metavar="ACTION")
    al = asub.add_parser("list", help="list agents (* marks the default)")
    al.add_argument("--json", action="store_true", help="as GET /api/agents answers them")
    agents.set_defaults(func=cmd_agents)
    uploads = sub.add_parser(
        "uploads",
        help="prune uploads no session refers to",
        description="Uploads (POST /api/upload) that no session refers to are removed once "
        "older than uploads.max_age_days; the server does this every prune_interval_s.",
    )
    uploads.add_argument("--data-dir", help="data directory (default from the config)")
    upsub = uploads.add_subparsers(dest="action", required=True, metavar="ACTION")
    prune = upsub.add_parser("prune", help="remove the unused uploads that are old enough")
    prune.add_argument(
        "--older-than-days",
        type=float,
        help="the age (default: uploads.max_age_days from the config)",
    )
    uploads.set_defaults(func=cmd_uploads)
    _add_auth_commands(sub)
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
