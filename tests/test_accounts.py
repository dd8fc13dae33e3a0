"""Users and credentials over REST (the admin page's routes and every user's account routes),
and usage totals, against a real server process (issue 15).

What the admin changes over REST must act at once on open sockets, exactly like the command
line's changes (auth/live.py), and the command line must see the same users and tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from prismd.testing.fake_models import FakeModelServer, Reply

from .conftest import PrismdServer, openai_env
from .test_auth import bearer, cli
from .test_security_auth import PASSWORD, add_user, alive, cookie_ws, log_in, revoked, token_ws

ADMIN_ROUTES = [
    ("GET", "/api/admin/users", None),
    ("POST", "/api/admin/users", {"name": "mallory", "password": "x" * 12}),
    ("DELETE", "/api/admin/users/{alice}", None),
    ("POST", "/api/admin/users/{alice}/password", {"password": "x" * 12}),
    ("GET", "/api/admin/tokens", None),
    ("DELETE", "/api/admin/tokens/tok_x", None),
    ("GET", "/api/admin/logins", None),
    ("DELETE", "/api/admin/logins/abc", None),
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeModelServer]:
    with FakeModelServer("openai") as f:
        yield f


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, fake: FakeModelServer) -> Iterator[PrismdServer]:
    """alice (admin), bob and carol, made with the command line."""
    home = tmp_path_factory.mktemp("accounts")
    for name in ("alice", "bob", "carol"):
        add_user(home, name)
    server = PrismdServer(home, openai_env(fake)).start()
    yield server
    server.stop()


class session_of(httpx.Client):  # noqa: N801 - used like a function
    """An HTTP client holding `name`'s login cookie (a context manager, like httpx.Client)."""

    def __init__(self, url: str, name: str, password: str = PASSWORD) -> None:
        super().__init__(base_url=url, timeout=30)
        self.__enter__()
        resp = self.post("/api/auth/login", json={"username": name, "password": password})
        assert resp.status_code == 200, resp.text

    def __enter__(self) -> session_of:
        if not getattr(self, "_entered", False):
            self._entered = True
            super().__enter__()
        return self


def user_id(client: httpx.Client) -> str:
    return str(client.get("/api/auth/me").json()["user"]["id"])


def test_only_admins_reach_the_admin_routes(srv):
    with session_of(srv.url, "alice") as alice, session_of(srv.url, "bob") as bob:
        alice_id = user_id(alice)
        for method, path, body in ADMIN_ROUTES:
            resp = bob.request(method, path.format(alice=alice_id), json=body)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["code"] == "unauthorized"
        # Nothing was changed by those attempts: alice still signs in, mallory does not exist.
        names = [u["name"] for u in alice.get("/api/admin/users").json()]
        assert names == ["alice", "bob", "carol"]
        assert log_in(srv.url, "alice").status_code == 200


def test_admin_adds_resets_and_removes_users_and_sockets_follow(srv):
    with session_of(srv.url, "alice") as alice:
        # Bad input is refused with the field named; a taken name is a conflict.
        bad = alice.post("/api/admin/users", json={"name": "no spaces", "password": "x" * 12})
        assert bad.status_code == 422 and bad.json()["details"]["field"] == "name"
        short = alice.post("/api/admin/users", json={"name": "dave", "password": "short"})
        assert short.status_code == 422 and short.json()["details"]["field"] == "password"
        taken = alice.post("/api/admin/users", json={"name": "bob", "password": "x" * 12})
        assert taken.status_code == 409
        made = alice.post("/api/admin/users", json={"name": "dave", "password": "dave-first-pw"})
        assert made.status_code == 201, made.text
        dave = made.json()
        assert dave["name"] == "dave" and dave["admin"] is False and dave["usage"]["turns"] == 0
        # The command line sees the same users.
        listed = json.loads(cli(srv.home, "users", "list", "--json").stdout)
        assert "dave" in [u["name"] for u in listed]

        dave_http = session_of(srv.url, "dave", "dave-first-pw")
        cookie = dave_http.cookies["prismd_session"]
        made_token = dave_http.post("/api/account/tokens", json={"name": "dave-script"}).json()
        with cookie_ws(srv, cookie) as browser, token_ws(srv, made_token["token"]) as script:
            assert alive(browser) and alive(script)
            # A reset password ends dave's logins at once; his token stays.
            reset = alice.post(
                f"/api/admin/users/{dave['id']}/password", json={"password": "dave-second-pw"}
            )
            assert reset.status_code == 200
            assert "login session ended" in revoked(browser)["error"]
            assert alive(script)
            assert dave_http.get("/api/auth/me").status_code == 401
            assert log_in(srv.url, "dave", "dave-first-pw").status_code == 401
            assert log_in(srv.url, "dave", "dave-second-pw").status_code == 200
            # Removed, dave loses his token's sockets too, and cannot sign in again.
            assert alice.delete(f"/api/admin/users/{dave['id']}").status_code == 200
            assert revoked(script)["error"] == "This user was removed"
        dave_http.close()
        assert log_in(srv.url, "dave", "dave-second-pw").status_code == 401
        assert alice.delete(f"/api/admin/users/{dave['id']}").status_code == 404
        assert "dave" not in cli(srv.home, "users", "list").stdout
        # An admin cannot remove themselves (the server would lose its admin).
        assert alice.delete(f"/api/admin/users/{user_id(alice)}").status_code == 409


def test_admin_sees_and_ends_logins_and_revokes_tokens(srv):
    with session_of(srv.url, "alice") as alice, session_of(srv.url, "carol") as carol:
        cookie = carol.cookies["prismd_session"]
        logins = alice.get("/api/admin/logins").json()
        mine = [x for x in logins if x["userName"] == "carol"]
        assert mine and all(x["expiresAt"] and x["createdAt"] for x in mine)
        assert [x["current"] for x in logins if x["userName"] == "alice"].count(True) == 1
        # Never the secret: neither the cookie nor its whole hash.
        assert cookie not in json.dumps(logins)
        assert all(len(x["id"]) == 32 for x in logins)
        out = cli(srv.home, "tokens", "create", "--user", "carol", "--name", "carol-cli")
        token = out.stdout.strip()
        tokens = alice.get("/api/admin/tokens").json()
        row = next(t for t in tokens if t["name"] == "carol-cli")
        assert row["userName"] == "carol" and token not in json.dumps(tokens)
        with cookie_ws(srv, cookie) as browser, token_ws(srv, token) as script:
            assert alive(browser) and alive(script)
            login_id = next(
                x["id"] for x in alice.get("/api/admin/logins").json() if x["userName"] == "carol"
            )
            assert alice.delete(f"/api/admin/logins/{login_id}").status_code == 200
            assert revoked(browser)["error"] == "This login session was ended"
            assert alive(script)
            assert alice.delete(f"/api/admin/tokens/{row['id']}").status_code == 200
            assert "revoked" in revoked(script)["error"]
        assert carol.get("/api/auth/me").status_code == 401
        assert bearer(srv.url, token).get("/api/auth/me").status_code == 401
        assert alice.delete(f"/api/admin/tokens/{row['id']}").status_code == 404
        assert alice.delete(f"/api/admin/logins/{login_id}").status_code == 404
        # The command line no longer lists it either.
        assert row["id"] not in cli(srv.home, "tokens", "list").stdout


def test_a_user_changes_their_own_password(srv):
    add_user(srv.home, "erin")
    with session_of(srv.url, "erin") as erin:
        old_cookie = erin.cookies["prismd_session"]
        other = session_of(srv.url, "erin")  # another browser of erin's
        with cookie_ws(srv, old_cookie) as socket:
            wrong = erin.post(
                "/api/account/password",
                json={"currentPassword": "not it", "newPassword": "erin-new-password"},
            )
            assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
            short = erin.post(
                "/api/account/password", json={"currentPassword": PASSWORD, "newPassword": "x"}
            )
            assert short.status_code == 422 and short.json()["details"]["field"] == "password"
            assert alive(socket)  # nothing changed so far
            ok = erin.post(
                "/api/account/password",
                json={"currentPassword": PASSWORD, "newPassword": "erin-new-password"},
            )
            assert ok.status_code == 200, ok.text
            # Every login ended (its sockets closed); this browser got a new one.
            assert "login session ended" in revoked(socket)["error"]
        new_cookie = ok.cookies["prismd_session"]
        assert new_cookie and new_cookie != old_cookie
        assert erin.get("/api/auth/me").json()["user"]["name"] == "erin"
        assert other.get("/api/auth/me").status_code == 401
        other.close()
        assert log_in(srv.url, "erin").status_code == 401
        assert log_in(srv.url, "erin", "erin-new-password").status_code == 200


def test_a_user_manages_their_own_tokens_and_logins_only(srv):
    with session_of(srv.url, "bob") as bob, session_of(srv.url, "carol") as carol:
        made = bob.post("/api/account/tokens", json={"name": "bob-laptop"})
        assert made.status_code == 201
        token = made.json()["token"]
        assert token.startswith("prismd_")
        listed = bob.get("/api/account/tokens").json()
        assert [t["name"] for t in listed if t["id"] == made.json()["id"]] == ["bob-laptop"]
        assert token not in json.dumps(listed)  # shown once
        with bearer(srv.url, token) as script:
            assert script.get("/api/auth/me").json()["user"]["name"] == "bob"
            # Carol sees none of bob's, and his ids are answered like unknown ones.
            assert made.json()["id"] not in carol.get("/api/account/tokens").text
            assert carol.delete(f"/api/account/tokens/{made.json()['id']}").status_code == 404
            bob_login = next(x for x in bob.get("/api/account/logins").json() if x["current"])
            assert carol.delete(f"/api/account/logins/{bob_login['id']}").status_code == 404
            assert bob_login["id"] not in carol.get("/api/account/logins").text
            assert script.get("/api/auth/me").status_code == 200
            assert bob.get("/api/auth/me").status_code == 200
            # Bob revokes it: it stops working at once.
            assert bob.delete(f"/api/account/tokens/{made.json()['id']}").status_code == 200
            assert script.get("/api/auth/me").status_code == 401
        # A token signs nothing in: its own login list is empty, and no password change.
        extra = bob.post("/api/account/tokens", json={}).json()["token"]
        with bearer(srv.url, extra) as script:
            logins = script.get("/api/account/logins").json()
            assert logins and not any(x["current"] for x in logins)


def test_usage_totals_per_user_and_per_session(srv, fake):
    fake.script(Reply(text="counted answer", usage=(100, 20)), match="count me")
    tokens = {}
    for name in ("bob", "carol"):
        out = cli(srv.home, "tokens", "create", "--user", name, "--name", f"{name}-usage")
        tokens[name] = out.stdout.strip()
    with token_ws(srv, tokens["bob"]) as c:
        first = c.turn(message="count me one")
        sid = first[0]["sessionId"]
        c.turn(message="count me two", sessionId=sid)
        c.send(type="new_session")
        c.until("session_ended")
        c.turn(message="count me three")  # another session
    with token_ws(srv, tokens["carol"]) as c:
        c.turn(message="count me too")
    with bearer(srv.url, tokens["bob"]) as bob, bearer(srv.url, tokens["carol"]) as carol:
        report = bob.get("/api/usage").json()
        total = report["total"]
        assert (total["turns"], total["sessions"]) == (3, 2)
        assert (total["tokensIn"], total["tokensOut"], total["totalTokens"]) == (300, 60, 360)
        assert total["costKnown"] is True and total["costUsd"] > 0
        assert report["recent"]["turns"] == 3 and report["days"] == 30
        assert report["today"]["bytes"] == len("count me onecount me twocount me three")
        assert carol.get("/api/usage").json()["total"]["turns"] == 1
        # The session's own totals (its row) agree with its turns.
        row = bob.get(f"/api/sessions/{sid}").json()
        assert (row["turn_count"], row["tokens_in"], row["tokens_out"]) == (2, 200, 40)
        # Only admins ask for another user's.
        carol_id = user_id(carol)
        refused = bob.get("/api/usage", params={"user": carol_id})
        assert refused.status_code == 403 and refused.json()["code"] == "unauthorized"
    with session_of(srv.url, "alice") as alice:
        assert alice.get("/api/usage", params={"user": carol_id}).json()["total"]["turns"] == 1
        everyone = alice.get("/api/usage", params={"user": "all"}).json()
        assert everyone["total"]["turns"] >= 4 and everyone["userId"] is None
        assert alice.get("/api/usage", params={"user": "user_nobody"}).status_code == 404
        by_user = {u["name"]: u["usage"] for u in alice.get("/api/admin/users").json()}
        assert by_user["bob"]["turns"] == 3 and by_user["carol"]["turns"] == 1


def test_the_admin_page_works_in_the_open_mode(make_server, fake):
    """No user yet: the local owner is the admin; adding the first user ends the open mode
    (the open sockets close) and every request then needs credentials."""
    srv = make_server(openai_env(fake))
    with httpx.Client(base_url=srv.url, timeout=30) as local:
        assert local.get("/api/admin/users").json() == []
        no_user = local.post("/api/account/tokens", json={"name": "x"})
        assert no_user.status_code == 409
        with srv.client() as socket:
            assert alive(socket)
            made = local.post("/api/admin/users", json={"name": "owner", "password": PASSWORD})
            assert made.status_code == 201 and made.json()["admin"] is True  # the first one
            assert "log in" in revoked(socket)["error"]
        assert local.get("/api/admin/users").status_code == 401
    assert log_in(srv.url, "owner").status_code == 200
