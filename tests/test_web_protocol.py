"""The web app's protocol names come from the server's (issue 14): `/static/js/protocol.js` is
generated from protocol.py when served, EVENT_TYPES names every frame type the server sends,
and no module of the app spells a protocol name by hand."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from prismd.protocol import CLIENT_TYPES, EVENT_TYPES, ErrorCode
from prismd.server.web import WEB_DIR, protocol_module

from .test_abuse import SERVER_TYPES

SRC = Path(__file__).resolve().parent.parent / "src" / "prismd"
# Where server frames are built (sessions/service.py also builds the bus's own commands).
FRAME_SOURCES = [
    "server/ws.py",
    "agent/runner.py",
    "sessions/repair.py",
    "sessions/service.py",
    "voice/pipeline.py",
    "voice/engines.py",
    "voice/speaker.py",
]
BUS_COMMANDS = {"stop", "approval"}  # sessions/service.py: between processes, never sent


def _exports(module: str, name: str) -> dict[str, str]:
    body = re.search(rf"export const {name} = Object\.freeze\(\{{(.*?)\}}\);", module, re.S)
    assert body, name
    return dict(re.findall(r'^\s+(\w+): "([a-z_]+)",$', body.group(1), re.M))


def test_the_generated_module_holds_every_name():
    module = protocol_module()
    assert _exports(module, "ERROR") == {c.name: c.value for c in ErrorCode}
    assert _exports(module, "EVENT") == {t.upper(): t for t in EVENT_TYPES}
    assert _exports(module, "CLIENT") == {t.upper(): t for t in CLIENT_TYPES}
    assert not (WEB_DIR / "js" / "protocol.js").exists(), "protocol.js is generated, not kept"


def test_event_types_name_every_frame_the_server_sends():
    sent: set[str] = set()
    for rel in FRAME_SOURCES:
        text = (SRC / rel).read_text()
        sent |= set(re.findall(r'"type": "([a-z_]+)"', text))
    sent -= BUS_COMMANDS
    sent.add("error")  # protocol.error_frame
    assert sent <= set(EVENT_TYPES), sent - set(EVENT_TYPES)
    assert SERVER_TYPES <= set(EVENT_TYPES)


def test_no_module_of_the_app_spells_a_protocol_name_by_hand():
    names = set(EVENT_TYPES) | set(CLIENT_TYPES) | {c.value for c in ErrorCode}
    # Where a frame's type or an error's code is compared or set.
    pattern = re.compile(r'(?:\bcase\s+|\.(?:type|code)\s*[!=]==\s*|\btype:\s*)"([a-z_]+)"')
    found = []
    for path in sorted((WEB_DIR / "js").glob("*.js")):
        for name in pattern.findall(path.read_text()):
            if name in names:
                found.append(f"{path.name}: {name}")
    assert not found, found


def test_the_server_serves_it_with_its_security_headers(server):
    resp = httpx.get(f"{server.url}/static/js/protocol.js")
    assert resp.status_code == 200 and resp.text == protocol_module()
    assert resp.headers["content-type"].startswith("text/javascript")
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    again = httpx.get(
        f"{server.url}/static/js/protocol.js", headers={"If-None-Match": resp.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
