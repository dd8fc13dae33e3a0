"""Browser tests: Playwright (sync API) driving Debian's Chromium against a real prismd.

One browser for the whole run; each test gets a fresh context (no shared storage) and a page
whose console is watched: a Content-Security-Policy violation fails the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prismd.testing.fake_models import FakeModelServer
from tests.conftest import PrismdServer, openai_env

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import (  # noqa: E402
    Browser,
    ConsoleMessage,
    Page,
    expect,
    sync_playwright,
)

# The suite shares two cores with the rest of `make test`: wait longer than the default 5 s.
expect.set_options(timeout=15_000)

CHROMIUM = Path("/usr/bin/chromium")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SPEECH_WAV = FIXTURES / "hello.wav"

CONFIG = """
[tools]
approval_timeout_s = 60

[[agents]]
id = "assistant"
name = "Assistant"
description = "General help"

[[agents]]
id = "coder"
name = "Coder"
description = "Writes and reviews code"
system_prompt = "You are a careful senior engineer."
"""


def chromium_args(wav: Path | None) -> list[str]:
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ]
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}")
    return args


# Package scope, not session: Playwright's sync API keeps an asyncio loop running in the main
# thread while it is open, which breaks every later test that calls asyncio.run().
@pytest.fixture(scope="package")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install installs it)")
    # Chromium reads the capture file itself; a copy keeps the path free of surprises.
    wav = tmp_path_factory.mktemp("audio") / "speech.wav"
    shutil.copy(SPEECH_WAV, wav)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
        yield b
        b.close()


@pytest.fixture(scope="module")
def web_server(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    """An open (loopback, no users) prismd with two agents, on the scripted fake model."""
    srv = PrismdServer(tmp_path_factory.mktemp("web"), openai_env(fake_openai), CONFIG)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismdServer]:
    """A prismd with no model provider (nothing listens where it would look for Ollama)."""
    srv = PrismdServer(tmp_path_factory.mktemp("bare"), {"OLLAMA_BASE_URL": "http://127.0.0.1:9"})
    srv.start()
    yield srv
    srv.stop()


class Console:
    """Console messages and page errors of one page."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.errors: list[str] = []

    def on_console(self, msg: ConsoleMessage) -> None:
        self.messages.append(f"{msg.type}: {msg.text}")

    def on_error(self, exc: Any) -> None:
        self.errors.append(str(exc))

    def csp_violations(self) -> list[str]:
        return [
            m
            for m in self.messages
            if "Content Security Policy" in m or "Content-Security-Policy" in m
        ]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["microphone", "clipboard-read", "clipboard-write"])
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    pg.on("console", console.on_console)
    pg.on("pageerror", console.on_error)
    yield pg
    context.close()
    assert not console.csp_violations(), console.csp_violations()
    assert not console.errors, console.errors
