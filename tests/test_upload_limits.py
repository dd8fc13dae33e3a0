"""Uploads have a lifecycle, and one user cannot fill the disk (issue 15): a quota of upload
bytes and files per user, a daily budget of chat bytes and files per user, unused uploads
pruned after an age (by the server and by `prismd uploads prune`), a deleted session's
uploads removed with it. Each bound is crossed by one user while another is unaffected.
Real server processes, real HTTP and WebSockets, real files on disk."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prismd.testing.fake_models import FakeModelServer

from .conftest import PrismdServer, openai_env, stored_rows
from .test_auth import bearer, cli
from .test_security_auth import add_user, token_for, token_ws
from .waiting import wait_for

LIMITS = """
[uploads]
max_bytes_per_user = 3000
max_files_per_user = 3
max_age_days = 1
chat_bytes_per_day = 6000
chat_files_per_day = 4
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeModelServer]:
    with FakeModelServer("openai") as f:
        yield f


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, fake: FakeModelServer) -> Iterator[PrismdServer]:
    """alice (admin) and five users, each with a token, under small limits."""
    home = tmp_path_factory.mktemp("uploads")
    names = ("alice", "bob", "carol", "dave", "erin", "frank")
    for name in names:
        add_user(home, name)
    tokens = {name: token_for(home, name, f"{name}-t")[1] for name in names}
    server = PrismdServer(home, openai_env(fake), LIMITS).start()
    server.tokens = tokens  # type: ignore[attr-defined]
    yield server
    server.stop()


def upload(client: httpx.Client, name: str, size: int) -> httpx.Response:
    return client.post("/api/upload", files={"file": (name, b"a" * size, "text/plain")})


def upload_path(srv: PrismdServer, client: httpx.Client, upload_id: str) -> Path:
    uid = client.get("/api/auth/me").json()["user"]["id"]
    return srv.data_dir / "uploads" / uid / upload_id


def test_upload_quota_counts_files_per_user(srv):
    with bearer(srv.url, srv.tokens["bob"]) as bob, bearer(srv.url, srv.tokens["carol"]) as carol:
        ids = [upload(bob, f"f{i}.txt", 10).json()["id"] for i in range(3)]
        over = upload(bob, "f3.txt", 10)
        assert over.status_code == 413, over.text
        body = over.json()
        assert body["code"] == "payload_too_large" and "3 files per user" in body["error"]
        # Carol is not bob: her quota is her own.
        assert upload(carol, "c.txt", 10).status_code == 201
        # Removing one of his uploads makes room again; its file is gone from the disk.
        path = upload_path(srv, bob, ids[0])
        assert path.exists()
        assert bob.delete(f"/api/uploads/{ids[0]}").status_code == 200
        assert not path.exists()
        assert bob.get(f"/api/uploads/{ids[0]}").status_code == 404
        assert upload(bob, "f4.txt", 10).status_code == 201
        # Another user's upload is answered like a missing one, and left alone.
        assert carol.delete(f"/api/uploads/{ids[1]}").status_code == 404
        assert carol.get(f"/api/uploads/{ids[1]}").status_code == 404
        assert bob.get(f"/api/uploads/{ids[1]}").content == b"a" * 10


def test_upload_quota_counts_bytes_per_user(srv):
    with bearer(srv.url, srv.tokens["dave"]) as dave, bearer(srv.url, srv.tokens["erin"]) as erin:
        assert upload(dave, "big.txt", 2500).status_code == 201
        over = upload(dave, "more.txt", 600)
        assert over.status_code == 413
        assert "3000 bytes per user" in over.json()["error"], over.text
        assert upload(dave, "fits.txt", 500).status_code == 201  # exactly at the limit
        # Base64 JSON uploads count the same.
        payload = {"filename": "j.txt", "data": base64.b64encode(b"z").decode()}
        assert dave.post("/api/upload", json=payload).status_code == 413
        assert upload(erin, "big.txt", 2900).status_code == 201
        usage = dave.get("/api/usage").json()["uploads"]
        assert usage == {
            "bytes": 3000,
            "files": 2,
            "maxBytes": 3000,
            "maxFiles": 3,
            "maxAgeDays": 1,
        }


def test_daily_chat_budget_per_user(srv):
    """Text and files of chats count per user per UTC day; over it, `rate_limited` naming the
    limit, and nothing of the refused chat is stored."""
    with token_ws(srv, srv.tokens["frank"]) as frank, token_ws(srv, srv.tokens["erin"]) as erin:
        first = frank.turn(message="x" * 4000)
        assert first[-1]["type"] == "context_usage"
        sid = first[0]["sessionId"]
        frank.send(type="chat", message="y" * 2500, sessionId=sid)
        refused = frank.recv()
        assert refused["type"] == "error" and refused["code"] == "rate_limited"
        assert "6000 bytes per user per day" in refused["error"]
        assert len(stored_rows(srv, "session_messages", sid)) == 2  # the first exchange only
        # A new chat is refused before any session is made for it.
        frank.send(type="new_session")
        frank.until("session_ended")
        frank.send(type="chat", message="z" * 2500)
        assert frank.recv()["code"] == "rate_limited"
        # What still fits goes through.
        assert frank.turn(message="small", sessionId=sid)[-1]["type"] == "context_usage"
        # Files count too: four a day.
        files = [
            {
                "filename": f"n{i}.txt",
                "mimeType": "text/plain",
                "data": base64.b64encode(b"n").decode(),
            }
            for i in range(3)
        ]
        assert erin.turn(message="three", files=files)[-1]["type"] == "context_usage"
        erin.send(type="chat", message="two more", files=files[:2])
        over = erin.recv()
        assert over["code"] == "rate_limited" and "4 files per user per day" in over["error"]
        assert erin.turn(message="one more", files=files[:1])[-1]["type"] == "context_usage"
        # Erin's messages did not count against frank's budget, nor his against hers.
        with bearer(srv.url, srv.tokens["erin"]) as http:
            today = http.get("/api/usage").json()["today"]
        assert today["files"] == 4 and today["bytes"] == len("threeone more") + 4
        assert today["maxBytes"] == 6000 and today["maxFiles"] == 4


def test_a_resent_chat_is_not_charged_twice(srv):
    """A resend with the same clientMessageId is answered by a replay of its turn, and a chat
    refused because the session's turn is running did not run either: neither counts."""
    with token_ws(srv, srv.tokens["dave"]) as dave:
        first = dave.turn(message="x" * 4000, clientMessageId="once")
        sid = first[0]["sessionId"]
        for _ in range(3):  # each would be over the 6000 bytes of the day if it counted
            again = dave.turn(message="x" * 4000, clientMessageId="once", sessionId=sid)
            seqs = [[f["seq"] for f in frames if "seq" in f] for frames in (again, first)]
            assert seqs[0] == seqs[1] and seqs[0], again
        with bearer(srv.url, srv.tokens["dave"]) as http:
            assert http.get("/api/usage").json()["today"]["bytes"] == 4000
        assert dave.turn(message="y" * 1500, sessionId=sid)[-1]["type"] == "context_usage"


def test_a_deleted_sessions_uploads_go_with_it(srv):
    with bearer(srv.url, srv.tokens["alice"]) as alice, token_ws(srv, srv.tokens["alice"]) as ws:
        only = upload(alice, "only.txt", 5).json()["id"]
        shared = upload(alice, "shared.txt", 5).json()["id"]
        one = ws.turn(message="first", files=[{"fileId": only}, {"fileId": shared}])
        sid_one = one[0]["sessionId"]
        ws.send(type="new_session")
        ws.until("session_ended")
        two = ws.turn(message="second", files=[{"fileId": shared}])
        sid_two = two[0]["sessionId"]
        only_path = upload_path(srv, alice, only)
        assert only_path.exists()
        assert alice.delete(f"/api/sessions/{sid_one}").status_code == 200
        assert alice.get(f"/api/uploads/{only}").status_code == 404
        assert not only_path.exists()
        # The upload the other session sent too is kept while that session exists.
        assert alice.get(f"/api/uploads/{shared}").content == b"a" * 5
        assert alice.delete(f"/api/sessions/{sid_two}").status_code == 200
        assert alice.get(f"/api/uploads/{shared}").status_code == 404


def test_prismd_uploads_prune_removes_old_unused_uploads(make_server, fake):
    srv = make_server(openai_env(fake))
    with httpx.Client(base_url=srv.url, timeout=30) as local:
        unused = local.post("/api/upload", files={"file": ("u.txt", b"u", "text/plain")})
        used = local.post("/api/upload", files={"file": ("s.txt", b"s", "text/plain")})
        with srv.client() as ws:
            ws.turn(message="keep it", files=[{"fileId": used.json()["id"]}])
        # Not old enough under the default age (7 days): nothing goes.
        out = cli(srv.home, "uploads", "prune")
        assert out.returncode == 0 and "removed 0 upload(s) older than 7 days" in out.stdout
        out = cli(srv.home, "uploads", "prune", "--older-than-days", "0")
        assert out.returncode == 0 and "removed 1 upload(s)" in out.stdout, out.stdout
        assert local.get(f"/api/uploads/{unused.json()['id']}").status_code == 404
        assert local.get(f"/api/uploads/{used.json()['id']}").content == b"s"
        assert cli(srv.home, "uploads", "prune", "--older-than-days", "-1").returncode == 2


def test_the_server_prunes_unused_uploads_by_itself(make_server, fake):
    # 0.00002 days is 1.7 s: an upload older than that, and unused, goes at the next pass.
    config = "[uploads]\nmax_age_days = 0.00002\nprune_interval_s = 0.2\n"
    srv = make_server(openai_env(fake), config)
    with httpx.Client(base_url=srv.url, timeout=30) as local:
        used = local.post("/api/upload", files={"file": ("s.txt", b"s", "text/plain")}).json()
        with srv.client() as ws:
            ws.turn(message="keep it", files=[{"fileId": used["id"]}])
        unused = local.post("/api/upload", files={"file": ("u.txt", b"u", "text/plain")}).json()
        wait_for(
            lambda: local.get(f"/api/uploads/{unused['id']}").status_code != 200,
            "the unused upload to be pruned",
        )
        assert local.get(f"/api/uploads/{used['id']}").content == b"s"
    assert "removed 1 unused upload(s)" in srv.log.read_text()


def test_a_session_file_is_served_to_its_owner_only(srv):
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    html = b"<script>alert(1)</script>"
    files = [
        {"filename": "dot.png", "mimeType": "image/png", "data": base64.b64encode(png).decode()},
        {"filename": "page.html", "mimeType": "text/html", "data": base64.b64encode(html).decode()},
    ]
    with token_ws(srv, srv.tokens["bob"]) as ws:
        sid = ws.turn(message="two files", files=files)[0]["sessionId"]
    with bearer(srv.url, srv.tokens["bob"]) as bob, bearer(srv.url, srv.tokens["carol"]) as carol:
        stored = next(m for m in bob.get(f"/api/sessions/{sid}/messages").json() if m["files"])
        by_name = {f["filename"]: f["id"] for f in stored["files"]}
        image = bob.get(f"/api/sessions/{sid}/files/{by_name['dot.png']}")
        assert image.status_code == 200 and image.content == png
        assert image.headers["content-type"] == "image/png"
        assert image.headers["content-disposition"].startswith("inline")
        # Anything but an image is an attachment that a browser cannot render as a page.
        page = bob.get(f"/api/sessions/{sid}/files/{by_name['page.html']}")
        assert page.content == html
        assert page.headers["content-type"] == "application/octet-stream"
        assert page.headers["content-disposition"].startswith("attachment")
        assert "sandbox" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert carol.get(f"/api/sessions/{sid}/files/{by_name['dot.png']}").status_code == 404
        assert bob.get(f"/api/sessions/{sid}/files/file_nope").status_code == 404
