"""Security of credentials, cross-site requests, proxies, agents, secrets and slow clients
(issue 11, items 4, 5, 8, 10, 11, 14, 15, 17), against real server processes.

Users and tokens are made, changed and removed with the `prismd` command line in another
process while the server runs, as an operator would; what the server must notice is that.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from prismd.testing.fake_models import FakeModelServer, Reply

from .conftest import Client, PrismdServer, free_port, openai_env
from .test_abuse import RawWS
from .test_auth import bearer, cli, upgrade_status, ws_client

PASSWORD = "correct-horse-battery-9"


def add_user(home: Path, name: str, password: str = PASSWORD, *extra: str) -> None:
    out = cli(home, "users", "add", name, "--password-stdin", *extra, input=password + "\n")
    assert out.returncode == 0, out.stderr


def token_for(home: Path, user: str, label: str) -> tuple[str, str]:
    """A new API token of `user`: (its id, the token)."""
    out = cli(home, "tokens", "create", "--user", user, "--name", label)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    listing = cli(home, "tokens", "list").stdout.splitlines()
    token_id = next(line.split()[0] for line in listing if f" {label} " in line)
    return token_id, token


def log_in(url: str, name: str, password: str = PASSWORD, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/auth/login",
        json={"username": name, "password": password},
        headers=headers,
        timeout=30,
    )


def cookie_of(url: str, name: str) -> str:
    resp = log_in(url, name)
    assert resp.status_code == 200, resp.text
    return str(resp.cookies["prismd_session"])


def cookie_ws(srv: PrismdServer, cookie: str) -> Client:
    return ws_client(srv.ws_url, additional_headers={"Cookie": f"prismd_session={cookie}"})


def token_ws(srv: PrismdServer, token: str) -> Client:
    return ws_client(f"{srv.ws_url}?token={token}")


def alive(c: Client) -> bool:
    c.send(type="ping")
    return c.recv() == {"type": "pong"}


def revoked(c: Client, timeout: float = 15) -> dict[str, Any]:
    """A revoked socket's end: frames (session events of a running turn may come first), the
    last one an `error` `unauthorized`, then the close with code 4001. Returns that error."""
    frames = []
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(c.recv(timeout=max(0.01, deadline - time.monotonic())))
    assert frames, "closed without a last error frame"
    last = frames[-1]
    assert last["type"] == "error" and last["code"] == "unauthorized", frames[-3:]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, closed.value
    return last


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeModelServer]:
    with FakeModelServer("openai") as f:
        yield f


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, fake: FakeModelServer) -> Iterator[PrismdServer]:
    """alice (admin), bob and carol; behind a proxy on loopback; one extra allowed origin."""
    home = tmp_path_factory.mktemp("security")
    for name in ("alice", "bob", "carol"):
        add_user(home, name)
    config = (
        '[server]\ntrusted_proxies = ["127.0.0.1"]\n'
        '[auth]\nallowed_origins = ["https://chat.example.org"]\nlogin_delay_max_s = 2\n'
    )
    server = PrismdServer(home, openai_env(fake), config).start()
    yield server
    server.stop()


# ------------------------------------------------------------------ 4. credentials are live


def test_logout_closes_the_sockets_of_that_login_at_once(srv):
    add_user(srv.home, "dave")
    first, second = cookie_of(srv.url, "dave"), cookie_of(srv.url, "dave")
    _, token = token_for(srv.home, "dave", "dave-script")
    with (
        cookie_ws(srv, first) as a,
        cookie_ws(srv, first) as b,
        cookie_ws(srv, second) as other_login,
        token_ws(srv, token) as script,
    ):
        assert alive(a) and alive(b)
        out = httpx.post(f"{srv.url}/api/auth/logout", cookies={"prismd_session": first})
        assert out.status_code == 200
        for c in (a, b):
            assert "logged out" in revoked(c)["error"]
        # Another login of the same user, and the user's token, are not that login.
        assert alive(other_login) and alive(script)


def test_a_token_revoked_by_the_cli_closes_its_sockets(srv):
    add_user(srv.home, "erin")
    revoked_id, token = token_for(srv.home, "erin", "erin-old")
    _, kept = token_for(srv.home, "erin", "erin-new")
    with token_ws(srv, token) as c, token_ws(srv, kept) as other:
        assert c.turn(message="before")[-1]["type"] == "context_usage"
        out = cli(srv.home, "tokens", "revoke", revoked_id)  # another process
        assert out.returncode == 0, out.stderr
        assert "revoked" in revoked(c)["error"]
        with pytest.raises(ConnectionClosed):
            c.send(type="chat", message="after")
        assert alive(other)
    with bearer(srv.url, token) as h:
        assert h.get("/api/sessions").status_code == 401


def test_a_password_changed_by_the_cli_closes_the_login_sockets(srv):
    add_user(srv.home, "frank")
    cookie = cookie_of(srv.url, "frank")
    _, token = token_for(srv.home, "frank", "frank-script")
    with cookie_ws(srv, cookie) as browser, token_ws(srv, token) as script:
        out = cli(srv.home, "users", "passwd", "frank", "--password-stdin", input="new-pass-1234\n")
        assert out.returncode == 0, out.stderr
        assert "login session ended" in revoked(browser)["error"]
        # A password change ends the user's logins, not their tokens (as over REST).
        assert alive(script)
    assert log_in(srv.url, "frank", "new-pass-1234").status_code == 200


def _notes(srv: PrismdServer, text: str) -> int:
    """Memory notes of this text in the server's store (its SQLite database)."""
    db = sqlite3.connect(f"file:{srv.data_dir / 'prismd.db'}?mode=ro", uri=True)
    try:
        count = db.execute("SELECT COUNT(*) FROM memory_notes WHERE text=?", (text,))
        return int(count.fetchone()[0])
    finally:
        db.close()


def _note_call(text: str) -> list[dict[str, Any]]:
    return [{"id": "call_1", "name": "memory_note", "arguments": json.dumps({"text": text})}]


def test_a_removed_users_sockets_close_and_can_no_longer_save_a_memory_note(srv, fake):
    add_user(srv.home, "grace")
    cookie = cookie_of(srv.url, "grace")
    _, token = token_for(srv.home, "grace", "grace-script")
    fake.script(Reply(tool_calls=_note_call("grace note one"), times=1), match="remember one")
    # A turn that would save a note after ~20 s of streaming: the removal comes first.
    slow = Reply(
        text=["hmm "] * 400, delay_s=0.05, tool_calls=_note_call("grace note two"), times=1
    )
    fake.script(slow, match="remember two")
    with cookie_ws(srv, cookie) as browser, token_ws(srv, token) as script:
        # The socket can save notes while grace exists (so the refusal below means something).
        frames = script.turn(message="remember one")
        assert frames[-1]["type"] == "context_usage" and _notes(srv, "grace note one") == 1
        script.send(type="chat", message="remember two")
        assert script.until("chunk")[-1]["type"] == "chunk"  # the slow turn streams
        sid = frames[0]["sessionId"]
        out = cli(srv.home, "users", "remove", "grace")
        assert out.returncode == 0, out.stderr
        for c in (browser, script):
            assert revoked(c)["error"] == "This user was removed"
        with pytest.raises(ConnectionClosed):
            script.send(type="chat", message="remember one")
    admin = cookie_of(srv.url, "alice")
    with httpx.Client(base_url=srv.url, cookies={"prismd_session": admin}, timeout=10) as h:

        def turn_over() -> bool:
            return h.get(f"/api/sessions/{sid}").json()["turn_running"] is False

        deadline = time.monotonic() + 30
        while not turn_over():  # the removal stopped grace's running turn
            assert time.monotonic() < deadline, "the removed user's turn kept running"
            time.sleep(0.1)
        messages = h.get(f"/api/sessions/{sid}/messages").json()
    assert "hmm" in messages[-1]["content"] and messages[-1]["status"] != "complete"
    assert _notes(srv, "grace note two") == 0
    with bearer(srv.url, token) as h:
        assert h.get("/api/sessions").status_code == 401


def test_adding_the_first_user_closes_the_open_modes_sockets(make_server, fake_openai):
    server = make_server(openai_env(fake_openai))
    with server.client() as c:
        assert alive(c)
        add_user(server.home, "owner")
        assert "Credentials are now required" in revoked(c)["error"]
    assert upgrade_status(server.ws_url) == 401


def test_a_revoked_socket_that_never_reads_is_still_cut(srv):
    """The last frames of a revoked socket cannot keep it open: a client that reads nothing
    is cut too (the connection count goes back down)."""
    add_user(srv.home, "heidi")
    token_id, token = token_for(srv.home, "heidi", "heidi-stuck")
    admin = cookie_of(srv.url, "alice")

    def connections() -> int:
        health = httpx.get(
            f"{srv.url}/api/health", cookies={"prismd_session": admin}, timeout=10
        ).json()
        return int(health["connections"])

    before = connections()
    # A raw socket with the token in its URL, reading nothing after the handshake.
    sock = _raw_ws(srv.port, f"/ws?token={token}")
    try:
        deadline = time.monotonic() + 10
        while connections() != before + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert cli(srv.home, "tokens", "revoke", token_id).returncode == 0
        deadline = time.monotonic() + 15
        while connections() != before:
            assert time.monotonic() < deadline, "the revoked socket stayed open"
            time.sleep(0.1)
    finally:
        sock.close()


def _raw_ws(port: int, path: str) -> Any:
    import base64
    import os
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


# ------------------------------------------------------------------ 5. CSRF in every mode


def _upload(url: str, **kwargs: Any) -> httpx.Response:
    files = {"file": ("note.txt", b"hello", "text/plain")}
    return httpx.post(f"{url}/api/upload", files=files, timeout=10, **kwargs)


def test_cross_site_and_same_site_pages_cannot_act_with_the_login_cookie(srv):
    cookie = cookie_of(srv.url, "bob")
    jar = {"prismd_session": cookie}
    own = f"http://127.0.0.1:{srv.port}"
    foreign = [
        {"Origin": "https://evil.example"},  # another site
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://127.0.0.1:{srv.port + 1}"},  # same site: another port of the host
        {"Origin": f"http://localhost:{srv.port}"},  # another name for the host
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
    ]
    for headers in foreign:
        r = _upload(srv.url, cookies=jar, headers=headers)
        assert r.status_code == 403 and r.json()["code"] == "unauthorized", headers
    # A sibling subdomain is refused too: the server's own origin is what its Host says.
    sibling = {"Host": "app.example.test", "Origin": "http://other.example.test"}
    assert _upload(srv.url, cookies=jar, headers=sibling).status_code == 403
    same = {"Host": "app.example.test", "Origin": "http://app.example.test"}
    assert _upload(srv.url, cookies=jar, headers=same).status_code == 201
    for headers in (
        {"Origin": own},
        {"Origin": "https://chat.example.org"},  # auth.allowed_origins
        {"Origin": "https://chat.example.org", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-origin"},
        {},  # no Origin: not a page (curl with a cookie)
    ):
        assert _upload(srv.url, cookies=jar, headers=headers).status_code == 201, headers

    # The routes the attack used: archive/rename (PATCH), delete, retry; nothing changes.
    with token_ws(srv, token_for(srv.home, "bob", "bob-csrf")[1]) as c:
        sid = c.turn(message="keep me")[0]["sessionId"]
    evil = {"Origin": "https://evil.example"}
    with httpx.Client(base_url=srv.url, cookies=jar, headers=evil, timeout=10) as page:
        assert page.patch(f"/api/sessions/{sid}", json={"name": "pwned"}).status_code == 403
        assert page.post(f"/api/sessions/{sid}/retry").status_code == 403
        assert page.delete(f"/api/sessions/{sid}").status_code == 403
        assert page.post("/api/auth/logout").status_code == 403
        assert page.get("/api/sessions").status_code == 200  # reading is not refused
    with httpx.Client(base_url=srv.url, cookies=jar, timeout=10) as h:
        body = h.get(f"/api/sessions/{sid}").json()
        assert body["name"] == "" and body["status"] == "active"
        assert len(h.get(f"/api/sessions/{sid}/messages").json()) == 2
        assert h.get("/api/auth/me").status_code == 200  # the cross-site logout did nothing
    # Logging a visitor in from another site (login CSRF) is refused as well.
    assert log_in(srv.url, "bob", Origin="https://evil.example").status_code == 403


def test_cookie_websocket_upgrades_from_another_origin_are_refused(srv):
    cookie = f"prismd_session={cookie_of(srv.url, 'bob')}"
    for headers in (
        {"Origin": f"http://127.0.0.1:{srv.port + 1}"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        status = upgrade_status(srv.ws_url, additional_headers={"Cookie": cookie, **headers})
        assert status == 403, headers
    with ws_client(srv.ws_url, additional_headers={"Cookie": cookie}) as c:
        assert alive(c)


def test_bearer_tokens_without_cookies_are_not_checked_for_origin(srv):
    _, token = token_for(srv.home, "bob", "bob-origin")
    auth = {"Authorization": f"Bearer {token}"}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "same-site"}):
        assert _upload(srv.url, headers={**auth, **headers}).status_code == 201, headers
    with token_ws(srv, token) as c:  # ?token= on the upgrade, any Origin
        assert alive(c)
    # With the cookie as well, it is what a browser would send: checked.
    jar = {"prismd_session": cookie_of(srv.url, "bob")}
    evil = {**auth, "Origin": "https://evil.example"}
    assert _upload(srv.url, cookies=jar, headers=evil).status_code == 403


def test_open_mode_refuses_same_site_pages_too(make_server, fake_openai):
    server = make_server(openai_env(fake_openai))
    for headers in (
        {"Origin": f"http://127.0.0.1:{server.port + 1}"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        assert _upload(server.url, headers=headers).status_code == 403, headers
    assert _upload(server.url).status_code == 201


# ------------------------------------------------------------------ 8. proxies and login limits


def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(make_server, fake_openai):
    server = make_server(openai_env(fake_openai), start=False)
    add_user(server.home, "ivan")
    server.start()
    # Wrong passwords of unknown names, each "from" another address: the per-address limit
    # still counts them all against 127.0.0.1.
    codes = [
        log_in(server.url, f"nobody{i}", "x", **{"X-Forwarded-For": f"203.0.113.{i}"}).status_code
        for i in range(7)
    ]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429], codes
    # X-Forwarded-Proto is not believed either: the cookie is not marked Secure.
    fresh = make_server(openai_env(fake_openai), start=False)
    add_user(fresh.home, "ivan")
    fresh.start()
    resp = log_in(fresh.url, "ivan", **{"X-Forwarded-Proto": "https"})
    assert resp.status_code == 200
    assert "secure" not in {a.strip().lower() for a in resp.headers["set-cookie"].split(";")}


def test_a_trusted_proxy_forwards_the_client_address(srv):
    # srv trusts 127.0.0.1: each forwarded address has its own per-address count.
    for i in range(8):
        headers = {"X-Forwarded-For": f"198.51.100.{i}"}
        assert log_in(srv.url, f"ghost{i}", "x", **headers).status_code == 401


def test_a_guessed_password_slows_the_attacker_not_the_owner(srv):
    """Someone guesses bob's password from many addresses: after a few failures each guess
    waits (1 s, doubling up to `login_delay_max_s`, 2 s here); bob himself is answered with
    that short wait at worst, then logs in: no minute-long lockout."""
    codes = []
    retry_after = []
    for i in range(12):
        r = log_in(srv.url, "bob", f"guess-{i}", **{"X-Forwarded-For": f"192.0.2.{i}"})
        codes.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(int(r.headers["Retry-After"]))
            assert r.json()["code"] == "rate_limited"
    assert set(codes) <= {401, 429} and codes[:5] == [401] * 5, codes
    assert codes.count(429) >= 5, codes  # guesses sent at once are refused, unchecked
    assert retry_after and max(retry_after) <= 2, retry_after
    # The owner, from his own address: a short wait at most, never refused for long.
    deadline = time.monotonic() + 30
    while True:
        r = log_in(srv.url, "bob", **{"X-Forwarded-For": "198.18.0.1"})
        if r.status_code == 200:
            break
        assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 2, r.text
        assert time.monotonic() < deadline, "the owner could not log in"
        time.sleep(0.2)
    # A success forgets the name's failures: the next wrong guess is checked (401), not held.
    assert log_in(srv.url, "bob", "wrong", **{"X-Forwarded-For": "192.0.2.99"}).status_code == 401


# ------------------------------------------------------------------ 10. agent ids are per user


def test_agent_ids_are_per_user(srv, fake):
    _, bob_t = token_for(srv.home, "bob", "bob-agents")
    _, carol_t = token_for(srv.home, "carol", "carol-agents")
    mine = {"id": "helper", "name": "Bob's helper", "systemPrompt": "You are BOB-HELPER."}
    theirs = {"id": "helper", "name": "Carol's helper", "systemPrompt": "You are CAROL-HELPER."}
    with bearer(srv.url, bob_t) as bob, bearer(srv.url, carol_t) as carol:
        first = bob.post("/api/agents", json=mine)
        assert first.status_code == 201, first.text
        # carol cannot tell that bob has a "helper": her create answers as for a free id.
        second = carol.post("/api/agents", json=theirs)
        assert second.status_code == 201, second.text
        assert set(second.json()) == set(first.json())
        assert second.json()["name"] == "Carol's helper"
        assert carol.post("/api/agents", json=theirs).status_code == 409  # her own: taken
        taken = carol.post("/api/agents", json={"id": "assistant", "name": "x"})
        assert taken.status_code == 409  # a config agent's id is everyone's
        assert carol.get("/api/agents/helper").json()["systemPrompt"] == "You are CAROL-HELPER."
        assert bob.get("/api/agents/helper").json()["systemPrompt"] == "You are BOB-HELPER."
        listed = [a for a in carol.get("/api/agents").json() if a["id"] == "helper"]
        assert len(listed) == 1 and listed[0]["name"] == "Carol's helper"
    for token, prompt in ((bob_t, "BOB-HELPER"), (carol_t, "CAROL-HELPER")):
        with token_ws(srv, token) as c:
            frames = c.turn(message="who are you", agentId="helper")
            assert frames[0]["agentName"].endswith("helper")
        assert prompt in fake.requests[-1]["messages"][0]["content"]
    admin = cookie_of(srv.url, "alice")
    with httpx.Client(base_url=srv.url, cookies={"prismd_session": admin}, timeout=10) as h:
        both = [a for a in h.get("/api/agents").json() if a["id"] == "helper"]
        assert len(both) == 2 and len({a["ownerId"] for a in both}) == 2
    with bearer(srv.url, carol_t) as carol:
        assert carol.delete("/api/agents/helper").status_code == 200
        assert carol.get("/api/agents/helper").status_code == 404
    with bearer(srv.url, bob_t) as bob:  # bob's is untouched, and survives a restart
        assert bob.get("/api/agents/helper").json()["name"] == "Bob's helper"
        assert bob.patch("/api/agents/helper", json={"name": "Bob's"}).status_code == 200


def test_agents_of_an_older_database_keep_their_owners(tmp_path):
    """The agents table used to be keyed by id alone: it is rebuilt keyed by (owner, id)."""
    import asyncio

    from prismd.store.sqlite import SqliteStore

    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "prismd.db")
    db.executescript(
        """
        CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL,
          description TEXT NOT NULL DEFAULT '', provider TEXT, model TEXT,
          system_prompt TEXT NOT NULL DEFAULT '', temperature REAL,
          tools TEXT NOT NULL DEFAULT '[]', builtin INTEGER NOT NULL DEFAULT 0,
          source TEXT NOT NULL DEFAULT 'config', owner_id TEXT);
        INSERT INTO agents (id, name, source, owner_id) VALUES ('mine', 'Mine', 'user', 'user_1');
        INSERT INTO agents (id, name, source, owner_id) VALUES ('old', 'Old', 'user', NULL);
        INSERT INTO agents (id, name, source) VALUES ('assistant', 'Assistant', 'config');
        """
    )
    db.commit()
    db.close()

    async def main() -> None:
        store = SqliteStore(data)
        await store.open()
        try:
            rows = {r["id"]: r["owner_id"] for r in await store.list_custom_agents()}
            assert rows == {"mine": "user_1", "old": "local"}
            row = {
                "id": "mine",
                "name": "Theirs",
                "description": "",
                "provider": None,
                "model": None,
                "system_prompt": "",
                "temperature": None,
                "tools": [],
            }
            await store.save_agent(row, "user_2")  # the same id for another user
            assert len(await store.list_custom_agents()) == 3
            assert await store.delete_agent("mine", "user_2")
            rows = {r["id"]: r["owner_id"] for r in await store.list_custom_agents()}
            assert rows == {"mine": "user_1", "old": "local"}
        finally:
            await store.close()

    asyncio.run(main())


# ------------------------------------------------------------------ 11. bounded agent fields


def test_oversized_agent_fields_are_refused(srv):
    _, token = token_for(srv.home, "bob", "bob-sizes")
    base = {"id": "big", "name": "Big"}
    cases = {
        "tools": {**base, "tools": [f"tool_{i}_*" for i in range(40_000)]},
        "systemPrompt": {**base, "systemPrompt": "x" * 1_000_000},
        "description": {**base, "description": "d" * 1_000_000},
        "name": {**base, "name": "n" * 101},
        "model": {**base, "model": "m" * 10_000},
        "tools.0": {**base, "tools": ["p" * 10_000]},
    }
    with bearer(srv.url, token) as h:
        for field, body in cases.items():
            r = h.post("/api/agents", json=body)
            assert r.status_code == 422, (field, r.status_code)
            assert r.json()["code"] == "invalid_message"
            assert r.json()["details"]["field"] == field, r.json()
        assert h.get("/api/agents/big").status_code == 404  # nothing was stored
        assert h.post("/api/agents", json={**base, "tools": ["file_*"] * 256}).status_code == 201
        patch = h.patch("/api/agents/big", json={"tools": ["x"] * 40_000})
        assert patch.status_code == 422 and patch.json()["details"]["field"] == "tools"
        assert h.patch("/api/agents/big", json={"systemPrompt": "y" * 1_000_000}).status_code == 422
        assert h.get("/api/agents/big").json()["tools"] == ["file_*"] * 256
        assert h.get("/api/health").status_code == 200


def test_a_stored_oversized_agent_is_left_out_not_fatal(make_server, fake_openai):
    server = make_server(openai_env(fake_openai))
    server.stop()
    db = sqlite3.connect(server.data_dir / "prismd.db")
    db.execute(
        "INSERT INTO agents (id, name, tools, source, owner_id) VALUES (?,?,?,?,?)",
        ("frozen", "Frozen", json.dumps([f"t{i}*" for i in range(40_000)]), "user", "local"),
    )
    db.commit()
    db.close()
    server.start()
    assert server.get("/api/agents/frozen").status_code == 404
    assert "stored agent 'frozen' of user local not loaded: tools" in server.log.read_text()


# ------------------------------------------------------------------ 14, 15. secrets are masked

SECRETS = {
    "url_password": "hunter2-url-pass",
    "url_user": "mcp-url-user",
    "apikey": "QUERYKEY123456",
    "fragment": "frag-secret-99",
    "path_token": "bot987654321:AAHdqTcvCH1vGWJxfSe",
    "arg_token": "argtoken-abcdef",
    "arg_api_key": "apikey-value-777",
    "arg_p": "p-password-555",
    "env_value": "env-secret-value-1",
    "header_value": "header-bearer-xyz",
}

# A stdio MCP server that dies at once, printing its arguments and environment to stderr.
CRASHER = (
    "import os, sys; print('starting with', sys.argv[1:], file=sys.stderr); "
    "print('env secret', os.environ['SECRET_ENV'], file=sys.stderr); sys.exit(3)"
)


def _secrets_config(closed_port: int) -> str:
    s = SECRETS
    return f"""
[[mcp_servers]]
name = "remote"
url = "http://{s["url_user"]}:{s["url_password"]}@127.0.0.1:{closed_port}/mcp?apikey={s["apikey"]}"
timeout_s = 5

[[mcp_servers]]
name = "crasher"
command = {json.dumps(sys.executable)}
args = ["-c", {json.dumps(CRASHER)}, "--token={s["arg_token"]}", "--api-key", "{s["arg_api_key"]}",
        "-p", "{s["arg_p"]}"]
env = {{SECRET_ENV = "{s["env_value"]}"}}
timeout_s = 10

[[mcp_servers]]
name = "hooked"
enabled = false
url = "https://hooks.example/{s["path_token"]}/mcp#{s["fragment"]}"
headers = {{Authorization = "Bearer {s["header_value"]}"}}
"""


def test_mcp_secrets_reach_neither_users_nor_the_log(make_server, fake_openai):
    server = make_server(openai_env(fake_openai), _secrets_config(free_port()), start=False)
    add_user(server.home, "admin")
    add_user(server.home, "user")
    server.start()
    _, token = token_for(server.home, "user", "user-tools")
    with bearer(server.url, token) as h:
        tools = h.get("/api/tools")
        assert tools.status_code == 200
    servers = {s["name"]: s for s in tools.json()["mcpServers"]}
    # The errors still say what went wrong (and the crasher's stderr, masked).
    assert "cannot connect to http://••••@127.0.0.1" in servers["remote"]["error"]
    assert "apikey=••••" in servers["remote"]["error"]
    assert "stderr" in servers["crasher"]["error"] and "--token=••••" in servers["crasher"]["error"]
    admin = cookie_of(server.url, "admin")
    with httpx.Client(base_url=server.url, cookies={"prismd_session": admin}, timeout=10) as h:
        config = h.get("/api/config")
        assert config.status_code == 200
        admin_tools = h.get("/api/tools")
    crasher = next(s for s in config.json()["settings"]["mcp_servers"] if s["name"] == "crasher")
    assert crasher["args"][2:] == ["--token=••••", "--api-key", "••••", "-p", "••••"]
    hooked = next(s for s in config.json()["settings"]["mcp_servers"] if s["name"] == "hooked")
    assert hooked["url"] == "https://hooks.example/••••/mcp#••••"
    log = server.log.read_text()
    assert "MCP server 'crasher' could not be started" in log  # the log is not silent
    for where, text in (
        ("/api/tools", tools.text),
        ("/api/tools (admin)", admin_tools.text),
        ("/api/config", config.text),
        ("the log", log),
    ):
        leaked = [name for name, value in SECRETS.items() if value in text]
        assert not leaked, (where, leaked)


def test_masking_of_text_args_and_urls():
    from prismd.auth.redact import MASK, mask_args, mask_text, mask_url

    assert mask_args(
        ["--token=abc", "--api-key", "k", "-p", "pw", "--port", "80", "API_KEY=v"]
    ) == ["--token=" + MASK, "--api-key", MASK, "-p", MASK, "--port", "80", "API_KEY=" + MASK]
    assert mask_args(["--max-tokens", "100", "--token-file", "/etc/t"]) == [
        "--max-tokens",
        "100",
        "--token-file",
        "/etc/t",
    ]
    assert mask_url("https://u:p@h.example/v1/key/abcdefghij0123456789?k=1#f") == (
        f"https://{MASK}@h.example/v1/key/{MASK}?k={MASK}#{MASK}"
    )
    assert mask_url("http://127.0.0.1:11434/v1") == "http://127.0.0.1:11434/v1"
    line = "failed: Authorization: Bearer abc.def.ghi password=hunter22 sk-proj-abcdefghijklmnop12"
    masked = mask_text(line, ["hunter22"])
    assert "abc.def" not in masked and "hunter22" not in masked and "sk-proj" not in masked
    assert mask_text("the token was rejected") == "the token was rejected"
    assert mask_text("retry 1 of 3", ["1"]) == "retry 1 of 3"  # too short to hunt in text


# ------------------------------------------------------------------ 17. a client that stops reading


QUEUE_LIMIT = 1000
QUEUE_BYTES = 1_000_000


@pytest.fixture
def queue_server(make_server: Any) -> Iterator[tuple[PrismdServer, FakeModelServer]]:
    with FakeModelServer("openai") as flood:
        # 20,000 pieces of 400 characters, as fast as they go: the kernel's buffers take
        # ~4 MB of them, the rest backs up into the connection's send queue (pieces that
        # arrive together are merged, so it backs up in bytes more than in frames).
        flood.script(Reply(text=["x" * 400] * 20_000), match="flood")
        config = f"[server]\nsend_queue_frames = {QUEUE_LIMIT}\nsend_queue_bytes = {QUEUE_BYTES}\n"
        yield make_server(openai_env(flood), config), flood


def test_a_client_that_never_reads_is_dropped_at_send_queue_frames(queue_server):
    server, _ = queue_server
    raw = RawWS(server.port, rcvbuf=4096)
    try:
        assert raw.recv_json()["type"] == "connected"
        raw.send_json(type="chat", message="flood", sessionId="flooded")
        deadline = time.monotonic() + 60
        while "dropped:" not in server.log.read_text():
            assert time.monotonic() < deadline, "a client that never reads was not dropped"
            time.sleep(0.1)
    finally:
        raw.abort(reset=True)
    line = next(x for x in server.log.read_text().splitlines() if "dropped:" in x)
    unsent = int(line.split("dropped: ")[1].split()[0])
    unsent_bytes = int(line.split("frames (")[1].split()[0])
    # At a limit (frames or bytes), give or take one store batch (frames delivered together),
    # never the 40,000 frames (4 x the limit) of before.
    assert unsent < QUEUE_LIMIT + 4096, line
    assert unsent >= QUEUE_LIMIT or unsent_bytes >= QUEUE_BYTES, line
    # The turn went on without it, and completes.
    body = server.get("/api/sessions/flooded/messages").json()
    deadline = time.monotonic() + 60
    while body[-1]["status"] != "complete":
        assert time.monotonic() < deadline
        time.sleep(0.2)
        body = server.get("/api/sessions/flooded/messages").json()
    assert len(body[-1]["content"]) == 400 * 20_000
