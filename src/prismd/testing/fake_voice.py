"""A scripted fake of OpenAI's speech endpoints on 127.0.0.1, for tests of the alternative
voice engines: `POST /v1/audio/transcriptions` (multipart) and `POST /v1/audio/speech` (JSON;
answers raw 24 kHz PCM16, OpenAI's `pcm` format).

    with FakeVoiceServer() as fake:
        fake.transcript = "hello there"
        ... base_url = fake.url (ends in /v1) ...
        fake.requests  # [{"path", "fields", "audio"} (transcriptions) | {"path", "json"}]
"""

from __future__ import annotations

import json
import math
import struct
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def tone(seconds: float = 0.5, rate: int = 24_000, hz: float = 440.0) -> bytes:
    n = int(seconds * rate)
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(n)
    )


class FakeVoiceServer:
    def __init__(self) -> None:
        self.transcript = "hello from the fake transcriber"
        self.status = 200  # non-200: an OpenAI-style error body
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                record: dict[str, Any] = {
                    "path": self.path,
                    "auth": self.headers.get("authorization"),
                }
                if self.path.endswith("/audio/transcriptions"):
                    head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
                    message = BytesParser(policy=HTTP).parsebytes(head + body)
                    fields: dict[str, str] = {}
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        payload = part.get_payload(decode=True)
                        if not isinstance(payload, bytes):
                            payload = b""
                        if name == "file":
                            record["audio"] = payload
                        elif isinstance(name, str):
                            fields[name] = payload.decode()
                    record["fields"] = fields
                    reply, ctype = (
                        json.dumps({"text": fake.transcript}).encode(),
                        "application/json",
                    )
                elif self.path.endswith("/audio/speech"):
                    record["json"] = json.loads(body or b"{}")
                    reply, ctype = tone(), "audio/pcm"
                else:
                    self.send_error(404)
                    return
                with fake._lock:
                    fake.requests.append(record)
                if fake.status != 200:
                    reply = json.dumps(
                        {"error": {"message": "fake failure", "type": "server_error"}}
                    ).encode()
                    ctype = "application/json"
                self.send_response(fake.status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.status = 200
        self.transcript = "hello from the fake transcriber"

    def __enter__(self) -> FakeVoiceServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
