"""PROTOCOL.md D route by route: what a client written for CortexPrism reads from prismd.

Each test asserts the body CortexPrism's own web page reads (field names and types, bare
arrays, no envelope) against sessions made over /ws, and that every 2xx JSON body matches the
response schema /openapi.json declares for it. prismd's extras are allowed only as more fields.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from prismd.testing.fake_models import Reply

from .conftest import PrismdServer, of_type, openai_env, uploaded_bytes
from .test_auth import PASSWORDS, add_user

# Run in both configurations: one process on SQLite, and PostgreSQL + Redis (conftest.py).
BACKENDS = ("embedded", "scaled")

FIXTURES = Path(__file__).parent / "fixtures"
NUM = (int, float)
OPT_STR = (str, type(None))
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

# CortexPrism's rows and objects, as its code reads them: field -> accepted types.
SESSION_ROW = {
    "id": str,
    "name": OPT_STR,
    "agent_id": str,
    "channel": str,
    "status": str,
    "turn_count": int,
    "context_size": (int, type(None)),
    "started_at": str,
    "last_turn_at": OPT_STR,
    "closed_at": OPT_STR,
    "parent_session_id": OPT_STR,
}
STATS = {
    "tokens_in": int,
    "tokens_out": int,
    "total_tokens": int,
    "cost_usd": NUM,
    "llm_calls": int,
    "tool_calls": int,
    "errors": int,
    "avg_duration_ms": int,
}
MESSAGE_ROW = {
    "id": str,  # an integer in CortexPrism; prismd's message ids are strings
    "role": str,
    "content": str,
    "tool_calls": OPT_STR,
    "token_count": int,
    "created_at": str,
}
AGENT = {
    "id": str,
    "name": str,
    "description": str,
    "icon": OPT_STR,
    "category": OPT_STR,
    "provider": OPT_STR,
    "model": OPT_STR,
    "systemPrompt": str,
    "temperature": (int, float, type(None)),
    "tools": list,
    "tags": list,
    "builtin": bool,
    "createdAt": OPT_STR,
    "updatedAt": OPT_STR,
}


def shaped(obj: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """obj is an object with at least these fields, of these types (bool is not a number)."""
    assert isinstance(obj, dict), obj
    for name, kinds in fields.items():
        assert name in obj, (name, obj)
        value = obj[name]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        assert isinstance(value, kinds), (name, value)
        if bool not in kinds:
            assert not isinstance(value, bool), (name, value)
    return obj


class Api:
    """An HTTP client that checks every JSON answer against the OpenAPI schema."""

    def __init__(self, server: PrismdServer, **kwargs: Any) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=60, **kwargs)
        self.schema = server.get("/openapi.json").json()
        self.routes = [
            (method, re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", path) + "$"), path)
            for path, item in self.schema["paths"].items()
            for method in item
        ]

    def __call__(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        resp = self.http.request(method, url, **kwargs)
        if resp.is_success and resp.headers.get("content-type", "").startswith("application/json"):
            self._validate(method.lower(), url.split("?")[0], resp)
        return resp

    def _validate(self, method: str, path: str, resp: httpx.Response) -> None:
        # Literal paths first (/api/sessions/enriched before /api/sessions/{session_id}).
        candidates = sorted(
            (r for r in self.routes if r[0] == method and r[1].match(path)),
            key=lambda r: r[2].count("{"),
        )
        assert candidates, (method, path)
        op = self.schema["paths"][candidates[0][2]][method]
        declared = op["responses"][str(resp.status_code)]["content"]["application/json"]
        schema = {**declared["schema"], "components": self.schema["components"]}
        jsonschema.validate(resp.json(), schema, cls=jsonschema.Draft202012Validator)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self("POST", url, **kwargs)


def call(name: str, args: dict[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "name": name, "arguments": json.dumps(args)}


@pytest.fixture(scope="module")
def world(server: PrismdServer, fake_openai) -> dict[str, Any]:
    """Sessions made over /ws: `tools` (a native tool call, then a plain turn), `plain` (one
    turn, started after `tools`, renamed), `failed` (its only turn failed)."""
    fake_openai.reset()
    fake_openai.script(
        Reply(text=["Checking. "], tool_calls=[call("current_time", {})], times=1),
        match="what time",
    )
    fake_openai.script(Reply(text=["It is ", "noon."], times=1), match="what time")
    fake_openai.script(Reply(status=400, text="refused by the fake"), match="please fail")
    with server.client() as c:
        tools_frames = c.turn(message="what time is it")
        tools = tools_frames[0]["sessionId"]
    with server.client() as c:
        plain_frames = c.turn(message="hello there")
        plain = plain_frames[0]["sessionId"]
    with server.client() as c:
        failed_frames = c.turn(message="please fail")
        failed = failed_frames[0]["sessionId"]
        assert failed_frames[-1]["type"] == "error"
    with server.client() as c:  # later activity in the oldest one
        more = c.turn(message="and again", sessionId=tools)
    assert httpx.patch(f"{server.url}/api/sessions/{plain}", json={"name": "Plain talk"}).is_success
    return {
        "tools": tools,
        "plain": plain,
        "failed": failed,
        "done": [of_type(tools_frames, "done")[0], of_type(more, "done")[0]],
    }


@pytest.fixture
def api(server: PrismdServer) -> Any:
    client = Api(server)
    yield client
    client.http.close()


# ---------------------------------------------------------------- server


def test_health(api):
    body = shaped(api.get("/api/health").json(), {"status": str, "ts": str})
    assert body["status"] == "ok" and ISO.match(body["ts"])


def test_status(api):
    body = shaped(api.get("/api/status").json(), {"provider": str, "model": str, "ts": str})
    assert (body["provider"], body["model"]) == ("openai", "gpt-4o-mini")
    assert body["daemons"] == {"validator": False, "executor": False, "scheduler": False}


def test_unknown_api_routes_are_404_not_found(api):
    for method, path in [
        ("GET", "/api/nothing/here"),
        ("POST", "/api/sessions/x/teleport"),
        ("PUT", "/api/sessions"),
        ("GET", "/api"),
    ]:
        resp = api(method, path)
        assert resp.status_code == 404, (method, path)
        assert resp.json() == {"error": "Not found", "code": "not_found"}


def test_routes_prismd_does_not_serve_answer_like_an_empty_cortexprism(api, world):
    for path in ("/api/plugins/panels", "/api/plugins/slots", "/api/lens/recent"):
        assert api.get(path).json() == []
    sid = world["tools"]
    assert api.get(f"/api/sessions/{sid}/children").json() == []
    assert api.get(f"/api/sessions/{sid}/events").json() == []
    assert api.get("/api/sessions/sess_unknown/children").status_code == 404


def test_invalid_json_frame_is_cortexprisms_error(server):
    with server.client() as c:
        c.send_raw("{not json")
        err = c.recv()
    assert err["type"] == "error" and err["error"] == "Invalid JSON"
    assert err["code"] == "invalid_json" and "Expecting property name" in err["details"]["reason"]


# ---------------------------------------------------------------- sessions


def test_sessions_list(api, world):
    resp = api.get("/api/sessions?limit=20&agentId=")
    rows = resp.json()
    assert isinstance(rows, list) and len(rows) >= 3
    for row in rows:
        shaped(row, SESSION_ROW)
    ids = [r["id"] for r in rows]
    # Newest started_at first, as CortexPrism lists them; sort=activity: newest turn first.
    assert ids.index(world["failed"]) < ids.index(world["plain"]) < ids.index(world["tools"])
    by_activity = [r["id"] for r in api.get("/api/sessions?limit=20&sort=activity").json()]
    assert (
        by_activity.index(world["tools"])
        < by_activity.index(world["failed"])
        < by_activity.index(world["plain"])
    )
    assert int(resp.headers["X-Total-Count"]) >= len(rows)
    plain = rows[ids.index(world["plain"])]
    assert plain["name"] == "Plain talk" and plain["turn_count"] == 1
    assert plain["agent_id"] == "assistant" and plain["status"] == "active"
    assert ISO.match(plain["started_at"]) and ISO.match(plain["last_turn_at"])
    assert plain["parent_session_id"] is None and plain["channel"] == "web"
    assert api.get("/api/sessions?limit=20&agentId=nobody").json() == []
    assert len(api.get("/api/sessions?limit=1").json()) == 1


def test_sessions_enriched(api, world):
    rows = api.get("/api/sessions/enriched?limit=50&agentId=").json()
    for row in rows:
        shaped(row, {**SESSION_ROW, **STATS, "child_count": int, "children": list})
        assert row["parent_session_id"] is None and row["children"] == []
    by_id = {r["id"]: r for r in rows}
    tools, done = by_id[world["tools"]], world["done"]
    assert tools["llm_calls"] == 3 and tools["tool_calls"] == 1 and tools["errors"] == 0
    assert tools["tokens_in"] == sum(d["tokensIn"] for d in done)
    assert tools["total_tokens"] == tools["tokens_in"] + tools["tokens_out"]
    assert tools["cost_usd"] == pytest.approx(sum(d["costUsd"] for d in done))
    llm_ms = sum(d["latency"]["llmMs"] for d in done) / sum(d["rounds"] for d in done)
    assert tools["avg_duration_ms"] == round(llm_ms)
    assert by_id[world["failed"]]["errors"] == 1
    assert api.get("/api/sessions/enriched?agentId=nobody").json() == []


def test_sessions_tree(api, world, server):
    archived = _new_session(server, "to be archived")
    assert api.post(f"/api/sessions/{archived}/archive").json() == {"ok": True}
    rows = api.get("/api/sessions/tree?limit=30").json()
    for row in rows:
        shaped(row, {**SESSION_ROW, "children": list})
        assert row["status"] != "archived" and row["children"] == []
    ids = {r["id"] for r in rows}
    assert {world["tools"], world["plain"]} <= ids and archived not in ids


def test_sessions_search(api, world):
    rows = api.get("/api/sessions/search?q=plain").json()
    assert [shaped(r, SESSION_ROW)["id"] for r in rows] == [world["plain"]]
    assert api.get("/api/sessions/search?q=no-such-name").json() == []
    missing = api.get("/api/sessions/search")
    assert missing.status_code == 400 and missing.json()["error"] == "Missing q"


def test_session_get(api, world):
    row = shaped(api.get(f"/api/sessions/{world['tools']}").json(), SESSION_ROW)
    assert row["id"] == world["tools"] and row["turn_count"] == 2
    assert row["last_seq"] == world["done"][-1]["seq"] + 1  # its context_usage
    unknown = api.get("/api/sessions/sess_unknown")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "Session not found", "code": "session_not_found"}


def test_session_messages(api, world):
    resp = api.get(f"/api/sessions/{world['tools']}/messages")
    rows = resp.json()
    assert [m["role"] for m in rows] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    for row in rows:
        shaped(row, MESSAGE_ROW)
        assert ISO.match(row["created_at"])
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    user, calling, result, answer = rows[:4]
    assert user["content"] == "what time is it" and user["tool_calls"] is None
    (tool_call,) = json.loads(calling["tool_calls"])  # JSON text, as CortexPrism stores it
    assert tool_call["name"] == "current_time"
    assert answer["content"] == "It is noon." and answer["token_count"] == 2
    assert json.loads(result["tool_result"])["status"] == "ok"
    assert int(resp.headers["X-Last-Seq"]) == world["done"][-1]["seq"] + 1
    assert api.get("/api/sessions/sess_unknown/messages").status_code == 404


def test_session_stats(api, world, server):
    stats = api.get(f"/api/sessions/{world['tools']}/stats").json()
    # CortexPrism's figures and prismd's three, nothing else.
    assert set(stats) == set(STATS) | {"sessionId", "turns", "messages", "cost_known"}
    shaped(stats, {**STATS, "sessionId": str})
    assert stats["sessionId"] == world["tools"] and stats["llm_calls"] == 3
    failed = api.get(f"/api/sessions/{world['failed']}/stats").json()
    # Zeros where nothing was spent: the only turn failed before any token.
    assert (failed["tokens_in"], failed["tokens_out"], failed["cost_usd"]) == (0, 0, 0)
    assert failed["errors"] == 1 and failed["avg_duration_ms"] == 0


def _new_session(server: PrismdServer, text: str) -> str:
    with server.client() as c:
        return c.turn(message=text)[0]["sessionId"]


def test_session_actions_answer_ok(api, server):
    sid = _new_session(server, "actions")
    for action, status in [("close", "closed"), ("archive", "archived"), ("resume", "active")]:
        resp = api.post(f"/api/sessions/{sid}/{action}")
        assert resp.status_code == 200 and resp.json() == {"ok": True}, action
        assert api.get(f"/api/sessions/{sid}").json()["status"] == status
        assert api.post(f"/api/sessions/sess_unknown/{action}").status_code == 404
    renamed = api("PATCH", f"/api/sessions/{sid}", json={"name": "Renamed"})
    assert renamed.json() == {"ok": True}
    assert api.get(f"/api/sessions/{sid}").json()["name"] == "Renamed"
    assert api("DELETE", f"/api/sessions/{sid}").json() == {"ok": True}
    assert api("DELETE", f"/api/sessions/{sid}").status_code == 404


def test_session_retry_and_message_delete(api, server):
    with server.client() as c:
        sid = c.turn(message="first")[0]["sessionId"]
        c.turn(message="second", sessionId=sid)
    rows = api.get(f"/api/sessions/{sid}/messages").json()
    retried = api.post(f"/api/sessions/{sid}/retry").json()
    shaped(retried, {"success": bool, "sessionId": str, "message": str, "lastUserMessageId": str})
    assert retried["success"] is True and retried["sessionId"] == sid
    assert (retried["message"], retried["lastUserMessageId"]) == ("second", rows[2]["id"])
    deleted = api("DELETE", f"/api/sessions/{sid}/messages/{rows[1]['id']}").json()
    assert deleted == {"success": True, "messageId": rows[1]["id"]}
    assert api("DELETE", f"/api/sessions/{sid}/messages/{rows[0]['id']}").is_success
    nothing = api.post(f"/api/sessions/{sid}/retry")
    assert nothing.status_code == 400 and nothing.json()["error"]


# ---------------------------------------------------------------- agents


def test_agents(api):
    agents = api.get("/api/agents").json()
    assert [shaped(a, AGENT)["name"] for a in agents] == sorted(a["name"] for a in agents)
    assert agents[0]["id"] == "assistant" and agents[0]["builtin"] is True
    current = shaped(api.get("/api/agents/current").json(), {**AGENT, "isDefault": bool})
    assert current["id"] == "assistant" and current["isDefault"] is True
    assert (current["provider"], current["model"]) == ("openai", "gpt-4o-mini")
    assert shaped(api.get("/api/agents/assistant").json(), AGENT)["id"] == "assistant"
    assert api.get("/api/agents/nobody").status_code == 404


def test_agent_create_update_select_delete(api):
    created = api.post("/api/agents", json={"name": "Compat Bot", "systemPrompt": "Be brief."})
    assert created.status_code == 201
    agent = shaped(created.json(), AGENT)
    assert agent["id"] == "compat-bot" and agent["builtin"] is False
    updated = api("PUT", "/api/agents/compat-bot", json={"description": "Short answers"})
    assert shaped(updated.json(), AGENT)["description"] == "Short answers"
    assert api.post("/api/agents/compat-bot/select").json() == {"ok": True}
    assert api.get("/api/agents/current").json()["id"] == "compat-bot"
    assert api("DELETE", "/api/agents/compat-bot").json() == {"ok": True}
    assert api.get("/api/agents/current").json()["id"] == "assistant"


# ---------------------------------------------------------------- config, providers, tools


def test_config(api, fake_openai):
    config = api.get("/api/config").json()
    shaped(config, {"defaultProvider": str, "defaultAgent": str, "providers": dict})
    shaped(config, {"voice": dict, "server": dict})
    assert config["defaultProvider"] == "openai" and config["defaultAgent"] == "assistant"
    openai = config["providers"][config["defaultProvider"]]
    shaped(openai, {"kind": str, "model": str, "baseUrl": OPT_STR, "apiKey": OPT_STR})
    assert openai["model"] == "gpt-4o-mini" and openai["baseUrl"] == fake_openai.url
    assert "test-key" not in json.dumps(config)
    assert isinstance(config["voice"]["enabled"], bool)


def test_providers_configured_and_models(api):
    assert api.get("/api/providers/configured").json() == [
        {"kind": "openai", "model": "gpt-4o-mini"}
    ]
    for method in ("GET", "POST"):
        models = api(method, "/api/providers/openai/models").json()
        assert models == [{"id": "fake-model"}], method
        # A provider error (here: not configured) is an empty list, as in CortexPrism.
        assert api(method, "/api/providers/anthropic/models").json() == []


def test_tools_list_and_registry(api):
    names = api.get("/api/tools/list").json()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert {"current_time", "file_read", "shell"} <= set(names)
    registry = api.get("/api/tools/registry").json()
    assert [t["name"] for t in registry] == names
    fields = {"name": str, "description": str, "params": list, "capabilities": list}
    for tool in registry:
        shaped(tool, {**fields, "disabled": bool})
    clock = next(t for t in registry if t["name"] == "current_time")
    (param,) = clock["params"]
    shaped(param, {"name": str, "type": str, "description": str, "required": bool})
    assert (param["name"], param["type"], param["required"]) == ("timezone", "string", False)


# ---------------------------------------------------------------- uploads, voice


def test_upload_json_and_multipart(api, server):
    data = base64.b64encode(b"compat notes").decode()
    for kwargs in (
        {"json": {"filename": "n.txt", "mimeType": "text/plain", "data": data}},
        {"files": {"file": ("n.txt", b"compat notes", "text/plain")}},
    ):
        body = api.post("/api/upload", **kwargs).json()
        fields = {"ok": bool, "path": str, "filename": str, "mimeType": str, "id": str}
        shaped(body, fields)
        assert body["ok"] is True and body["filename"] == "n.txt"
        assert uploaded_bytes(server, body["path"]) == b"compat notes"
    with server.client() as c:  # prismd's `id`: the file is sent by reference
        frames = c.turn(message="read it", files=[{"fileId": body["id"]}])
    assert of_type(frames, "done")


def test_voice(api):
    providers = api.get("/api/voice/providers").json()
    for key in ("sttProviders", "ttsProviders", "openaiVoices", "elevenLabsVoices"):
        assert isinstance(providers[key], list), key
    audio = api.post("/api/voice/synthesize", json={"text": "Good morning."})
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
    assert audio.content[:3] == b"ID3" or audio.content[0] == 0xFF  # mp3, CortexPrism's default
    heard = api.post(
        "/api/voice/transcribe",
        files={"audio": ("hello.wav", (FIXTURES / "hello.wav").read_bytes(), "audio/wav")},
    ).json()
    shaped(heard, {"text": str, "confidence": NUM})
    assert heard["text"].strip()


# ---------------------------------------------------------------- auth


def test_auth_routes(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai), start=False)
    add_user(srv.home, "alice")
    srv.start()
    api = Api(srv)
    anon = {"authenticated": False, "hasPassword": True, "requireAuth": True}
    assert anon.items() <= api.get("/api/auth/status").json().items()
    assert api.get("/api/auth/check").json() == {"authenticated": False}
    login = {"username": "alice", "password": PASSWORDS["alice"]}
    ok = api.post("/api/auth/login", json=login)
    body = shaped(ok.json(), {"success": bool, "sessionId": str, "user": dict})
    assert body["success"] is True and body["user"]["username"] == "alice"
    assert ok.cookies["prismd_session"]
    status = api.get("/api/auth/status").json()
    assert status["authenticated"] is True and status["user"]["username"] == "alice"
    assert api.get("/api/auth/check").json()["user"]["username"] == "alice"
    out = api.post("/api/auth/logout")
    assert out.json() == {"success": True} and 'prismd_session=""' in out.headers["set-cookie"]
    # CortexPrism's single-password login: no username means the admin.
    single = api.post("/api/auth/login", json={"password": PASSWORDS["alice"]})
    assert single.json()["user"]["username"] == "alice"
    for _ in range(5):
        wrong = api.post("/api/auth/login", json={**login, "password": "wrong"})
        assert wrong.status_code == 401 and set(wrong.json()) == {"error", "code"}
    limited = api.post("/api/auth/login", json={**login, "password": "wrong"})
    assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
    api.http.close()
