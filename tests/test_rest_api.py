"""The REST API beyond listing: session management, retry, agents, config, providers, uploads,
version and /metrics — over real HTTP against a real server process (open loopback mode)."""

from __future__ import annotations

import re
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prismd.testing.fake_models import Reply

from .conftest import free_port, of_type, openai_env, uploaded_bytes

# Run in both configurations: one process on SQLite, and PostgreSQL + Redis (conftest.py).
BACKENDS = ("embedded", "scaled")


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=15)


def _user_texts(request: dict) -> list[str]:
    texts = []
    for m in request["messages"]:
        if m["role"] == "user":
            content = m["content"]
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content)
            texts.append(content)
    return texts


def test_version(server):
    assert server.get("/api/version").json() == {
        "version": server.get("/api/health").json()["version"],
        "protocol": 1,
    }


def test_rename_search_close_archive(server):
    with server.client() as c:
        sid = c.turn(message="to be renamed")[0]["sessionId"]
    with _http(server) as h:
        renamed = h.patch(f"/api/sessions/{sid}", json={"name": "Quarterly plan ✓"})
        assert renamed.status_code == 200 and renamed.json() == {"ok": True}
        assert h.get(f"/api/sessions/{sid}").json()["name"] == "Quarterly plan ✓"
        found = h.get("/api/sessions", params={"q": "quarterly"}).json()
        assert [s["id"] for s in found] == [sid]
        assert [s["id"] for s in h.get("/api/sessions/search?q=QUARTERLY").json()] == [sid]
        assert h.get("/api/sessions", params={"q": "100%_"}).json() == []
        assert h.post(f"/api/sessions/{sid}/close").json() == {"ok": True}
        assert h.get(f"/api/sessions/{sid}").json()["status"] == "closed"
        visible = "/api/sessions?status=visible&limit=500"
        assert sid in [s["id"] for s in h.get(visible).json()]
        assert h.post(f"/api/sessions/{sid}/archive").json() == {"ok": True}
        assert h.get(f"/api/sessions/{sid}").json()["status"] == "archived"
        assert sid not in [s["id"] for s in h.get(visible).json()]
        only = h.get("/api/sessions?status=archived&limit=500").json()
        assert sid in [s["id"] for s in only] and {s["status"] for s in only} == {"archived"}
        # CortexPrism's listing (no status given) holds every status, archived included.
        assert sid in [s["id"] for s in h.get("/api/sessions?limit=500").json()]
        assert sid in [s["id"] for s in h.get("/api/sessions?status=all&limit=500").json()]
        assert h.get("/api/sessions?status=bogus").status_code == 422
        assert h.patch(f"/api/sessions/{sid}", json={"name": 5}).json()["code"] == "invalid_message"
        assert h.post(f"/api/sessions/{sid}/resume").json() == {"ok": True}
        assert h.get(f"/api/sessions/{sid}").json()["status"] == "active"
        assert h.patch("/api/sessions/sess_nope", json={"name": "x"}).status_code == 404


def test_stats(server):
    with server.client() as c:
        frames = c.turn(message="one")
        sid = frames[0]["sessionId"]
        done = [
            of_type(frames, "done")[0],
            of_type(c.turn(message="two", sessionId=sid), "done")[0],
        ]
    stats = server.get(f"/api/sessions/{sid}/stats").json()
    one = server.get(f"/api/sessions/{sid}").json()
    assert stats["sessionId"] == sid
    assert stats["turns"] == 2 and stats["messages"] == 4 and stats["llm_calls"] == 2
    assert stats["tool_calls"] == 0 and stats["errors"] == 0
    assert stats["tokens_in"] == one["tokens_in"] == sum(d["tokensIn"] for d in done)
    assert stats["tokens_out"] == one["tokens_out"] == sum(d["tokensOut"] for d in done) > 0
    assert stats["total_tokens"] == stats["tokens_in"] + stats["tokens_out"]
    assert stats["cost_usd"] > 0
    assert stats["cost_usd"] == pytest.approx(sum(d["costUsd"] for d in done))
    assert stats["cost_known"] is True
    llm_ms = sum(d["latency"]["llmMs"] for d in done) / sum(d["rounds"] for d in done)
    assert stats["avg_duration_ms"] == round(llm_ms)


def test_retry_drops_the_last_exchange_and_the_model_no_longer_sees_it(server, fake_openai):
    with server.client() as c:
        sid = c.turn(message="first question")[0]["sessionId"]
        c.turn(message="second question", sessionId=sid)
        with _http(server) as h:
            before = h.get(f"/api/sessions/{sid}/messages").json()
            resp = h.post(f"/api/sessions/{sid}/retry")
            assert resp.status_code == 200
            assert resp.json() == {
                "success": True,
                "sessionId": sid,
                "message": "second question",
                "lastUserMessageId": before[2]["id"],
                "files": [],
            }
            texts = [m["content"] for m in h.get(f"/api/sessions/{sid}/messages").json()]
            assert texts[0] == "first question" and len(texts) == 2
        # The live session (still bound) sends the model the history without the dropped turn.
        c.turn(message="edited second question", sessionId=sid, clientMessageId="cm-2")
    assert _user_texts(fake_openai.requests[-1]) == ["first question", "edited second question"]
    # Also once the session is evicted and loaded again from the database.
    with _http(server) as h:
        assert h.post(f"/api/sessions/{sid}/retry").json()["message"] == "edited second question"
    with server.client() as c:  # the same clientMessageId is a new turn after a retry
        frames = c.turn(message="third try", sessionId=sid, clientMessageId="cm-2")
    assert of_type(frames, "done")
    assert _user_texts(fake_openai.requests[-1]) == ["first question", "third try"]


def test_retry_returns_files_as_uploads_and_refuses_during_a_turn(server, fake_openai):
    import base64

    data = base64.b64encode(b"notes: the colour is teal").decode()
    with server.client() as c:
        sid = c.turn(
            message="read this",
            files=[{"filename": "n.txt", "mimeType": "text/plain", "data": data}],
        )[0]["sessionId"]
        fake_openai.script(Reply(text=["slow"] * 20, delay_s=0.1), match="slowly")
        c.send(type="chat", message="answer slowly", sessionId=sid)
        c.until("chunk")
        with _http(server) as h:
            busy = h.post(f"/api/sessions/{sid}/retry")
            assert busy.status_code == 409 and busy.json()["code"] == "turn_in_progress"
            messages = h.get(f"/api/sessions/{sid}/messages").json()
            deleted = h.delete(f"/api/sessions/{sid}/messages/{messages[0]['id']}")
            assert deleted.status_code == 409 and deleted.json()["code"] == "turn_in_progress"
        c.until_turn_end()
    with _http(server) as h:
        h.post(f"/api/sessions/{sid}/retry")  # drops "answer slowly"
        again = h.post(f"/api/sessions/{sid}/retry").json()
        assert again["message"] == "read this"
        (f,) = again["files"]
        assert f["filename"] == "n.txt" and f["mimeType"] == "text/plain" and f["size"] == 25
        empty = h.post(f"/api/sessions/{sid}/retry")  # nothing left
        assert empty.status_code == 400 and empty.json()["code"] == "invalid_message"
    with server.client() as c:  # resend the file by its id
        c.turn(message="read this again", sessionId=sid, files=[{"fileId": f["id"]}])
    sent = str(fake_openai.requests[-1]["messages"])
    assert "the colour is teal" in sent


def test_delete_one_message(server, fake_openai):
    with server.client() as c:
        sid = c.turn(message="forget me")[0]["sessionId"]
        c.turn(message="keep me", sessionId=sid)
        with _http(server) as h:
            messages = h.get(f"/api/sessions/{sid}/messages").json()
            first = messages[0]["id"]
            deleted = h.delete(f"/api/sessions/{sid}/messages/{first}")
            assert deleted.status_code == 200
            assert deleted.json() == {"success": True, "messageId": first}
            missing = h.delete(f"/api/sessions/{sid}/messages/{first}")
            assert missing.status_code == 404
            left = h.get(f"/api/sessions/{sid}/messages").json()
            assert [m["id"] for m in left] == [m["id"] for m in messages[1:]]
        c.turn(message="and now", sessionId=sid)
    assert _user_texts(fake_openai.requests[-1]) == ["keep me", "and now"]


def test_agents_create_use_select_update_delete(server, fake_openai):
    with _http(server) as h:
        body = {
            "id": "pirate",
            "name": "Pirate",
            "description": "Talks like one",
            "systemPrompt": "Speak like a pirate.",
            "temperature": 0.3,
            "tools": [],
        }
        created = h.post("/api/agents", json=body)
        assert created.status_code == 201, created.text
        agent = created.json()
        assert agent["id"] == "pirate" and agent["builtin"] is False and agent["tools"] == []
        assert agent["ownerId"] == "local" and agent["default"] is False
        assert h.post("/api/agents", json=body).status_code == 409
        bad = h.post("/api/agents", json={**body, "id": "bad id"})
        assert bad.status_code == 422 and bad.json()["details"]["field"] == "id"
        unknown = h.post("/api/agents", json={"name": "Iconic", "icon": "🦜"})
        assert unknown.status_code == 422 and unknown.json()["details"]["field"] == "icon"
        # Without an id, one is made from the name, as CortexPrism does.
        named = h.post("/api/agents", json={"name": "Sea Dog 2"})
        assert named.status_code == 201 and named.json()["id"] == "sea-dog-2"
        listed = h.get("/api/agents").json()
        assert [a["name"] for a in listed] == ["Assistant", "Pirate", "Sea Dog 2"]
        assert h.delete("/api/agents/sea-dog-2").json() == {"ok": True}
        assert h.get("/api/agents/pirate").json()["systemPrompt"] == "Speak like a pirate."
        assert h.get("/api/agents/nobody").json()["code"] == "agent_not_found"
    with server.client() as c:
        frames = c.turn(message="ahoy", agentId="pirate")
        assert frames[0]["agentId"] == "pirate" and frames[0]["agentName"] == "Pirate"
        c.send(type="select_agent", agentId="pirate")
        assert c.recv()["type"] == "agent_selected"
    request = fake_openai.requests[-1]
    assert request["messages"][0]["content"].startswith("Speak like a pirate.")
    assert request["temperature"] == 0.3
    with _http(server) as h:
        current = h.get("/api/agents/current").json()
        assert current["id"] == "assistant" and current["isDefault"] is True
        assert current["provider"] == "openai" and current["model"] == "gpt-4o-mini"
        assert h.post("/api/agents/pirate/select").json() == {"ok": True}
        current = h.get("/api/agents/current").json()
        assert current["id"] == "pirate" and current["isDefault"] is False
        assert [a["id"] for a in h.get("/api/agents").json() if a["default"]] == ["pirate"]
    with server.client() as c:  # a chat without agentId runs as the selected default
        assert c.turn(message="who are you")[0]["agentId"] == "pirate"
    with _http(server) as h:
        patched = h.put("/api/agents/pirate", json={"name": "Captain", "temperature": 1.1})
        assert patched.json()["name"] == "Captain" and patched.json()["temperature"] == 1.1
        assert patched.json()["systemPrompt"] == "Speak like a pirate."
        patched = h.patch("/api/agents/pirate", json={"description": "Arr"})
        assert patched.json()["description"] == "Arr" and patched.json()["name"] == "Captain"
        assert h.put("/api/agents/pirate", json={"temperature": 9}).status_code == 422
        refused = h.delete("/api/agents/assistant")
        assert refused.status_code == 403 and refused.json()["code"]
        assert h.put("/api/agents/assistant", json={"name": "x"}).status_code == 403
        deleted = h.delete("/api/agents/pirate")
        assert deleted.status_code == 200 and deleted.json() == {"ok": True}
        assert h.get("/api/agents/pirate").status_code == 404
        assert h.get("/api/agents/current").json()["id"] == "assistant"
    with server.client() as c:
        assert c.turn(message="back to default")[0]["agentId"] == "assistant"


def test_created_agents_and_uploads_survive_a_restart(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai))
    with _http(srv) as h:
        assert h.post("/api/agents", json={"id": "keeper", "name": "Keeper"}).status_code == 201
        up = h.post("/api/upload", files={"file": ("k.md", b"# kept", "text/markdown")}).json()
        h.post("/api/agents/keeper/select")
    srv.restart()
    with _http(srv) as h:
        assert h.get("/api/agents/keeper").json()["name"] == "Keeper"
        assert h.get("/api/agents/current").json()["id"] == "keeper"
    with srv.client() as c:
        frames = c.turn(message="use it", files=[{"fileId": up["id"]}])
        assert frames[0]["agentId"] == "keeper" and frames[-1]["type"] == "context_usage"
    assert "# kept" in str(fake_openai.requests[-1]["messages"])


def test_upload_checks(server):
    with _http(server) as h:
        up = h.post("/api/upload", files={"file": ("../../etc/x.txt", b"hello", "text/plain")})
        assert up.status_code == 201
        meta = up.json()
        assert meta == {
            "ok": True,
            "path": f"uploads/local/{meta['id']}",
            "filename": "x.txt",
            "mimeType": "text/plain",
            "id": meta["id"],
            "size": 5,
        }
        assert uploaded_bytes(server, meta["path"]) == b"hello"
        assert h.post("/api/upload", data={"x": "1"}).status_code == 422
        # CortexPrism's clients send JSON with base64 data.
        sent = {"filename": "n.md", "mimeType": "text/markdown", "data": "IyBub3Rl"}
        as_json = h.post("/api/upload", json=sent)
        assert as_json.status_code == 201, as_json.text
        assert as_json.json()["filename"] == "n.md" and as_json.json()["size"] == 6
        assert uploaded_bytes(server, as_json.json()["path"]) == b"# note"
        bad = h.post("/api/upload", json={**sent, "data": "not base64!"})
        assert bad.status_code == 422 and bad.json()["details"]["field"] == "data"
        missing = h.post("/api/upload", json={"mimeType": "text/plain", "data": ""})
        assert missing.status_code == 422 and missing.json()["details"]["field"] == "filename"
    with server.client() as c:
        c.send(type="chat", message="x", files=[{"fileId": "upl_missing"}])
        err = c.recv()
        assert err["code"] == "invalid_message" and err["details"]["field"] == "files.0.fileId"
        c.send(type="chat", message="x", files=[{"fileId": meta["id"], "data": "aGk="}])
        assert c.recv()["code"] == "invalid_message"


def test_upload_size_limit(make_server, fake_openai):
    srv = make_server(openai_env(fake_openai), "[server]\nmax_file_bytes = 1000\n")
    with _http(srv) as h:
        big = h.post("/api/upload", files={"file": ("big.bin", b"x" * 1001)})
        assert big.status_code == 413 and big.json()["code"] == "payload_too_large"
        assert h.post("/api/upload", files={"file": ("ok.bin", b"x" * 1000)}).status_code == 201


def test_request_bodies_are_capped_while_they_arrive(make_server, fake_openai):
    """Multipart spools file parts to disk before a route can check them: the cap (the largest
    accepted file or recording plus 1 MiB) applies to the body itself, declared or chunked."""
    config = "[server]\nmax_file_bytes = 1000\n[voice]\nmax_audio_bytes = 1024\n"
    srv = make_server(openai_env(fake_openai), config)
    huge = b"x" * (3 * 1024 * 1024)
    with _http(srv) as h:
        declared = h.post("/api/upload", files={"file": ("big.bin", huge)})
        assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"

        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + huge + b"\r\n--XyZ--\r\n"
        )

        def chunks():  # no Content-Length: sent chunked
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        chunked = h.post(
            "/api/upload",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
        )
        assert chunked.status_code == 413 and chunked.json()["code"] == "payload_too_large"
        assert h.post("/api/upload", files={"file": ("ok.bin", b"x" * 1000)}).status_code == 201


def test_config_masks_credentials_inside_urls():
    from prismd.server.config_api import MASK, _mask

    masked = _mask(
        {
            "base_url": "https://user:pw@llm.example/v1?key=abc&x",
            "mcp": [{"url": "http://127.0.0.1:9/mcp?token=t"}],
            "plain": "http://127.0.0.1:11434/v1",
        }
    )
    assert masked["base_url"] == f"https://{MASK}@llm.example/v1?key={MASK}&x"
    assert masked["mcp"][0]["url"] == f"http://127.0.0.1:9/mcp?token={MASK}"
    assert masked["plain"] == "http://127.0.0.1:11434/v1"


def test_config_get_masks_secrets_and_patch_persists(make_server, fake_openai):
    long_key = "sk-ant-0123456789abcdefghijWXYZ"
    config = (
        f'[providers.anthropic]\napi_key = "{long_key}"\n# a comment\n'
        '[providers.ollama]\napi_key = "sk-ant-secret"\nbase_url = "http://u:pw@127.0.0.1:9/v1"\n'
    )
    srv = make_server(openai_env(fake_openai), config)
    with _http(srv) as h:
        body = h.get("/api/config").json()
        # CortexPrism's shape: keys as "sk-ant...WXYZ", a short one (or credentials in a URL)
        # not at all.
        assert body["defaultProvider"] == "openai" and body["defaultAgent"] == "assistant"
        assert body["providers"]["anthropic"]["apiKey"] == "sk-ant...WXYZ"
        listed = {p["kind"]: p for p in h.get("/api/providers").json()["providers"]}
        assert body["providers"]["anthropic"]["model"] == listed["anthropic"]["model"]
        assert body["providers"]["ollama"]["apiKey"] == "••••"
        assert body["providers"]["ollama"]["baseUrl"] == "http://••••@127.0.0.1:9/v1"
        # Any user reads /api/providers: its URLs are masked the same way.
        assert listed["ollama"]["baseUrl"] == "http://••••@127.0.0.1:9/v1"
        assert body["providers"]["openai"] == {
            "kind": "openai",
            "model": "gpt-4o-mini",
            "baseUrl": fake_openai.url,
            "apiKey": "••••",
            "contextWindow": None,
            "maxTokens": 4096,
        }
        assert body["voice"]["enabled"] is True and body["voice"]["sttProvider"] == "whisper"
        assert body["settings"]["providers"]["anthropic"]["api_key"] == "••••"
        text = h.get("/api/config").text
        assert long_key[6:-4] not in text and "sk-ant-secret" not in text and ":pw@" not in text
        assert "test-key" not in text  # OPENAI_API_KEY from the env
        assert "tools.max_rounds" in body["runtimeKeys"]
        patched = h.patch("/api/config", json={"tools": {"max_rounds": 3}, "model": "gpt-x"})
        assert patched.status_code == 200, patched.text
        assert patched.json()["settings"]["tools"]["max_rounds"] == 3
        assert patched.json()["providers"]["openai"]["model"] == "gpt-x"
        bad = h.patch("/api/config", json={"tools.max_rounds": 0})
        assert bad.status_code == 422 and bad.json()["details"]["field"] == "tools.max_rounds"
        frozen = h.patch("/api/config", json={"server": {"port": 1}})
        assert frozen.status_code == 422 and frozen.json()["details"]["field"] == "server.port"
        unknown = h.patch("/api/config", json={"default_agent": "nobody"})
        assert unknown.status_code == 422 and unknown.json()["details"]["field"] == "default_agent"
    written = tomllib.loads((srv.home / "config.toml").read_text())
    assert written["tools"]["max_rounds"] == 3 and written["model"] == "gpt-x"
    assert written["providers"]["anthropic"]["api_key"] == long_key  # kept, unmasked
    # PRISMD_MODEL from the environment still wins over the file after a restart: drop it.
    srv.env.pop("PRISMD_MODEL")
    srv.restart()
    with _http(srv) as h:
        cfg = h.get("/api/config").json()["settings"]
        assert cfg["tools"]["max_rounds"] == 3 and cfg["model"] == "gpt-x"
    with srv.client() as c:
        done = of_type(c.turn(message="which model"), "done")[0]
    assert done["resolvedModel"] == "gpt-x"


def test_config_patches_are_written_one_at_a_time(make_server, fake_openai):
    """Concurrent PATCHes (the file is written in a thread, off the event loop): every change
    is in the file and in the running settings; a file that cannot be written is a coded
    refusal, and nothing of that change is applied."""
    srv = make_server({k: v for k, v in openai_env(fake_openai).items() if k != "PRISMD_MODEL"})
    changes = {
        "tools.max_rounds": 7,
        "tools.approval_timeout_s": 33.5,
        "tools.max_output_chars": 5000,
        "tools.display_output_chars": 1234,
        "providers.openai.model": "gpt-a",
        "model": "gpt-b",
    }
    barrier = threading.Barrier(len(changes))

    def patch(item: tuple[str, object]) -> httpx.Response:
        with _http(srv) as h:
            barrier.wait(10)
            return h.patch("/api/config", json=dict([item]))

    with ThreadPoolExecutor(len(changes)) as pool:
        responses = list(pool.map(patch, changes.items()))
    assert [r.status_code for r in responses] == [200] * len(changes), [r.text for r in responses]
    written = tomllib.loads((srv.home / "config.toml").read_text())
    with _http(srv) as h:
        running = h.get("/api/config").json()["settings"]
    for key, value in changes.items():
        node_file, node_run = written, running
        for part in key.split("."):
            node_file, node_run = node_file[part], node_run[part]
        assert node_file == node_run == value, key
    (srv.home / "config.toml.tmp").mkdir()  # the write fails (even as root)
    with _http(srv) as h:
        refused = h.patch("/api/config", json={"tools.max_rounds": 2})
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_message"
        assert refused.json()["details"]["field"] == "(file)"
        assert "cannot write" in refused.json()["details"]["reason"]
        assert h.get("/api/config").json()["settings"]["tools"]["max_rounds"] == 7
    assert tomllib.loads((srv.home / "config.toml").read_text())["tools"]["max_rounds"] == 7


def test_config_patch_applies_at_once(make_server, fake_openai):
    srv = make_server({k: v for k, v in openai_env(fake_openai).items() if k != "PRISMD_MODEL"})
    with _http(srv) as h:
        assert (
            h.patch("/api/config", json={"providers.openai.model": "gpt-live"}).status_code == 200
        )
    with srv.client() as c:
        assert of_type(c.turn(message="now"), "done")[0]["resolvedModel"] == "gpt-live"


def test_providers_and_models(server, fake_openai):
    with _http(server) as h:
        body = h.get("/api/providers").json()
        assert body["default"] == "openai"
        kinds = {p["kind"]: p for p in body["providers"]}
        assert set(kinds) == {"openai", "anthropic", "ollama", "local"}
        assert kinds["local"]["configured"] is False  # the fixtures turn the offline default off
        assert kinds["openai"]["configured"] is True
        assert kinds["openai"]["baseUrl"] == fake_openai.url
        assert kinds["openai"]["model"] == "gpt-4o-mini"
        assert kinds["anthropic"]["configured"] is False
        first = h.get("/api/providers/openai/models")
        assert first.json() == [{"id": "fake-model"}]
        assert first.headers["X-Prismd-Cached"] == "false"
        again = h.get("/api/providers/openai/models")
        assert again.json() == [{"id": "fake-model"}] and again.headers["X-Prismd-Cached"] == "true"
        posted = h.post("/api/providers/openai/models")
        assert posted.json() == [{"id": "fake-model"}]
        # CortexPrism answers [] when the models cannot be listed; prismd says why in headers.
        nope = h.get("/api/providers/nope/models")
        assert nope.status_code == 200 and nope.json() == []
        assert nope.headers["X-Prismd-Error"] == "not_found"
        unconfigured = h.get("/api/providers/anthropic/models")
        assert unconfigured.status_code == 200 and unconfigured.json() == []
        assert unconfigured.headers["X-Prismd-Error"] == "provider_unconfigured"
        assert "ANTHROPIC_API_KEY" in unconfigured.headers["X-Prismd-Error-Detail"]
        configured = h.get("/api/providers/configured").json()
        assert configured == [{"kind": "openai", "model": "gpt-4o-mini"}]
        # Credentials not saved yet (an admin trying them): listed with those, nothing kept.
        trial = {"apiKey": "another-key", "baseUrl": fake_openai.url}
        assert h.post("/api/providers/anthropic/models", json=trial).json() == []
        tried = h.post("/api/providers/openai/models", json=trial)
        assert tried.json() == [{"id": "fake-model"}] and "X-Prismd-Cached" not in tried.headers
        dead = {"apiKey": "k", "baseUrl": f"http://127.0.0.1:{free_port()}/v1"}
        failed = h.post("/api/providers/openai/models", json=dead)
        assert failed.json() == [] and failed.headers["X-Prismd-Error"] == "provider_error"
        assert h.get("/api/providers/openai/models").headers["X-Prismd-Cached"] == "true"


def test_metrics(server, fake_openai):
    with server.client() as c:
        c.turn(message="count me")
        c.send_raw("{not json")
        assert c.recv()["code"] == "invalid_json"
        text = server.get("/metrics").text
        assert "prismd_open_connections 1.0" in text or re.search(
            r"^prismd_open_connections [1-9]", text, re.M
        )
    assert re.search(
        r'^prismd_turns_total\{agent="assistant",stop_reason="end"\} [1-9]', text, re.M
    )
    assert re.search(r'^prismd_tokens_in_total\{agent="assistant"\} [1-9]', text, re.M)
    assert re.search(r'^prismd_tokens_out_total\{agent="assistant"\} [1-9]', text, re.M)
    assert re.search(r"^prismd_turn_duration_seconds_count [1-9]", text, re.M)
    assert re.search(r"^prismd_turn_duration_seconds_bucket\{le=", text, re.M)
    assert re.search(r'^prismd_errors_total\{code="invalid_json"\} [1-9]', text, re.M)
    assert "prismd_cost_usd_total" in text
    assert server.get("/metrics").headers["content-type"].startswith("text/plain")


def test_metrics_count_failed_turns(server, fake_openai):
    fake_openai.script(Reply(status=400, text="bad request from the fake"), match="fail please")
    with server.client() as c:
        frames = c.turn(message="fail please")
        assert frames[-1]["type"] == "error"
    text = server.get("/metrics").text
    assert re.search(
        r'^prismd_turns_total\{agent="assistant",stop_reason="error"\} [1-9]', text, re.M
    )
    assert re.search(r'^prismd_errors_total\{code="provider_error"\} [1-9]', text, re.M)


def test_every_route_is_documented(server):
    schema = server.get("/openapi.json").json()
    expected = {
        ("get", "/api/health"),
        ("get", "/api/status"),
        ("get", "/api/auth/status"),
        ("get", "/api/auth/check"),
        ("post", "/api/auth/login"),
        ("post", "/api/auth/logout"),
        ("get", "/api/auth/me"),
        ("get", "/api/sessions"),
        ("get", "/api/sessions/enriched"),
        ("get", "/api/sessions/tree"),
        ("get", "/api/sessions/search"),
        ("get", "/api/sessions/{session_id}"),
        ("get", "/api/sessions/{session_id}/messages"),
        ("patch", "/api/sessions/{session_id}"),
        ("delete", "/api/sessions/{session_id}"),
        ("post", "/api/sessions/{session_id}/resume"),
        ("post", "/api/sessions/{session_id}/close"),
        ("post", "/api/sessions/{session_id}/archive"),
        ("post", "/api/sessions/{session_id}/retry"),
        ("delete", "/api/sessions/{session_id}/messages/{message_id}"),
        ("get", "/api/sessions/{session_id}/stats"),
        ("get", "/api/agents"),
        ("get", "/api/agents/current"),
        ("get", "/api/agents/{agent_id}"),
        ("post", "/api/agents"),
        ("put", "/api/agents/{agent_id}"),
        ("patch", "/api/agents/{agent_id}"),
        ("delete", "/api/agents/{agent_id}"),
        ("post", "/api/agents/{agent_id}/select"),
        ("get", "/api/config"),
        ("patch", "/api/config"),
        ("get", "/api/providers"),
        ("get", "/api/providers/configured"),
        ("get", "/api/providers/{kind}/models"),
        ("post", "/api/providers/{kind}/models"),
        ("get", "/api/tools"),
        ("get", "/api/tools/list"),
        ("get", "/api/tools/registry"),
        ("get", "/api/plugins/panels"),
        ("post", "/api/upload"),
        ("get", "/api/voice/providers"),
        ("get", "/api/version"),
        ("get", "/metrics"),
    }
    have = {(m, p) for p, item in schema["paths"].items() for m in item}
    assert expected <= have, expected - have
    for path, item in schema["paths"].items():
        if not path.startswith(("/api/", "/metrics")) or path.startswith("/api/voice"):
            continue  # (the web app's and the voice module's routes are tested with them)
        for method, op in item.items():
            assert op.get("summary"), (method, path)
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert ok, (method, path)
            open_paths = ("/api/auth/status", "/api/auth/check", "/api/health")
            if path.startswith("/api/") and path not in open_paths:
                assert "401" in op["responses"], (method, path)


def test_concurrent_retry_and_chat_never_corrupt_history(server, fake_openai):
    """A retry racing a chat drops a whole exchange or is refused; never half of one."""
    with server.client() as c:
        sid = c.turn(message="base")[0]["sessionId"]
        c.turn(message="racy", sessionId=sid)
        results: list[int] = []

        def retry() -> None:
            results.append(httpx.post(f"{server.url}/api/sessions/{sid}/retry").status_code)

        t = threading.Thread(target=retry)
        t.start()
        frames = c.turn(message="concurrent", sessionId=sid)
        t.join()
    assert frames[-1]["type"] == "context_usage"
    # (The messages route waits for the session's writes: it reads what the turns stored.)
    texts = [m["content"] for m in server.get(f"/api/sessions/{sid}/messages").json()]
    user = [t for t in texts if not t.startswith("You said")]
    # Before the chat: "racy" dropped; during it: refused; after it: "concurrent" dropped.
    outcomes = {
        200: (["base", "concurrent"], ["base", "racy"]),
        409: (["base", "racy", "concurrent"],),
    }
    assert user in outcomes[results[0]], (results, texts)
    assert len(texts) == 2 * len(user)  # every kept question kept its answer


def test_models_of_anthropic_and_ollama(make_server, fake_anthropic, fake_openai):
    srv = make_server(
        {
            "ANTHROPIC_BASE_URL": fake_anthropic.url,
            "ANTHROPIC_API_KEY": "test",
            "OLLAMA_BASE_URL": fake_openai.url.removesuffix("/v1"),
        }
    )
    with _http(srv) as h:
        providers = h.get("/api/providers").json()
        assert providers["default"] == "anthropic"
        assert h.get("/api/status").json()["model"] == "claude-sonnet-4-5"
        kinds = {p["kind"]: p for p in providers["providers"]}
        assert kinds["anthropic"]["configured"] is True
        assert kinds["ollama"]["configured"] is True
        assert kinds["openai"]["configured"] is False
        assert h.get("/api/providers/anthropic/models").json() == [{"id": "fake-model"}]
        assert h.get("/api/providers/ollama/models").json() == [{"id": "fake-model"}]
        unconfigured = h.get("/api/providers/openai/models")
        assert unconfigured.json() == []
        assert unconfigured.headers["X-Prismd-Error"] == "provider_unconfigured"
