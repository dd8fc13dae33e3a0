"""Authentication and isolation, against a real server process, real HTTP and real SQLite.

Users and tokens are made with the `prismd` command line, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from prismd.auth.service import token_hash
from prismd.config import ConfigError, load_settings

from .conftest import ROOT, Client, PrismdServer, free_port, openai_env
from .waiting import wait_for

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22", "carol": "carol-password-333"}


def cli(home: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "PRISMD_", "OLLAMA_"))
    }
    env["PRISMD_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "prismd", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        input=input,
    )


def add_user(home: Path, name: str, *extra: str) -> None:
    out = cli(home, "users", "add", name, "--password-stdin", *extra, input=PASSWORDS[name] + "\n")
    assert out.returncode == 0, out.stderr


def make_token(home: Path, user: str) -> str:
    out = cli(home, "tokens", "create", "--user", user, "--name", f"{user}-script")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@contextlib.contextmanager
def login(url: str, name: str) -> Iterator[httpx.Client]:
    """An HTTP client holding `name`'s login cookie."""
    with httpx.Client(base_url=url, timeout=10) as client:
        resp = client.post("/api/auth/login", json={"username": name, "password": PASSWORDS[name]})
        assert resp.status_code == 200, resp.text
        yield client


def bearer(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {token}"})


def ws_client(url: str, **kwargs: Any) -> Client:
    """conftest's Client, but connecting with headers or a query string."""
    client = Client.__new__(Client)
    client._cm = connect(url, max_size=None, open_timeout=10, **kwargs)
    client.ws = client._cm.__enter__()
    client.connected = client.recv()
    assert client.connected["type"] == "connected"
    return client


def upgrade_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=10, **kwargs)
    return info.value.response.status_code


@pytest.fixture(scope="module")
def users_server(tmp_path_factory, fake_openai):
    """alice (admin, the first user), bob and carol; a token each for bob and carol."""
    home = tmp_path_factory.mktemp("auth")
    for name in ("alice", "bob", "carol"):
        add_user(home, name)
    tokens = {name: make_token(home, name) for name in ("bob", "carol")}
    config = (
        '[server]\ntrusted_proxies = ["127.0.0.1"]\n'  # as behind a proxy on loopback
        '[auth]\nallowed_origins = ["https://chat.example.org"]\n'
    )
    srv = PrismdServer(home, openai_env(fake_openai), config).start()
    srv.tokens = tokens  # type: ignore[attr-defined]
    yield srv
    srv.stop()


# ---------------------------------------------------------------- command line


def test_cli_users_passwords_and_tokens(tmp_path):
    assert cli(tmp_path, "users", "list").returncode == 0
    add_user(tmp_path, "bob")  # the first user is the admin
    add_user(tmp_path, "carol")
    listed = json.loads(cli(tmp_path, "users", "list", "--json").stdout)
    assert [(u["name"], u["admin"]) for u in listed] == [("bob", True), ("carol", False)]
    dup = cli(tmp_path, "users", "add", "bob", "--password-stdin", input="whatever-123\n")
    assert dup.returncode == 1 and "exists" in dup.stderr
    short = cli(tmp_path, "users", "add", "dave", "--password-stdin", input="short\n")
    assert short.returncode == 1 and "8 characters" in short.stderr
    assert cli(tmp_path, "users", "passwd", "carol", "--password-stdin", input="new-pass-99\n")
    # `prismd passwd` sets the admin's password (bob is the admin here).
    out = cli(tmp_path, "passwd", "--password-stdin", input="admin-pass-77\n")
    assert out.returncode == 0 and "bob" in out.stdout

    token = make_token(tmp_path, "carol")
    assert re.fullmatch(r"prismd_[A-Za-z0-9_-]{40,}", token)
    listing = cli(tmp_path, "tokens", "list").stdout
    assert "carol" in listing and "carol-script" in listing and token not in listing
    db = (tmp_path / "data" / "prismd.db").read_bytes()
    assert token.encode() not in db and b"new-pass-99" not in db  # only hashes are stored
    assert b"$argon2id$" in db
    token_id = listing.split()[0]
    assert cli(tmp_path, "tokens", "revoke", token_id).returncode == 0
    assert cli(tmp_path, "tokens", "revoke", token_id).returncode == 1
    assert cli(tmp_path, "users", "remove", "carol").returncode == 0
    assert cli(tmp_path, "users", "remove", "carol").returncode == 1
    assert cli(tmp_path, "tokens", "create", "--user", "nobody").returncode == 1


def test_passwd_creates_admin_when_there_is_no_user(tmp_path):
    out = cli(tmp_path, "passwd", "--password-stdin", input="first-admin-pw\n")
    assert out.returncode == 0, out.stderr
    listed = json.loads(cli(tmp_path, "users", "list", "--json").stdout)
    assert [(u["name"], u["admin"]) for u in listed] == [("admin", True)]


def test_serve_refuses_a_public_address_without_a_password(tmp_path, fake_openai):
    port = str(free_port())
    out = cli(tmp_path, "serve", "--host", "0.0.0.0", "--port", port)
    assert out.returncode == 2
    assert "prismd passwd" in out.stderr and "--insecure" in out.stderr
    # With a user it starts (checked on loopback: 0.0.0.0 includes it).
    add_user(tmp_path, "alice")
    srv = PrismdServer(tmp_path, openai_env(fake_openai))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "PRISMD_", "OLLAMA_"))
    }
    env.update({"PRISMD_HOME": str(tmp_path)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismd", "serve", "--host", "0.0.0.0", "--port", str(srv.port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if srv.get("/api/health").json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("did not start")
        assert srv.get("/api/sessions").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_insecure_starts_without_a_password(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PRISMD_"))}
    env["PRISMD_HOME"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismd", "serve", "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc_insecure = None
    try:
        assert proc.wait(30) == 2
        proc_insecure = subprocess.Popen(
            [
                *(sys.executable, "-m", "prismd", "serve", "--insecure"),
                *("--host", "0.0.0.0", "--port", str(port)),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "insecure.log").open("w"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/auth/status", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("did not start")
        assert body["authRequired"] is False
        assert "no authentication (--insecure)" in (tmp_path / "insecure.log").read_text()
    finally:
        for p in (proc, proc_insecure):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


# ---------------------------------------------------------------- open mode and switching


def test_open_on_loopback_until_a_user_exists(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai))
    status = srv.get("/api/auth/status").json()
    local = {"id": "local", "username": "local", "isInstanceAdmin": True}
    assert status == {
        "authenticated": True,
        "user": {**local, "name": "local", "admin": True},
        "hasPassword": False,
        "requireAuth": False,
        "authRequired": False,
    }
    assert srv.get("/api/auth/check").json() == {"authenticated": True, "user": status["user"]}
    assert srv.get("/api/sessions").status_code == 200
    with srv.client() as c:
        local_sid = c.turn(message="made while open")[0]["sessionId"]
    assert srv.get(f"/api/sessions/{local_sid}").json()["owner_id"] == "local"
    # A user added while the server runs closes it (no restart needed).
    add_user(srv.home, "alice")
    deadline = time.monotonic() + 5
    while srv.get("/api/sessions").status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert srv.get("/api/auth/status").json() == {
        "authenticated": False,
        "hasPassword": True,
        "requireAuth": True,
        "authRequired": True,
    }
    assert srv.get("/api/auth/check").json() == {"authenticated": False}
    health = srv.get("/api/health").json()
    assert set(health) == {"status", "ts"} and health["status"] == "ok"
    # A token created while it runs works at once; revoked, it stops working at once.
    token = make_token(srv.home, "alice")
    add_user(srv.home, "bob")
    # What was made while open belongs to the local owner: the admin sees it, others do not.
    with bearer(srv.url, make_token(srv.home, "bob")) as c:
        assert c.get(f"/api/sessions/{local_sid}").status_code == 404
        assert c.get("/api/sessions").json() == []
    with bearer(srv.url, token) as c:
        assert c.get("/api/sessions").status_code == 200
        assert c.get(f"/api/sessions/{local_sid}").status_code == 200
        token_id = cli(srv.home, "tokens", "list").stdout.split()[0]
        assert cli(srv.home, "tokens", "revoke", token_id).returncode == 0
        assert c.get("/api/sessions").status_code == 401


def test_open_mode_refuses_other_sites(make_server, fake_openai):
    """With no password, a web page from another site may not drive the agent through the
    user's browser: no cross-site WebSocket, no DNS-rebound host name. Local clients (no
    Origin, or the app's own origin) and localhost names are served."""
    config = '[auth]\nallowed_origins = ["http://box.lan:8080"]\n'
    srv = make_server(openai_env(fake_openai), config)
    for origin in (f"http://127.0.0.1:{srv.port}", "http://box.lan:8080"):
        with ws_client(srv.ws_url, additional_headers={"Origin": origin}) as c:
            assert c.turn(message="hello")[-1]["type"] == "context_usage", origin
    for origin in ("https://evil.example", f"http://127.0.0.1:{srv.port + 1}", "null"):
        headers = {"Origin": origin}
        assert upgrade_status(srv.ws_url, additional_headers=headers) == 403, origin

    def get(host: str) -> httpx.Response:
        return httpx.get(f"{srv.url}/api/sessions", headers={"Host": host}, timeout=10)

    for host in ("localhost", f"localhost:{srv.port}", f"[::1]:{srv.port}", "app.localhost"):
        assert get(host).status_code == 200, host
    for host in (f"evil.example:{srv.port}", "rebound.example.com", f"192.168.1.4:{srv.port}"):
        r = get(host)
        assert r.status_code == 403 and r.json()["code"] == "unauthorized", host
        assert "sessions" not in r.json()
    assert get("box.lan:8080").status_code == 200
    # Nothing that changes state is taken from another site's page (a multipart POST needs no
    # CORS preflight); the app's own pages and clients without an Origin are served.
    files = {"file": ("note.txt", b"hello", "text/plain")}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = httpx.post(f"{srv.url}/api/upload", files=files, headers=headers, timeout=10)
        assert r.status_code == 403 and r.json()["code"] == "unauthorized", headers
    for headers in ({"Origin": f"http://127.0.0.1:{srv.port}"}, {}):
        r = httpx.post(f"{srv.url}/api/upload", files=files, headers=headers, timeout=10)
        assert r.status_code == 201, headers


def test_configured_token(make_server, fake_openai):
    token = "a-configured-token-0123456789"
    srv = make_server({**openai_env(fake_openai), "PRISMD_TOKEN": token})
    assert srv.get("/api/sessions").status_code == 401
    with bearer(srv.url, token) as c:
        assert c.get("/api/auth/me").json()["user"]["admin"] is True
        assert c.get("/api/sessions").status_code == 200
    with bearer(srv.url, token + "x") as c:
        assert c.get("/api/sessions").status_code == 401
    with ws_client(f"{srv.ws_url}?token={token}") as c:
        assert c.turn(message="hi")[-1]["type"] == "context_usage"


def test_credentials_are_checked_under_a_root_path(tmp_path):
    """Behind a proxy that mounts prismd under a prefix (uvicorn --root-path), the check
    applies to the path the routes see, not only to paths that start with /api."""
    from starlette.testclient import TestClient

    from prismd.config import load_settings
    from prismd.server.app import create_app

    token = "a-configured-token-0123456789"
    settings = load_settings(env={"PRISMD_HOME": str(tmp_path), "PRISMD_TOKEN": token})
    app = create_app(settings, probe_ollama=False)
    with TestClient(app, root_path="/p") as c:
        for path in ("/p/api/config", "/p/api/sessions", "/api/sessions"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", path
        ok = c.get("/p/api/sessions", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200


# ---------------------------------------------------------------- login sessions


def test_login_cookie_me_logout(users_server):
    srv = users_server
    resp = httpx.post(
        f"{srv.url}/api/auth/login", json={"username": "bob", "password": PASSWORDS["bob"]}
    )
    assert resp.status_code == 200
    bob = {"username": "bob", "isInstanceAdmin": False, "name": "bob", "admin": False}
    body = resp.json()
    assert body == {
        "success": True,
        "sessionId": body["sessionId"],
        "user": {**bob, "id": body["user"]["id"]},
    }
    # The login session's id, not its cookie (which stays HttpOnly).
    assert re.fullmatch(r"[0-9a-f]{32}", body["sessionId"])
    assert body["sessionId"] not in resp.headers["set-cookie"]
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith("prismd_session=")
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "path", "samesite", "max-age"} <= attrs and "secure" not in attrs
    assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
    value = resp.cookies["prismd_session"]
    with httpx.Client(base_url=srv.url, cookies={"prismd_session": value}) as c:
        assert c.get("/api/auth/me").json()["user"]["name"] == "bob"
        assert c.get("/api/auth/status").json()["user"]["name"] == "bob"
        assert c.get("/api/auth/check").json()["user"]["username"] == "bob"
        out = c.post("/api/auth/logout")
        assert out.status_code == 200 and out.json() == {"success": True}
        assert 'prismd_session=""' in out.headers["set-cookie"]
    with httpx.Client(base_url=srv.url, cookies={"prismd_session": value}) as c:
        assert c.get("/api/auth/me").status_code == 401  # the login session is gone
    bad = httpx.post(f"{srv.url}/api/auth/login", json={"username": "bob", "password": "nope"})
    assert bad.status_code == 401 and bad.json()["code"] == "unauthorized"


def test_cookie_is_secure_under_https(users_server):
    # Behind a TLS-terminating proxy on loopback (`server.trusted_proxies`: its
    # X-Forwarded-Proto is believed; test_security_auth.py checks that nothing is by default).
    resp = httpx.post(
        f"{users_server.url}/api/auth/login",
        json={"username": "carol", "password": PASSWORDS["carol"]},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert resp.status_code == 200
    assert "secure" in {a.strip().lower() for a in resp.headers["set-cookie"].split(";")}


def test_terminal_chat_with_a_token(users_server):
    srv = users_server
    out = cli(srv.home, "chat", "--url", srv.ws_url, "-q", "-m", "hello")
    assert out.returncode == 1 and "HTTP 401" in out.stderr and "--token" in out.stderr
    token = srv.tokens["bob"]
    out = cli(srv.home, "chat", "--url", srv.ws_url, "--token", token, "-q", "-m", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "You said: hello"


def test_login_sessions_survive_a_restart_and_expire(make_server, fake_openai):
    """A login outlives a restart and ends with its TTL: the later servers judge logins by a
    clock that runs ahead (PRISMD_TEST_CLOCK_OFFSET_S), so the test waits out no TTL."""
    ttl_s = 3600
    srv = make_server(openai_env(fake_openai), "[auth]\nsession_ttl_hours = 1\n", start=False)
    add_user(srv.home, "alice")
    srv.start()

    def stored_logins() -> list[str]:
        db = sqlite3.connect(f"file:{srv.data_dir / 'prismd.db'}?mode=ro", uri=True)
        try:
            return [row[0] for row in db.execute("SELECT token_hash FROM login_sessions")]
        finally:
            db.close()

    with login(srv.url, "alice") as c:
        key = token_hash(c.cookies["prismd_session"])
        assert stored_logins() == [key]
        # Restarted half-way through the login's life: it still works.
        srv.env["PRISMD_TEST_CLOCK_OFFSET_S"] = str(ttl_s / 2)
        srv.restart()
        assert c.get("/api/auth/me").json()["user"]["name"] == "alice"
        # Restarted past its end: refused, and deleted.
        srv.env["PRISMD_TEST_CLOCK_OFFSET_S"] = str(ttl_s + 1)
        srv.restart()
        assert "judged 3601 s ahead" in srv.log.read_text()  # the server says so
        assert c.get("/api/auth/me").status_code == 401
        wait_for(lambda: key not in stored_logins(), "the expired login to be deleted")
    # A login made by the clock that runs ahead is judged by it too: it works.
    with login(srv.url, "alice") as c:
        assert c.get("/api/auth/me").json()["user"]["name"] == "alice"


def test_the_test_clock_only_runs_ahead(tmp_path):
    for bad in ("-1", "nan", "inf", "soon"):
        env = {"PRISMD_HOME": str(tmp_path), "PRISMD_TEST_CLOCK_OFFSET_S": bad}
        with pytest.raises(ConfigError, match="PRISMD_TEST_CLOCK_OFFSET_S"):
            load_settings(env=env)
    env = {"PRISMD_HOME": str(tmp_path)}
    assert load_settings(env=env).test_clock_offset_s == 0
    env["PRISMD_TEST_CLOCK_OFFSET_S"] = "90.5"
    assert load_settings(env=env).test_clock_offset_s == 90.5


def test_failed_logins_are_rate_limited(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai), start=False)
    add_user(srv.home, "alice")
    add_user(srv.home, "bob")
    srv.start()

    def attempt(name: str, password: str) -> httpx.Response:
        return httpx.post(
            f"{srv.url}/api/auth/login", json={"username": name, "password": password}
        )

    for _ in range(5):
        assert attempt("alice", "wrong").status_code == 401
    limited = attempt("alice", PASSWORDS["alice"])  # even the right password, for now
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # The limit is per client address too: this address has used up its failures.
    assert attempt("bob", PASSWORDS["bob"]).status_code == 429


def test_failed_logins_sent_at_once_are_limited_too(make_server, fake_openai):
    """Attempts count when they arrive, not when their (slow) check ends: 20 guesses sent
    together get no more than the limit of checks."""
    from concurrent.futures import ThreadPoolExecutor

    srv = make_server(openai_env(fake_openai), start=False)
    add_user(srv.home, "alice")
    srv.start()

    def guess(i: int) -> int:
        body = {"username": "alice", "password": f"guess{i}"}
        return httpx.post(f"{srv.url}/api/auth/login", json=body, timeout=30).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(guess, range(20)))
    assert codes.count(401) <= 5 and codes.count(429) >= 15, codes
    assert set(codes) <= {401, 429}, codes


# ---------------------------------------------------------------- what needs credentials


def test_everything_needs_credentials(users_server):
    srv = users_server
    for path in ("/api/sessions", "/api/agents", "/api/config", "/api/auth/me", "/metrics"):
        resp = srv.get(path)
        assert resp.status_code == 401, path
        assert resp.json()["code"] == "unauthorized"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    health = srv.get("/api/health").json()
    assert set(health) == {"status", "ts"} and health["status"] == "ok"
    assert upgrade_status(srv.ws_url) == 401
    assert upgrade_status(f"{srv.ws_url}?token=wrong") == 401
    with bearer(srv.url, srv.tokens["bob"]) as c:
        assert c.get("/api/health").json()["version"]
        assert c.get("/metrics").status_code == 403  # admins only: labels name others' agents
    with login(srv.url, "alice") as admin:
        assert "prismd_turns_total" in admin.get("/metrics").text


def test_websocket_credentials_and_origin(users_server):
    srv = users_server
    token = srv.tokens["bob"]
    with ws_client(f"{srv.ws_url}?token={token}") as c:
        assert c.turn(message="by query token")[-1]["type"] == "context_usage"
    with ws_client(srv.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.turn(message="by bearer")[-1]["type"] == "context_usage"
    with login(srv.url, "bob") as http:
        cookie = f"prismd_session={http.cookies['prismd_session']}"
        own = f"http://127.0.0.1:{srv.port}"
        for origin in (own, "https://chat.example.org"):
            headers = {"Cookie": cookie, "Origin": origin}
            with ws_client(srv.ws_url, additional_headers=headers) as c:
                assert c.turn(message="by cookie")[-1]["type"] == "context_usage"
        for origin in ("https://evil.example", f"http://127.0.0.1:{srv.port + 1}", "null"):
            headers = {"Cookie": cookie, "Origin": origin}
            assert upgrade_status(srv.ws_url, additional_headers=headers) == 403, origin
        # A token is not a cookie: any Origin may use it (a script sets it deliberately).
        headers = {"Authorization": f"Bearer {token}", "Origin": "https://evil.example"}
        with ws_client(srv.ws_url, additional_headers=headers):
            pass


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:3000", "127.0.0.1:3000", True),
        ("HTTP://LOCALHOST:3000", "localhost:3000", True),
        ("http://localhost", "localhost:80", True),
        ("https://chat.example", "chat.example", True),
        ("http://[::1]:3000", "[::1]:3000", True),
        ("https://chat.example.org/", "127.0.0.1:3000", True),  # configured
        ("http://127.0.0.1:3001", "127.0.0.1:3000", False),
        ("http://evil.example", "127.0.0.1:3000", False),
        ("http://127.0.0.1:3000.evil.example", "127.0.0.1:3000", False),
        ("null", "127.0.0.1:3000", False),
        ("file://", "127.0.0.1:3000", False),
    ],
)
def test_origin_rule(origin, host, allowed):
    from prismd.auth.middleware import _origin_allowed

    assert _origin_allowed(origin, host, ["https://chat.example.org"]) is allowed


# ---------------------------------------------------------------- isolation


def test_sessions_belong_to_their_user(users_server):
    srv = users_server
    bob_t, carol_t = srv.tokens["bob"], srv.tokens["carol"]
    with ws_client(f"{srv.ws_url}?token={bob_t}") as bob:
        frames = bob.turn(message="bob's secret")
        sid = frames[0]["sessionId"]
    with bearer(srv.url, carol_t) as carol:
        listed = carol.get("/api/sessions?status=all&limit=500").json()
        assert sid not in [s["id"] for s in listed]
        assert carol.get(f"/api/sessions/{sid}").status_code == 404
    with ws_client(f"{srv.ws_url}?token={carol_t}") as carol_ws:
        carol_ws.send(type="resume", sessionId=sid, lastSeq=0)
        err = carol_ws.recv()
        assert err["type"] == "error" and err["code"] == "session_not_found"
        carol_ws.send(type="chat", sessionId=sid, message="let me in")
        err = carol_ws.recv()
        assert err["type"] == "error" and err["code"] == "session_not_found"
        assert carol_ws.nothing_pending()
    with bearer(srv.url, bob_t) as bob_http:
        body = bob_http.get(f"/api/sessions/{sid}/messages").json()
        assert [m["content"] for m in body][0] == "bob's secret"
        assert len(body) == 2  # carol's chat did not reach it
        assert bob_http.get(f"/api/sessions/{sid}").json()["owner_id"] != "local"
    with login(srv.url, "alice") as admin:  # admins see and resume everyone's
        listed = admin.get("/api/sessions?limit=500").json()
        assert sid in [s["id"] for s in listed]
        assert admin.post(f"/api/sessions/{sid}/resume").status_code == 200
        cookie = f"prismd_session={admin.cookies['prismd_session']}"
    with ws_client(srv.ws_url, additional_headers={"Cookie": cookie}) as admin_ws:
        admin_ws.send(type="resume", sessionId=sid)
        assert admin_ws.recv()["type"] == "session"


def test_only_admins_read_the_config(users_server):
    srv = users_server
    with bearer(srv.url, srv.tokens["bob"]) as bob:
        r = bob.get("/api/config")
        assert r.status_code == 403 and set(r.json()) == {"error", "code"}
        # Nor try provider credentials through the server.
        trial = bob.post("/api/providers/openai/models", json={"apiKey": "k", "baseUrl": "x"})
        assert trial.status_code == 403
    with login(srv.url, "alice") as admin:
        assert admin.get("/api/config").json()["settings"]["auth"]["allowed_origins"]


def test_a_deleted_sessions_id_reused_by_another_user_reaches_only_them(users_server):
    """Clients choose session ids, so one can be taken again after a delete: a connection
    still bound to the deleted session is told it ended and gets nothing of the new one."""
    srv = users_server
    bob_t, carol_t = srv.tokens["bob"], srv.tokens["carol"]
    sid = "shared-name-1"
    with ws_client(f"{srv.ws_url}?token={bob_t}") as bob:
        assert bob.turn(message="bob first", sessionId=sid)[-1]["type"] == "context_usage"
        with bearer(srv.url, bob_t) as bob_http:
            assert bob_http.delete(f"/api/sessions/{sid}").json() == {"ok": True}
        ended = bob.recv()
        assert ended == {"type": "session_ended", "sessionId": sid, "reason": "deleted"}
        with ws_client(f"{srv.ws_url}?token={carol_t}") as carol:
            frames = carol.turn(message="carol's secret", sessionId=sid)
            assert frames[-1]["type"] == "context_usage"
            assert frames[0]["sessionId"] == sid
        assert bob.nothing_pending(), "bob's socket received carol's session"
        # Bob's voice_state no longer reaches anyone: he is bound to nothing.
        bob.send(type="voice_state", speaking=True)
        assert bob.recv()["code"] == "session_not_found"
    with bearer(srv.url, bob_t) as bob_http:
        assert bob_http.get(f"/api/sessions/{sid}").status_code == 404


def test_uploads_and_agents_belong_to_their_user(users_server):
    srv = users_server
    with bearer(srv.url, srv.tokens["bob"]) as bob:
        up = bob.post("/api/upload", files={"file": ("secret.txt", b"bob only", "text/plain")})
        assert up.status_code == 201
        agent = {"id": "bobs-agent", "name": "Bob's", "systemPrompt": "Be Bob."}
        assert bob.post("/api/agents", json=agent).status_code == 201
    with bearer(srv.url, srv.tokens["carol"]) as carol:
        assert carol.get("/api/agents/bobs-agent").status_code == 404
        assert "bobs-agent" not in carol.get("/api/agents").text
        assert carol.post("/api/agents/bobs-agent/select").status_code == 404
    with ws_client(f"{srv.ws_url}?token={srv.tokens['carol']}") as c:
        c.send(type="chat", message="x", files=[{"fileId": up.json()["id"]}])
        err = c.recv()
        assert err["code"] == "invalid_message" and err["details"]["field"] == "files.0.fileId"
        c.send(type="chat", message="x", agentId="bobs-agent")
        assert c.recv()["code"] == "agent_not_found"
        c.send(type="select_agent", agentId="bobs-agent")
        assert c.recv()["code"] == "agent_not_found"


# ---------------------------------------------------------------- the sweep


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), "x"), path)


def _probe(client: httpx.Client, method: str, path: str) -> httpx.Response:
    kwargs: dict[str, Any] = {}
    if method in ("post", "patch", "put"):
        if path == "/api/upload":
            kwargs["files"] = {"file": ("probe.txt", b"probe", "text/plain")}
        elif path.startswith("/api/agents") and method == "post" and path == "/api/agents":
            kwargs["json"] = {"id": f"probe-{time.monotonic_ns()}", "name": "probe"}
        elif path == "/api/config":
            kwargs["json"] = {"default_agent": "assistant"}
        else:  # a valid body, so that only the ownership check can refuse
            kwargs["json"] = {"name": "probe"}
    return client.request(method.upper(), path, **kwargs)


def test_sweep_every_route_without_and_with_another_users_credentials(users_server):
    """Every route of the OpenAPI schema: without credentials 401 (bar the three open ones);
    with another user's credentials, on that user's objects, 401/403/404 and none of their
    data; on collections, nothing of theirs listed."""
    srv = users_server
    victim, attacker = srv.tokens["bob"], srv.tokens["carol"]
    with ws_client(f"{srv.ws_url}?token={victim}") as c:
        frames = c.turn(message="sweep victim text")
    sid = frames[0]["sessionId"]
    with bearer(srv.url, victim) as bob:
        messages = bob.get(f"/api/sessions/{sid}/messages").json()
        upload = bob.post("/api/upload", files={"file": ("v.txt", b"victim file", "text/plain")})
        bob.post("/api/agents", json={"id": "victim-agent", "name": "Victim"})
        bob_id = bob.get("/api/auth/me").json()["user"]["id"]
        token_id = bob.get("/api/account/tokens").json()[0]["id"]
    bob_login = httpx.Client(base_url=srv.url, timeout=10)
    logged = bob_login.post(
        "/api/auth/login", json={"username": "bob", "password": PASSWORDS["bob"]}
    )
    login_id = logged.json()["sessionId"]
    ids = {
        "session_id": sid,
        "message_id": messages[0]["id"],
        "agent_id": "victim-agent",
        "upload_id": upload.json()["id"],
        "file_id": upload.json()["id"],
        "kind": "openai",
        "user_id": bob_id,
        "token_id": token_id,
        "login_id": login_id,
    }
    secrets = [
        sid,
        messages[0]["id"],
        "victim-agent",
        upload.json()["id"],
        "sweep victim text",
        bob_id,
        token_id,
        login_id,
    ]
    schema = srv.get("/openapi.json").json()
    open_paths = {
        "/api/auth/login",
        "/api/auth/logout",
        "/api/auth/status",
        "/api/auth/check",
        "/api/health",
    }
    checked = 0
    anon = httpx.Client(base_url=srv.url, timeout=10)
    other = bearer(srv.url, attacker)
    try:
        for path, item in schema["paths"].items():
            for method in item:
                url = _fill(path, ids)
                resp = _probe(anon, method, url)
                if path in open_paths or not path.startswith(("/api/", "/metrics")):
                    assert not any(s in resp.text for s in secrets), (method, path)
                else:
                    assert resp.status_code == 401, (method, path, resp.status_code)
                resp = _probe(other, method, url)
                # (An error may repeat the id the caller sent; nothing else of the victim's.)
                leaked = [s for s in secrets if s in resp.text and s not in url]
                assert not leaked, (method, path, leaked)
                if "{" in path and path != "/api/providers/{kind}/models":
                    assert resp.status_code in (401, 403, 404), (method, path, resp.status_code)
                checked += 1
    finally:
        anon.close()
        other.close()
    assert checked >= 30
    # And nothing of the victim's was changed or removed by the attempts.
    with bearer(srv.url, victim) as bob:
        after = bob.get(f"/api/sessions/{sid}/messages").json()
        assert [m["id"] for m in after] == [m["id"] for m in messages]
        assert bob.get(f"/api/sessions/{sid}").json()["name"] == ""
        assert bob.get("/api/agents/victim-agent").status_code == 200
        assert bob.get(f"/api/uploads/{upload.json()['id']}").content == b"victim file"
    # Bob's login session, token and password were left alone (his token just worked).
    assert bob_login.get("/api/auth/me").json()["user"]["name"] == "bob"
    bob_login.close()
    with login(srv.url, "bob"):
        pass
    with login(srv.url, "alice") as admin:  # PATCH /api/config was refused to carol
        assert admin.get("/api/config").json()["defaultAgent"] == "assistant"
