"""Files in `chat`: stored with the session, and their content reaches the model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import zlib

import httpx
import psutil

from prismd.agent.files import PDF_PARALLEL, PdfLimits, pdf_text
from prismd.testing.fake_models import Reply

from .conftest import PrismdServer, of_type, openai_env, stored_rows
from .waiting import until, wait_for

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)


def make_pdf(text: str) -> bytes:
    """A one-page PDF whose page shows `text` (built by hand, with a correct xref)."""
    stream = f"BT /F1 18 Tf 40 100 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    return _assemble(objects)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_text_pdf_and_image_reach_the_model_and_are_stored(server, fake_openai):
    files = [
        {"filename": "notes.md", "mimeType": "text/markdown", "data": b64(b"# Plan\nship it")},
        {"filename": "main.py", "mimeType": "", "data": b64(b"print('hi')\n")},
        {
            "filename": "report.pdf",
            "mimeType": "application/pdf",
            "data": b64(make_pdf("Quarterly")),
        },
        {"filename": "dot.png", "mimeType": "image/png", "data": b64(PNG_1PX)},
    ]
    with server.client() as c:
        frames = c.turn(message="summarise these", files=files)
    assert of_type(frames, "done")
    content = fake_openai.requests[-1]["messages"][-1]["content"]
    assert isinstance(content, list)
    text = "\n".join(p["text"] for p in content if p["type"] == "text")
    assert "# Plan\nship it" in text
    assert "print('hi')" in text
    assert "Quarterly" in text  # extracted from the PDF
    assert "summarise these" in text
    images = [p for p in content if p["type"] == "image_url"]
    assert images == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG_1PX)}}
    ]

    sid = frames[0]["sessionId"]
    msgs = server.get(f"/api/sessions/{sid}/messages").json()
    assert [f["filename"] for f in msgs[0]["files"]] == [
        "notes.md",
        "main.py",
        "report.pdf",
        "dot.png",
    ]
    assert msgs[0]["files"][1]["mime_type"] == "text/x-python"
    stored = dict(stored_rows(server, "session_files", sid, "filename, data"))
    assert stored["dot.png"] == PNG_1PX


def test_file_only_message_is_accepted(server, fake_openai):
    files = [{"filename": "a.txt", "mimeType": "text/plain", "data": b64(b"lonely file")}]
    with server.client() as c:
        frames = c.turn(message="", files=files)
    assert of_type(frames, "done")
    assert "lonely file" in fake_openai.requests[-1]["messages"][-1]["content"]


def test_file_names_never_become_paths(server, fake_openai):
    files = [{"filename": "../../../etc/passwd", "mimeType": "text/plain", "data": b64(b"x")}]
    with server.client() as c:
        frames = c.turn(message="look", files=files)
    sid = frames[0]["sessionId"]
    msgs = server.get(f"/api/sessions/{sid}/messages").json()
    assert msgs[0]["files"][0]["filename"] == "passwd"


def test_images_are_named_not_sent_to_models_without_vision(make_server, fake_openai):
    from .conftest import openai_env

    srv = make_server(openai_env(fake_openai), config="[providers.openai]\nvision = false\n")
    files = [{"filename": "dot.png", "mimeType": "image/png", "data": b64(PNG_1PX)}]
    with srv.client() as c:
        c.turn(message="what is this", files=files)
    content = fake_openai.requests[-1]["messages"][-1]["content"]
    assert isinstance(content, str)
    assert "dot.png" in content and "cannot see images" in content


def test_images_of_history_are_resent_on_the_next_turn(server, fake_openai):
    files = [{"filename": "dot.png", "mimeType": "image/png", "data": b64(PNG_1PX)}]
    with server.client() as c:
        c.turn(message="look", files=files)
        c.turn(message="and now?")
    first_user = fake_openai.requests[-1]["messages"][1]
    assert any(p["type"] == "image_url" for p in first_user["content"])


# --- hostile PDFs (issue 11, item 2) --------------------------------------------------------


def bomb_pdf(pages: int = 3, stream_bytes: int = 5_000_000) -> bytes:
    """`pages` pages sharing one content stream of ~`stream_bytes` of text operators that show
    nothing (so that no character limit stops it first), deflated: a file of a few KB whose text
    costs pypdf several seconds of CPU per page (~8 s on the CI machine)."""
    op = b"() Tj 0 0 Td "
    stream = zlib.compress(b"BT /F1 12 Tf " + op * (stream_bytes // len(op)) + b"ET", 9)
    kids = b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
    font = 4 + pages
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ] + [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] "
        b"/Resources << /Font << /F1 %d 0 R >> >> /Contents 3 0 R >>" % font
    ] * pages
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    return _assemble(objects)


def pages_pdf(texts: list[str]) -> bytes:
    """A PDF with one page per text."""
    n = len(texts)
    kids = b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(n))
    font = 3 + 2 * n
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % n,
    ]
    for i, text in enumerate(texts):
        stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] "
            b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (font, 4 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    return _assemble(objects)


def _assemble(objects: list[bytes]) -> bytes:
    """A PDF file of these objects (object 1 the catalog), with a correct xref."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def extractors(root: int | None = None) -> list[psutil.Process]:
    """The PDF text extractors running (under the process `root` when given)."""
    procs = psutil.Process(root).children(recursive=True) if root else psutil.process_iter()
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if any("PdfReader" in arg for arg in proc.cmdline()) and proc.name() != "bwrap":
                found.append(proc)
    return found


def test_pdf_limits_end_in_a_note_for_the_model() -> None:
    bomb = bomb_pdf()
    assert len(bomb) < 20_000
    text = asyncio.run(pdf_text(bomb, PdfLimits(timeout_s=2)))
    assert text == "[The PDF could not be read: it takes longer than the time limit (2 s)]"
    text = asyncio.run(pdf_text(pages_pdf(["alpha", "beta", "gamma"]), PdfLimits(max_pages=2)))
    assert "alpha" in text and "beta" in text and "gamma" not in text
    assert text.endswith("[Only the first 2 of 3 pages were extracted (the limit)]")
    text = asyncio.run(pdf_text(pages_pdf(["a" * 60, "b" * 60]), PdfLimits(max_chars=80)))
    assert "a" * 60 in text and "b" * 21 not in text and "b" * 20 in text
    assert text.endswith("[Text cut at 80 characters, after page 2 of 2]")
    text = asyncio.run(pdf_text(b"%PDF-1.4\nnot really a PDF"))
    assert text.startswith("[The PDF could not be read: ") and text.endswith("]")
    ok = asyncio.run(pdf_text(pages_pdf(["first page", "second page"])))
    assert ok == "--- page 1 ---\nfirst page\n\n--- page 2 ---\nsecond page"


def test_pdf_extraction_is_bounded_and_cancelled_with_its_caller() -> None:
    """Three bombs at once: at most PDF_PARALLEL extractors run, the rest queue; cancelling
    the callers (a stopped turn) kills the extractors."""

    async def scenario() -> None:
        tasks = [
            asyncio.create_task(pdf_text(bomb_pdf(), PdfLimits(timeout_s=60))) for _ in range(3)
        ]

        async def bound_reached() -> bool:
            running = await asyncio.to_thread(extractors, os.getpid())
            assert len(running) <= PDF_PARALLEL  # never more, at any look
            return len(running) == PDF_PARALLEL

        await until(bound_reached, f"{PDF_PARALLEL} extractors to run")
        for _ in range(10):  # ten more looks (each scans /proc): still no more than the bound
            await bound_reached()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert extractors(os.getpid()) == []  # killed before the cancellation returned

    asyncio.run(scenario())


def test_a_pdf_bomb_does_not_stall_the_server(tmp_path, fake_openai):
    """While a user's PDF bomb is parsed, another user logs in, and the server answers
    /api/health and their chat with a tool; the bomb's sender gets the limit's note."""
    from .test_auth import PASSWORDS, add_user, make_token, ws_client

    for name in ("alice", "bob", "carol"):
        add_user(tmp_path, name)
    tokens = {name: make_token(tmp_path, name) for name in ("bob", "carol")}
    srv = PrismdServer(tmp_path, openai_env(fake_openai)).start()
    try:
        assert srv.proc is not None
        call = {"id": "c1", "name": "file_write", "arguments": '{"path": "n.txt", "content": "x"}'}
        fake_openai.script(Reply(tool_calls=[call], times=1), match="carol writes")
        fake_openai.script(Reply(text=["written"], times=1), match="carol writes")
        with ws_client(f"{srv.ws_url}?token={tokens['bob']}") as bob:
            bob.send(
                type="chat",
                message="summarise the report",
                # 20 pages sharing the one stream: past the time limit on any machine.
                files=[
                    {"filename": "r.pdf", "mimeType": "application/pdf", "data": b64(bomb_pdf(20))}
                ],
            )
            running = wait_for(lambda: extractors(srv.proc.pid), "the extractor", 30)
            # Meanwhile, for someone else: health, a login, a chat with a tool.
            assert httpx.get(f"{srv.url}/api/health", timeout=10).status_code == 200
            login = httpx.post(
                f"{srv.url}/api/auth/login",
                json={"username": "carol", "password": PASSWORDS["carol"]},
                timeout=10,
            )
            assert login.status_code == 200
            with ws_client(f"{srv.ws_url}?token={tokens['carol']}") as carol:
                frames = carol.turn(message="carol writes")
            assert [e["status"] for e in of_type(frames, "tool_end")] == ["ok"]
            assert of_type(frames, "done")[0]["finalContent"] == "written"
            # All of that while the bomb was still being parsed.
            assert all(p.is_running() for p in running)
            bob_frames = bob.until_turn_end(timeout=90)
        assert of_type(bob_frames, "done")
        sent = fake_openai.requests[-1]["messages"][-1]["content"]
        limit = r": it takes longer than the time limit \(20 s\)\]"
        note = re.search(
            r"\[(The PDF could not be read|Text extraction stopped after page \d+ of 20)" + limit,
            sent,
        )
        assert note is not None, sent[-300:]
        assert extractors(srv.proc.pid) == []
    finally:
        srv.stop()
