"""The web app at `/` in a real browser, against a real prismd and the scripted fake model."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time

import httpx
from playwright.sync_api import Page, expect

from prismd.testing.fake_models import FakeModelServer, Reply
from tests.conftest import PrismdServer, openai_env

from .conftest import Console


def call(name: str, args: dict, call_id: str = "call_1") -> dict:
    return {"id": call_id, "name": name, "arguments": json.dumps(args)}


def open_app(page: Page, server: PrismdServer) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#conn.up")).to_have_count(1)


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def last_answer(page: Page):  # noqa: ANN201 - a Locator
    return page.locator("#messages-inner .msg.assistant").last


def wait_done(page: Page) -> None:
    expect(page.locator("#messages-inner .msg.assistant.streaming")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()


def user_texts(fake: FakeModelServer) -> list[str]:
    texts = []
    for req in fake.requests:
        for m in req.get("messages", []):
            if m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                texts.append(content or "")
    return texts


# ---------------------------------------------------------------------------- headers


def test_security_headers_on_every_app_response(web_server: PrismdServer) -> None:
    for path, kind in [
        ("/", "text/html"),
        ("/static/js/main.js", "text/javascript"),
        ("/static/app.css", "text/css"),
        ("/static/vendor/purify.es.mjs", "text/javascript"),
    ]:
        r = httpx.get(web_server.url + path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(kind), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "default-src 'self'" in csp
        assert "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        head = httpx.head(web_server.url + path)  # monitors and link checkers send HEAD
        assert head.status_code == 200 and head.headers["content-security-policy"] == csp, path
    for bad in ["/static/../server/web.py", "/static/%2e%2e/server/web.py", "/static/nope.js"]:
        r = httpx.get(web_server.url + bad)
        assert r.status_code == 404, bad
        assert "import" not in r.text
    html = httpx.get(web_server.url + "/").text
    # No inline script and no inline style attribute in the page itself.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert " style=" not in html and "<style" not in html


# ---------------------------------------------------------------------------- chat


def test_answer_streams_as_markdown_with_highlighted_code(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    pieces = ["Here is ", "**bold** text", " and code:\n\n", "```python\n", "def hi():\n"]
    pieces += ["    return 42\n", "```\n"]
    fake_openai.script(Reply(text=pieces, delay_s=0.3), match="stream please")
    open_app(page, web_server)
    send(page, "stream please")
    answer = last_answer(page)
    # Seen while still streaming: part of the answer, and the streaming state.
    expect(answer.locator(".md")).to_contain_text("Here is")
    expect(answer).to_have_class(re.compile(r"\bstreaming\b"))
    wait_done(page)
    expect(answer.locator(".md strong")).to_have_text("bold")
    code = answer.locator(".code-block code")
    expect(code).to_contain_text("return 42")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(answer.locator(".code-block .copy-code")).to_have_text("Copy")
    answer.locator(".code-block .copy-code").click()
    expect(answer.locator(".code-block .copy-code")).to_have_text("Copied")
    assert "def hi():" in page.evaluate("navigator.clipboard.readText()")
    expect(answer.locator(".turn-meta")).to_contain_text("in ·")
    expect(page.locator("#context-meter")).to_be_visible()
    # The new chat is in the sidebar, active.
    expect(page.locator(".session-item.active")).to_have_count(1)


def test_reload_mid_answer_shows_the_whole_answer_once(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    words = [f"w{i:02d} " for i in range(40)]
    fake_openai.script(Reply(text=words, delay_s=0.08), match="long answer")
    open_app(page, web_server)
    send(page, "long answer")
    expect(last_answer(page).locator(".md")).to_contain_text("w05")
    page.reload()
    expect(page.locator("#chat-view")).to_be_visible()
    # The turn in progress is replayed from its start and continues live.
    expect(last_answer(page).locator(".md")).to_contain_text("w39", timeout=15_000)
    wait_done(page)
    text = last_answer(page).locator(".md").inner_text()
    assert text.split() == [w.strip() for w in words]
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(1)
    expect(page.locator("#messages-inner .msg.user")).to_have_count(1)
    # A second reload after the end shows the same, from the history.
    page.reload()
    expect(last_answer(page).locator(".md")).to_contain_text("w39")
    assert last_answer(page).locator(".md").inner_text().split() == [w.strip() for w in words]
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(1)


def test_dropped_connection_reconnects_and_replays_only_what_was_missed(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    words = [f"d{i:02d} " for i in range(40)]
    fake_openai.script(Reply(text=words, delay_s=0.08), match="drop me")
    resumes: list[dict] = []
    sockets = []

    def watch(ws) -> None:  # noqa: ANN001 - a playwright WebSocket
        sockets.append(ws)

        def sent(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "resume":
                resumes.append(frame)

        ws.on("framesent", sent)

    page.on("websocket", watch)
    open_app(page, web_server)
    send(page, "drop me")
    expect(last_answer(page).locator(".md")).to_contain_text("d05")
    page.evaluate("window.prismd.ws.close()")
    # (wait_for_function would need eval, which the app's CSP forbids: poll instead.)
    deadline = time.monotonic() + 10
    while not (len(sockets) == 2 and page.evaluate("window.prismd.ready")):
        assert time.monotonic() < deadline, "no reconnect"
        page.wait_for_timeout(50)
    expect(last_answer(page).locator(".md")).to_contain_text("d39", timeout=15_000)
    wait_done(page)
    assert last_answer(page).locator(".md").inner_text().split() == [w.strip() for w in words]
    assert resumes and resumes[-1].get("lastSeq", 0) > 0  # only the missed events


def test_resume_gap_reloads_the_history(
    page: Page,
    make_server,  # noqa: ANN001
    fake_openai: FakeModelServer,
) -> None:
    srv = make_server(openai_env(fake_openai), "[server]\nmax_events_per_session = 100\n")
    received: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: received.append(str(f))))
    open_app(page, srv)
    send(page, "first words")
    wait_done(page)
    sid = page.evaluate("window.prismd.sessionId")
    # The app goes offline (without a close it would reconnect from at once)…
    page.evaluate(
        "() => { const ws = window.prismd.ws; window.prismd.ws = null;"
        " window.prismd.ready = false; ws.close(); }"
    )
    # …while another client runs enough turns in its session to push its events out.
    with srv.client() as other:
        for i in range(30):
            other.turn(message=f"filler {i}", sessionId=sid)
    page.evaluate("window.dispatchEvent(new Event('online'))")
    # resume → resume_gap → the history is reloaded over REST.
    expect(page.locator("#messages-inner .msg.user")).to_have_count(31)
    expect(last_answer(page)).to_contain_text("You said: filler 29")
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(31)
    assert any('"resume_gap"' in str(frame) for frame in received)


def test_message_sent_while_offline_goes_out_on_reconnect(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    send(page, "online message")
    wait_done(page)
    page.evaluate(
        "() => { const ws = window.prismd.ws; window.prismd.ws = null;"
        " window.prismd.ready = false; ws.close(); }"
    )
    send(page, "offline message")
    expect(page.locator("#messages-inner .msg.user").last).to_have_text("offline message")
    page.wait_for_timeout(300)
    assert not any("offline message" in t for t in user_texts(fake_openai))
    page.evaluate("window.dispatchEvent(new Event('online'))")
    expect(last_answer(page)).to_contain_text("You said: offline message")
    wait_done(page)
    expect(page.locator("#messages-inner .msg.user")).to_have_text(
        ["online message", "offline message"]
    )
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(2)


def test_server_restart_reconnects_and_the_chat_goes_on(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    send(page, "before the restart")
    wait_done(page)
    web_server.restart()
    expect(page.locator("#conn.up")).to_have_count(1, timeout=20_000)
    send(page, "after the restart")
    wait_done(page)
    expect(page.locator("#messages-inner .msg.user")).to_have_text(
        ["before the restart", "after the restart"]
    )
    expect(last_answer(page)).to_contain_text("You said: after the restart")
    # The model saw the first exchange too: same session.
    last = json.dumps(fake_openai.requests[-1]["messages"])
    assert "before the restart" in last and "after the restart" in last


def test_stop_ends_the_answer_and_the_upstream_request(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    fake_openai.script(Reply(text=[f"s{i} " for i in range(200)], delay_s=0.05), match="go slow")
    open_app(page, web_server)
    send(page, "go slow")
    expect(last_answer(page).locator(".md")).to_contain_text("s3")
    page.keyboard.press("Escape")  # Esc stops, like the Stop button
    expect(last_answer(page).locator(".badge")).to_have_text("stopped")
    wait_done(page)
    assert fake_openai.wait_aborted(1)
    assert "s199" not in last_answer(page).inner_text()


def test_sessions_sidebar_switch_rename_delete_and_agent_picker(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    send(page, "first chat about apples")
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said: first chat about apples")
    page.locator("#new-chat").click()
    expect(page.locator("#empty-state")).to_be_visible()
    # Switch agent: the next chat runs as Coder (its system prompt reaches the model).
    page.locator("#agent-picker").select_option("coder")
    send(page, "second chat about pears")
    wait_done(page)
    system = fake_openai.requests[-1]["messages"][0]
    assert system["role"] == "system" and "careful senior engineer" in system["content"]
    expect(page.locator(".session-item.active")).to_have_count(1)
    assert page.locator(".session-item").count() >= 2
    # Resume the first chat from the sidebar: its messages come back.
    sessions = httpx.get(web_server.url + "/api/sessions").json()
    first = next(
        s
        for s in sessions
        if any(
            "apples" in m["content"]
            for m in httpx.get(f"{web_server.url}/api/sessions/{s['id']}/messages").json()
        )
    )
    page.locator(f'.session-item[data-id="{first["id"]}"]').click()
    expect(page.locator("#messages-inner .msg.user")).to_have_text(["first chat about apples"])
    expect(last_answer(page)).to_contain_text("You said: first chat about apples")
    expect(page.locator("#agent-picker")).to_have_value("assistant")
    # Delete the second chat (a click arms, a second click deletes).
    second = next(s for s in sessions if s["id"] != first["id"] and s["agent_id"] == "coder")
    item = page.locator(f'.session-item[data-id="{second["id"]}"]')
    item.hover()
    item.locator(".s-del").click()
    item.locator(".s-del").click()
    expect(item).to_have_count(0)
    assert httpx.get(f"{web_server.url}/api/sessions/{second['id']}").status_code == 404


def test_search_and_rename_in_the_sidebar(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    send(page, "a chat to rename")
    wait_done(page)
    active = page.locator(".session-item.active")
    expect(active).to_have_count(1)
    sid = active.get_attribute("data-id")
    active.hover()
    active.locator(".s-ren").click()
    field = page.locator(".s-rename")
    field.fill("Quarterly plan")
    field.press("Enter")
    expect(page.locator(f'.session-item[data-id="{sid}"] .s-title')).to_have_text("Quarterly plan")
    assert httpx.get(f"{web_server.url}/api/sessions/{sid}").json()["name"] == "Quarterly plan"
    page.locator("#session-search").fill("Quarterly")
    expect(page.locator(".session-item")).to_have_count(1)
    page.locator("#session-search").fill("no such chat anywhere")
    expect(page.locator(".session-item")).to_have_count(0)


def test_attached_file_reaches_the_model(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer, tmp_path
) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("The secret word is PLUMBAGO-7.\n")
    open_app(page, web_server)
    page.locator("#file-input").set_input_files(str(note))
    expect(page.locator("#attachments .file-chip")).to_contain_text("notes.txt")
    send(page, "what is the secret word?")
    expect(page.locator("#messages-inner .msg.user .file-chip")).to_contain_text("notes.txt")
    wait_done(page)
    assert any("PLUMBAGO-7" in t for t in user_texts(fake_openai))
    expect(page.locator("#attachments")).to_be_hidden()
    # Paste attaches files too.
    page.evaluate(
        """() => {
        const dt = new DataTransfer();
        dt.items.add(new File(["pasted text PASTE-42"], "clip.txt", {type: "text/plain"}));
        const init = {clipboardData: dt, bubbles: true, cancelable: true};
        const ev = new ClipboardEvent("paste", init);
        document.querySelector("#input").dispatchEvent(ev);
    }"""
    )
    expect(page.locator("#attachments .file-chip")).to_contain_text("clip.txt")
    # And drag and drop.
    page.evaluate(
        """() => {
        const dt = new DataTransfer();
        dt.items.add(new File(["dropped DROP-9"], "drop.md", {type: "text/markdown"}));
        for (const type of ["dragenter", "dragover", "drop"]) {
            const init = {dataTransfer: dt, bubbles: true, cancelable: true};
            window.dispatchEvent(new DragEvent(type, init));
        }
    }"""
    )
    expect(page.locator("#attachments .file-chip")).to_have_count(2)
    send(page, "read both")  # sent once both uploads are done
    expect(page.locator("#messages-inner .msg.user")).to_have_count(2)
    wait_done(page)
    texts = user_texts(fake_openai)
    assert any("PASTE-42" in t for t in texts) and any("DROP-9" in t for t in texts)
    # Retry resends the last message with its files (the server hands them back as uploads).
    before = len(fake_openai.requests)
    page.locator(".retry-btn").click()
    deadline = time.monotonic() + 15
    while len(fake_openai.requests) == before:
        assert time.monotonic() < deadline, "the retry never reached the model"
        page.wait_for_timeout(50)
    wait_done(page)
    expect(page.locator("#messages-inner .msg.user")).to_have_count(2)
    expect(page.locator("#messages-inner .msg.user").last.locator(".file-chip")).to_have_count(2)
    last = json.dumps(fake_openai.requests[-1]["messages"][-1])
    assert "PASTE-42" in last and "DROP-9" in last


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_uploads_show_progress_thumbnails_and_retry_resends_the_same_way(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer, tmp_path
) -> None:
    """Files go up with POST /api/upload (progress on the chip while the bytes leave), the chat
    carries only their ids, the message shows an image as a thumbnail and other files as
    chips (after a reload too), and a retry resends the re-uploaded files by id."""
    big = tmp_path / "archive.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    picture = tmp_path / "dot.png"
    picture.write_bytes(PNG_1PX)
    chats: list[dict] = []

    def watch(ws) -> None:  # noqa: ANN001 - a playwright WebSocket
        def sent(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame.get("type") == "chat":
                chats.append(frame)

        ws.on("framesent", sent)

    page.on("websocket", watch)
    open_app(page, web_server)
    # Slow the upload down (1 MB/s) so that its progress can be seen.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    slow = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 1 << 20}
    cdp.send("Network.emulateNetworkConditions", slow)
    page.locator("#file-input").set_input_files([str(big), str(picture)])
    uploading = page.locator('#attachments .file-chip[data-state="uploading"]')
    expect(uploading.locator("progress")).to_have_count(1)
    ready = page.locator('#attachments .file-chip[data-state="ready"]')
    expect(ready).to_have_count(2, timeout=30_000)
    steps = page.locator("#attachments .file-chip").first.get_attribute("data-progress-steps")
    assert int(steps or 0) >= 2, "no upload progress was reported"
    cdp.send("Network.emulateNetworkConditions", {**slow, "uploadThroughput": -1})
    expect(page.locator("#attachments .file-chip img")).to_have_count(1)  # the picture's
    send(page, "describe these files")
    bubble = page.locator("#messages-inner .msg.user").last
    expect(bubble.locator(".thumb img")).to_have_count(1)
    expect(bubble.locator(".file-chip")).to_contain_text("archive.bin")
    wait_done(page)
    # The chat carried upload ids, not the bytes.
    assert len(chats) == 1 and [set(f) for f in chats[0]["files"]] == [{"fileId"}] * 2
    ids = [f["fileId"] for f in chats[0]["files"]]
    assert "archive.bin" in json.dumps(fake_openai.requests[-1]["messages"])
    # After a reload the thumbnail comes from the session's stored file.
    page.reload()
    image = page.locator("#messages-inner .msg.user .thumb img")
    expect(image).to_have_count(1)
    assert "/files/" in (image.get_attribute("src") or "")
    deadline = time.monotonic() + 10
    while not page.evaluate("document.querySelector('.thumb img').naturalWidth"):
        assert time.monotonic() < deadline, "the stored picture never loaded"
        page.wait_for_timeout(50)
    expect(page.locator("#messages-inner .msg.user .file-chip")).to_contain_text("archive.bin")
    # Retry: the server hands the files back as new uploads, resent by id.
    with page.expect_response(lambda r: r.url.endswith("/retry")) as answer:
        page.locator(".retry-btn").click()
    again = [f["id"] for f in answer.value.json()["files"]]
    expect(page.locator("#messages-inner .msg.user").last.locator(".thumb img")).to_have_count(1)
    deadline = time.monotonic() + 15
    while len(chats) < 2:
        assert time.monotonic() < deadline, "the retry was never sent"
        page.wait_for_timeout(50)
    wait_done(page)
    assert [f["fileId"] for f in chats[1]["files"]] == again and set(again).isdisjoint(ids)


def test_archive_restore_and_delete_from_the_archive(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    sids = []
    for text in ("keep this one archived", "archive then delete"):
        page.locator("#new-chat").click()
        send(page, text)
        wait_done(page)
        sids.append(page.evaluate("window.prismd.sessionId"))
    for sid in sids:
        item = page.locator(f'.session-item[data-id="{sid}"]')
        item.hover()
        item.locator(".s-arc").click()
        expect(item).to_have_count(0)
    # The chat on screen was archived: a new chat takes its place, and what is typed next
    # goes there, not into the archived one.
    expect(page.locator("#empty-state")).to_be_visible()
    send(page, "a fresh chat")
    wait_done(page)
    fresh = page.evaluate("window.prismd.sessionId")
    assert fresh not in sids
    for sid in sids:
        assert httpx.get(f"{web_server.url}/api/sessions/{sid}").json()["status"] == "archived"
    page.locator("#show-archived").click()
    expect(page.locator("#side-title")).to_be_visible()
    archived = page.locator(".session-item.archived")
    expect(archived).to_have_count(2)
    # An archived chat can be read…
    first = page.locator(f'.session-item.archived[data-id="{sids[0]}"]')
    first.click()
    expect(page.locator("#messages-inner .msg.user")).to_have_text(["keep this one archived"])
    # …restored…
    first.hover()
    first.locator(".s-restore").click()
    expect(first).to_have_count(0)
    assert httpx.get(f"{web_server.url}/api/sessions/{sids[0]}").json()["status"] == "active"
    # …or deleted (a click arms, a second click deletes).
    second = page.locator(f'.session-item.archived[data-id="{sids[1]}"]')
    second.hover()
    second.locator(".s-del").click()
    second.locator(".s-del").click()
    expect(second).to_have_count(0)
    assert httpx.get(f"{web_server.url}/api/sessions/{sids[1]}").status_code == 404
    page.locator("#show-archived").click()
    expect(page.locator(f'.session-item[data-id="{sids[0]}"]')).to_have_count(1)
    expect(page.locator(f'.session-item[data-id="{sids[1]}"]')).to_have_count(0)


def test_tool_card_and_approval_dialog(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    fake_openai.script(
        Reply(tool_calls=[call("shell", {"command": "echo approved-run"})], times=1),
        match="run the tool",
    )
    fake_openai.script(Reply(text="The command printed **approved-run**.", times=1))
    open_app(page, web_server)
    send(page, "run the tool please")
    dialog = page.locator("#approval-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#approval-tool")).to_have_text("shell")
    expect(page.locator("#approval-query")).to_contain_text("echo approved-run")
    card = last_answer(page).locator(".tool-card")
    expect(card.locator(".tool-state")).to_have_text("needs approval")
    # A reload while the request waits brings it back (replayed by `resume`).
    page.reload()
    expect(dialog).to_be_visible()
    expect(page.locator("#approval-query")).to_contain_text("echo approved-run")
    expect(page.locator("#messages-inner .msg.user")).to_have_count(1)
    page.locator("#approval-approve").click()
    expect(dialog).to_be_hidden()
    expect(card.locator(".tool-state")).to_contain_text("ok")
    expect(card.locator(".tool-output")).to_contain_text("approved-run")
    wait_done(page)
    expect(last_answer(page).locator(".md strong")).to_have_text("approved-run")


def test_model_html_renders_as_inert_text(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    evil = (
        'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
        '[link](javascript:window.__pwned=3) <a href="javascript:window.__pwned=4">a</a>\n\n'
        '<div onclick="window.__pwned=5" style="position:fixed">div</div>\n\n'
        "![pic](http://127.0.0.1:1/x.png) done"
    )
    fake_openai.script(Reply(text=[evil[:30], evil[30:]]), match="be evil")
    open_app(page, web_server)
    send(page, "be evil")
    wait_done(page)
    answer = last_answer(page)
    expect(answer.locator(".md")).to_contain_text("<img src=x onerror=")
    expect(answer.locator(".md")).to_contain_text("<script>window.__pwned=2</script>")
    assert page.evaluate("window.__pwned") is None
    inert = "img[src=x], .md img, .md script, .md [onerror], .md [onclick]"
    assert page.locator(inert).count() == 0
    assert page.locator('.md a[href^="javascript"]').count() == 0
    assert page.locator(".md [style]").count() == 0
    answer.locator(".md a").first.click(modifiers=["Alt"])
    page.wait_for_timeout(100)
    assert page.evaluate("window.__pwned") is None
    # From the stored history too.
    page.reload()
    expect(last_answer(page).locator(".md")).to_contain_text("<img src=x onerror=")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img[src=x]").count() == 0


def test_retry_and_edit_last_message(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    open_app(page, web_server)
    send(page, "original question")
    wait_done(page)
    page.locator(".msg.user").last.hover()
    page.locator(".msg.user .edit-btn").click()
    page.locator(".edit-area").fill("edited question")
    page.locator(".edit-area").press("Enter")
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said: edited question")
    expect(page.locator("#messages-inner .msg.user:visible")).to_have_count(1)
    before = len(fake_openai.requests)
    page.locator(".retry-btn").click()
    deadline = time.monotonic() + 15
    while len(fake_openai.requests) == before:
        assert time.monotonic() < deadline, "the retry never reached the model"
        page.wait_for_timeout(50)
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said: edited question")
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(1)
    # The model saw one exchange only: the dropped ones are gone from the session.
    sent = [m for m in fake_openai.requests[-1]["messages"] if m["role"] != "system"]
    assert [m["role"] for m in sent] == ["user"]
    assert "edited question" in json.dumps(sent)


# ---------------------------------------------------------------------------- screens


def test_setup_screen_without_a_provider(page: Page, bare_server: PrismdServer) -> None:
    # bare_server: no key, no Ollama, and the offline default model turned off.
    page.goto(bare_server.url + "/")
    expect(page.locator("#setup-view")).to_be_visible()
    expect(page.locator("#setup-view")).to_contain_text("OPENAI_API_KEY")
    expect(page.locator("#setup-view")).to_contain_text("PRISMD_PROVIDER=local")
    page.locator("#setup-skip").click()
    expect(page.locator("#chat-view")).to_be_visible()


def test_the_offline_demo_model_says_what_it_is(page: Page, make_server) -> None:  # noqa: ANN001
    """No key, no Ollama: the chat opens on the bundled tiny model, which the page names as
    a demo, with how to connect a real model."""
    srv = make_server({"PRISMD_LOCAL_ENABLED": "true", "OLLAMA_BASE_URL": "http://127.0.0.1:9"})
    page.goto(srv.url + "/")
    expect(page.locator("#chat-view")).to_be_visible()
    note = page.locator("#model-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("tiny offline demo model")
    expect(note).to_contain_text("OPENAI_API_KEY")


def _add_user(srv: PrismdServer, name: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {"PRISMD_HOME": str(srv.home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "prismd", "users", "add", name, "--admin", "--password-stdin"],
        input=password + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_login_page(page: Page, make_server, fake_openai: FakeModelServer) -> None:  # noqa: ANN001
    srv = make_server(openai_env(fake_openai), start=False)
    added = _add_user(srv, "alice", "correct horse battery")
    assert added.returncode == 0, added.stderr
    srv.start()
    assert httpx.get(srv.url + "/api/auth/status").json()["authRequired"] is True
    page.goto(srv.url + "/")
    expect(page.locator("#login-view")).to_be_visible()
    page.locator("#login-user").fill("alice")
    page.locator("#login-pass").fill("wrong password")
    page.locator("#login-pass").press("Enter")
    expect(page.locator("#login-error")).to_contain_text("Wrong")
    page.locator("#login-pass").fill("correct horse battery")
    page.locator("#login-submit").click()
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#user-name")).to_have_text("alice")
    expect(page.locator("#conn.up")).to_have_count(1)
    send(page, "hello after login")
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said: hello after login")
    # The cookie is HttpOnly: the page cannot read it.
    assert "prismd" not in page.evaluate("document.cookie")
    page.locator("#logout").click()
    expect(page.locator("#login-view")).to_be_visible()


def test_mic_records_and_produces_a_transcribed_turn(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer, console: Console
) -> None:
    open_app(page, web_server)
    mic = page.locator("#mic")
    expect(mic).to_be_visible()
    mic.click()  # a click starts recording…
    expect(mic).to_have_class(re.compile(r"\brecording\b"))
    page.wait_for_timeout(3000)
    mic.click()  # …and a second click sends it
    voice = page.locator("#messages-inner .msg.user.voice")
    expect(voice).to_have_count(1, timeout=30_000)
    assert "capital" in voice.inner_text().lower()  # the speech in tests/fixtures/hello.wav
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said:")
    # "Read aloud" asks the server to speak the answer (`speak`); the reply's clips can be
    # played again from the answer's play button.
    answer = last_answer(page)
    answer.hover()
    answer.locator(".speak-btn").click()
    expect(answer.locator(".play-btn")).to_have_count(1, timeout=30_000)
    # After a reload the voice turn comes back from the history, marked as spoken, once.
    page.reload()
    expect(page.locator("#messages-inner .msg.user.voice")).to_have_count(1)
    expect(page.locator("#messages-inner .msg.assistant")).to_have_count(1)
