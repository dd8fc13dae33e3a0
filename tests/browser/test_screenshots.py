"""Screenshots of the main screens, for the README.

Under plain `pytest` they are taken into a temporary directory (the screens must render without
console errors); `PRISMD_SCREENSHOTS=1 pytest tests/browser/test_screenshots.py` writes them to
docs/screenshots/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from prismd.testing.fake_models import FakeModelServer, Reply
from tests.conftest import PrismdServer, openai_env
from tests.test_auth import cli

from .conftest import CONFIG, Console

DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "screenshots"

ANSWER = """Here is a small, dependency-free way to retry a flaky call with **exponential backoff**
and jitter:

```python
import random
import time


def retry(call, attempts=5, base=0.2, cap=5.0):
    for attempt in range(attempts):
        try:
            return call()
        except ConnectionError:
            if attempt == attempts - 1:
                raise
            delay = min(cap, base * 2 ** attempt)
            time.sleep(delay * random.uniform(0.5, 1.5))
```

- The delay doubles each time, up to `cap` seconds.
- The jitter keeps many clients from retrying in lock-step.
"""


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("PRISMD_SCREENSHOTS"):
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def demo_server(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    srv = PrismdServer(tmp_path_factory.mktemp("demo"), openai_env(fake_openai), CONFIG)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def team_server(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    """A server with users (alice is the admin) and a token, for the settings pages."""
    srv = PrismdServer(tmp_path_factory.mktemp("team"), openai_env(fake_openai), CONFIG)
    for name in ("alice", "bob", "carol"):
        out = cli(srv.home, "users", "add", name, "--password-stdin", input=f"{name}-password-1\n")
        assert out.returncode == 0, out.stderr
    for user, label in (("bob", "nightly-report"), ("alice", "home-assistant")):
        assert cli(srv.home, "tokens", "create", "--user", user, "--name", label).returncode == 0
    srv.start()
    yield srv
    srv.stop()


def new_page(browser: Browser, console: Console, width: int, height: int, theme: str) -> Page:
    context = browser.new_context(
        viewport={"width": width, "height": height}, color_scheme=theme, device_scale_factor=1
    )
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.on("console", console.on_console)
    page.on("pageerror", console.on_error)
    return page


def chat(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")
    expect(page.locator("#messages-inner .msg.assistant.streaming")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()


def rename_active(srv: PrismdServer, page: Page, name: str) -> None:
    sid = page.evaluate("window.prismd.sessionId")
    httpx.patch(f"{srv.url}/api/sessions/{sid}", json={"name": name})


def test_screenshots(
    browser: Browser,
    demo_server: PrismdServer,
    fake_openai: FakeModelServer,
    bare_server: PrismdServer,
    team_server: PrismdServer,
    shots: Path,
    console: Console,
) -> None:
    srv = demo_server
    fake_openai.script(
        Reply(
            text=[ANSWER[i : i + 40] for i in range(0, len(ANSWER), 40)],
            reasoning=["The user wants retries. ", "Backoff with jitter, keep it short."],
        ),
        match="backoff",
    )
    fake_openai.script(
        Reply(
            tool_calls=[
                {
                    "id": "call_1",
                    "name": "shell",
                    "arguments": json.dumps({"command": "du -sh ~/projects/* | sort -h"}),
                }
            ],
            times=1,
        ),
        match="disk",
    )
    page = new_page(browser, console, 1280, 800, "light")
    page.goto(srv.url + "/")
    expect(page.locator("#conn.up")).to_have_count(1)
    for text, name in [
        ("Draft a polite reply declining the meeting", "Declining the Thursday meeting"),
        ("Summarise the release notes", "Release notes summary"),
        ("Plan a three-day trip to Lisbon", "Lisbon trip plan"),
    ]:
        chat(page, text)
        rename_active(srv, page, name)
        page.locator("#new-chat").click()
    chat(page, "How do I retry a flaky network call with backoff in Python?")
    rename_active(srv, page, "Retry with backoff in Python")
    page.reload()
    expect(page.locator("#messages-inner .code-block")).to_have_count(1)
    expect(page.locator(".session-item.active")).to_have_count(1)
    page.mouse.move(1200, 790)
    page.screenshot(path=shots / "chat-light.png", animations="disabled")

    page.locator("#theme-toggle").click()
    expect(page.locator("html[data-theme=dark]")).to_have_count(1)
    page.locator("#messages-inner .reasoning summary").click()
    page.screenshot(path=shots / "chat-dark.png", animations="disabled")

    # A tool that needs approval.
    page.locator("#new-chat").click()
    page.locator("#input").fill("Which of my projects use the most disk?")
    page.locator("#input").press("Enter")
    expect(page.locator("#approval-dialog")).to_be_visible()
    page.screenshot(path=shots / "approval.png", animations="disabled")
    page.locator("#approval-deny").click()
    expect(page.locator("#send")).to_be_visible()
    page.context.close()

    # Phone width: the chat, then the sessions drawer.
    phone = new_page(browser, console, 390, 780, "dark")
    phone.goto(srv.url + "/")
    expect(phone.locator("#messages-inner .code-block")).to_have_count(0)
    phone.locator("#toggle-sidebar").click()
    expect(phone.locator("body.sidebar-open")).to_have_count(1)
    phone.locator(".session-item", has_text="Retry with backoff").click()
    expect(phone.locator("#messages-inner .code-block")).to_have_count(1)
    phone.screenshot(path=shots / "phone.png", animations="disabled")
    phone.locator("#toggle-sidebar").click()
    phone.wait_for_timeout(300)
    phone.screenshot(path=shots / "phone-sidebar.png", animations="disabled")
    phone.context.close()

    # The setup screen (no provider) and the sign-in page.
    setup = new_page(browser, console, 1100, 760, "light")
    setup.goto(bare_server.url + "/")
    expect(setup.locator("#setup-view")).to_be_visible()
    setup.screenshot(path=shots / "setup.png", animations="disabled")
    setup.evaluate("document.querySelector('#setup-view').hidden = true")
    setup.evaluate("document.querySelector('#login-view').hidden = false")
    setup.emulate_media(color_scheme="dark")
    setup.set_viewport_size({"width": 1100, "height": 640})
    setup.screenshot(path=shots / "login.png", animations="disabled")
    setup.context.close()

    # Hands-free, listening (the fake microphone's question has no pause to end it).
    voice = new_page(browser, console, 1280, 800, "light")
    voice.goto(srv.url + "/")
    expect(voice.locator("#conn.up")).to_have_count(1)
    voice.locator(".session-item", has_text="Lisbon").click()
    expect(voice.locator("#messages-inner .msg.assistant")).to_have_count(1)
    voice.locator("#hands-free").click()
    expect(voice.locator("#hands-free-bar")).to_have_attribute("data-state", "listening")
    voice.mouse.move(1200, 790)
    voice.screenshot(path=shots / "hands-free.png", animations="disabled")
    voice.locator("#hands-free-stop").click()
    voice.context.close()

    # The settings page: usage, and the admin's users and tokens.
    team = new_page(browser, console, 1280, 860, "light")
    team.goto(team_server.url + "/")
    team.locator("#login-user").fill("alice")
    team.locator("#login-pass").fill("alice-password-1")
    team.locator("#login-submit").click()
    expect(team.locator("#conn.up")).to_have_count(1)
    for text in ("Summarise the release notes", "How do I retry with backoff?"):
        chat(team, text)
        team.locator("#new-chat").click()
    team.locator("#settings-open").click()
    team.locator('.tab[data-tab="usage"]').click()
    expect(team.locator(".totals")).to_have_count(2)
    team.screenshot(path=shots / "usage.png", animations="disabled")
    team.locator('.tab[data-tab="admin"]').click()
    expect(team.locator('tr[data-name="carol"]')).to_have_count(1)
    expect(team.locator("#all-tokens tr", has_text="nightly-report")).to_have_count(1)
    team.screenshot(path=shots / "admin.png", animations="disabled")
    team.context.close()

    assert not console.csp_violations(), console.csp_violations()
    assert not console.errors, console.errors
    for png in shots.glob("*.png"):
        assert png.stat().st_size < 400_000, png
