"""The minimal REST API, over real HTTP (its bodies are CortexPrism's: PROTOCOL.md D)."""

from __future__ import annotations

import httpx

from .conftest import stored_rows

# Run in both configurations: one process on SQLite, and PostgreSQL + Redis (conftest.py).
BACKENDS = ("embedded", "scaled")


def _chat(server, message="hello", **extra):
    with server.client() as c:
        return c.turn(message=message, **extra)


def test_health(server):
    body = server.get("/api/health").json()
    assert body["status"] == "ok" and body["ts"].endswith("Z")
    assert body["version"]
    assert body["provider"] == "openai" and body["providerConfigured"] is True


def test_openapi_lists_every_route(server):
    schema = server.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/health",
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/messages",
        "/api/sessions/{session_id}/resume",
        "/api/agents",
    ):
        assert path in paths, path
    assert "delete" in paths["/api/sessions/{session_id}"]
    assert server.get("/docs").status_code == 200


def test_sessions_list_get_messages(server):
    frames = _chat(server, "list me")
    sid = frames[0]["sessionId"]
    resp = server.get("/api/sessions?limit=500")
    listing = resp.json()
    assert sid in [s["id"] for s in listing]
    assert int(resp.headers["X-Total-Count"]) == len(listing) >= 1
    one = server.get(f"/api/sessions/{sid}").json()
    assert one["id"] == sid and one["agent_id"] == "assistant" and one["status"] == "active"
    assert one["turn_count"] == 1 and one["tokens_in"] > 0
    assert one["last_seq"] == frames[-1]["seq"] and one["turn_running"] is False
    resp = server.get(f"/api/sessions/{sid}/messages")
    assert int(resp.headers["X-Last-Seq"]) == frames[-1]["seq"]
    user, answer = resp.json()
    assert user["role"] == "user" and user["content"] == "list me"
    assert answer["role"] == "assistant" and answer["status"] == "complete"
    assert answer["content"] == frames[-2]["finalContent"]
    assert answer["meta"]["model"] == "gpt-4o-mini"
    assert answer["turn_id"] == frames[1]["turnId"]
    assert answer["token_count"] == frames[-2]["tokensOut"] > 0


def test_sessions_paging_and_agent_filter(server):
    for i in range(3):
        _chat(server, f"page {i}")
    page1 = server.get("/api/sessions?limit=2&offset=0").json()
    page2 = server.get("/api/sessions?limit=2&offset=2").json()
    assert len(page1) == 2 and not {s["id"] for s in page1} & {s["id"] for s in page2}
    assert server.get("/api/sessions?agentId=nobody").json() == []
    assert server.get("/api/sessions?agentId=nobody").headers["X-Total-Count"] == "0"
    assert server.get("/api/sessions?limit=0").status_code == 422


def test_resume_reactivates_and_delete_removes_the_database(server):
    frames = _chat(server)
    sid = frames[0]["sessionId"]
    with server.client() as c:
        c.send(type="resume", sessionId=sid)
        c.recv()
        c.send(type="new_session")
        c.recv()
    assert server.get(f"/api/sessions/{sid}").json()["status"] == "closed"
    assert httpx.post(f"{server.url}/api/sessions/{sid}/resume").json() == {"ok": True}
    assert server.get(f"/api/sessions/{sid}").json()["status"] == "active"
    assert stored_rows(server, "session_events", sid)
    deleted = httpx.delete(f"{server.url}/api/sessions/{sid}")
    assert deleted.status_code == 200 and deleted.json() == {"ok": True}
    for table in ("session_events", "session_messages", "turns"):
        assert stored_rows(server, table, sid) == []
    assert server.get(f"/api/sessions/{sid}").status_code == 404
    assert httpx.delete(f"{server.url}/api/sessions/{sid}").status_code == 404


def test_bad_and_unknown_ids(server):
    for path in ("/api/sessions/{}", "/api/sessions/{}/messages"):
        resp = server.get(path.format("bad.id"))
        assert resp.status_code == 400 and resp.json()["code"] == "invalid_session_id"
        resp = server.get(path.format("sess_unknown"))
        assert resp.status_code == 404
        assert resp.json() == {"error": "Session not found", "code": "session_not_found"}
    resp = httpx.post(f"{server.url}/api/sessions/sess_unknown/resume")
    assert resp.status_code == 404
    resp = httpx.delete(f"{server.url}/api/sessions/bad.id")
    assert resp.status_code == 400


def test_agents(server):
    (agent,) = server.get("/api/agents").json()
    assert agent["id"] == "assistant" and agent["default"] is True and agent["builtin"] is True


def test_deleting_a_bound_session_lets_the_connection_start_afresh(server):
    with server.client() as c:
        sid = c.turn(message="doomed")[0]["sessionId"]
        assert httpx.delete(f"{server.url}/api/sessions/{sid}").json() == {"ok": True}
        # The bound connection is told, and unbound.
        assert c.recv() == {"type": "session_ended", "sessionId": sid, "reason": "deleted"}
        frames = c.turn(message="next")
    assert frames[0]["type"] == "session" and frames[0]["sessionId"] != sid
    assert stored_rows(server, "session_messages", sid) == []
