"""Files in `chat`: stored with the session, and their content reaches the model."""

from __future__ import annotations

import base64

from .conftest import of_type, stored_rows

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
