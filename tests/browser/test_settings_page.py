"""The settings page in a real browser: an admin manages users, tokens and sign-ins; a user
changes their own password (and keeps chatting), manages their own tokens and sees their
usage. Against a real prismd with users, made with the command line as an operator would."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from prismd.testing.fake_models import FakeModelServer
from tests.conftest import PrismdServer, openai_env
from tests.test_auth import cli

from .test_web_app import last_answer, send, wait_done

PASSWORD = "correct-horse-battery-9"


def add_user(srv: PrismdServer, name: str, *extra: str) -> None:
    out = cli(srv.home, "users", "add", name, "--password-stdin", *extra, input=PASSWORD + "\n")
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def users_web(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeModelServer
) -> Iterator[PrismdServer]:
    """alice (the admin) and bob."""
    srv = PrismdServer(tmp_path_factory.mktemp("settings"), openai_env(fake_openai))
    add_user(srv, "alice")
    add_user(srv, "bob")
    srv.start()
    yield srv
    srv.stop()


def sign_in(page: Page, srv: PrismdServer, name: str, password: str = PASSWORD) -> None:
    page.goto(srv.url + "/")
    page.locator("#login-user").fill(name)
    page.locator("#login-pass").fill(password)
    page.locator("#login-submit").click()
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#conn.up")).to_have_count(1)


def can_log_in(srv: PrismdServer, name: str, password: str) -> bool:
    resp = httpx.post(
        f"{srv.url}/api/auth/login", json={"username": name, "password": password}, timeout=30
    )
    return resp.status_code == 200


def open_tab(page: Page, tab: str) -> None:
    if page.locator("#settings-view").is_hidden():
        page.locator("#settings-open").click()
    page.locator(f'#settings-view .tab[data-tab="{tab}"]').click()
    expect(page.locator(f'#settings-view .tab[data-tab="{tab}"]')).to_have_class(
        re.compile(r"\bactive\b")
    )


def test_admin_adds_resets_and_removes_users_and_revokes_tokens(
    page: Page, users_web: PrismdServer
) -> None:
    srv = users_web
    sign_in(page, srv, "alice")
    open_tab(page, "admin")
    users = page.locator("#settings-body table.data").first
    expect(users.locator("tr[data-name]")).to_have_count(2)
    expect(users.locator('tr[data-name="alice"]')).to_contain_text("admin")
    # Add dave.
    page.locator("#new-user-name").fill("dave")
    page.locator("#new-user-password").fill("dave-first-password")
    page.locator("#add-user-form button[type=submit]").click()
    dave = page.locator('tr[data-name="dave"]')
    expect(dave).to_have_count(1)
    expect(dave).to_contain_text("user")
    assert can_log_in(srv, "dave", "dave-first-password")
    # The command line sees him (same data).
    assert "dave" in cli(srv.home, "users", "list").stdout
    # A bad password is refused with the server's reason, on the form.
    page.locator("#new-user-name").fill("erin")
    page.locator("#new-user-password").fill("short")
    page.locator("#new-user-password").evaluate("el => el.removeAttribute('minlength')")
    page.locator("#add-user-form button[type=submit]").click()
    expect(page.locator("#add-user-form .form-error")).to_contain_text("at least 8 characters")
    # Reset dave's password.
    dave.locator(".reset-btn").click()
    page.locator(".reset-row input").fill("dave-second-password")
    page.locator(".reset-row button[type=submit]").click()
    expect(page.locator(".reset-row")).to_have_count(0)
    assert not can_log_in(srv, "dave", "dave-first-password")
    assert can_log_in(srv, "dave", "dave-second-password")
    # A token made with the command line is listed, and revoked from here.
    token = cli(srv.home, "tokens", "create", "--user", "bob", "--name", "bob-cli").stdout.strip()
    open_tab(page, "account")
    open_tab(page, "admin")
    row = page.locator("#all-tokens tr", has_text="bob-cli")
    expect(row).to_have_count(1)
    assert token not in page.content()
    row.locator(".btn.danger").click()
    row.locator(".btn.danger").click()
    expect(page.locator("#all-tokens tr", has_text="bob-cli")).to_have_count(0)
    assert (
        httpx.get(
            f"{srv.url}/api/auth/me", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 401
    )
    # Who is signed in: this browser among them.
    expect(page.locator("#all-logins tr.current")).to_contain_text("alice")
    # Remove dave (a click arms, a second removes).
    dave.locator(".btn.danger").click()
    dave.locator(".btn.danger").click()
    expect(page.locator('tr[data-name="dave"]')).to_have_count(0)
    assert not can_log_in(srv, "dave", "dave-second-password")
    # Usage: the admin may look at everyone's.
    open_tab(page, "usage")
    expect(page.locator("#usage-user")).to_be_visible()
    page.locator("#usage-user").select_option("all")
    expect(page.locator("#settings-body")).to_contain_text("All time")


def test_a_user_changes_their_password_manages_tokens_and_sees_usage(
    page: Page, users_web: PrismdServer
) -> None:
    srv = users_web
    add_user(srv, "carol")
    sign_in(page, srv, "carol")
    send(page, "hello before the change")
    wait_done(page)
    expect(page.locator("#session-usage")).to_contain_text("1 turn")
    open_tab(page, "account")
    # Not an admin: no users page.
    expect(page.locator('#settings-view .tab[data-tab="admin"]')).to_be_hidden()
    page.locator("#pw-current").fill("not my password")
    page.locator("#pw-new").fill("carol-new-password")
    page.locator("#pw-repeat").fill("carol-new-password")
    page.locator("#password-form button[type=submit]").click()
    expect(page.locator("#password-form .form-error")).to_contain_text("wrong")
    page.locator("#pw-current").fill(PASSWORD)
    page.locator("#password-form button[type=submit]").click()
    expect(page.locator("#toast")).to_contain_text("Password changed")
    assert not can_log_in(srv, "carol", PASSWORD)
    assert can_log_in(srv, "carol", "carol-new-password")
    # This browser stays signed in (with a new login) and the chat goes on.
    page.locator("#settings-back").click()
    expect(page.locator("#conn.up")).to_have_count(1)
    send(page, "hello after the change")
    wait_done(page)
    expect(last_answer(page)).to_contain_text("You said: hello after the change")
    expect(page.locator("#login-view")).to_be_hidden()
    # An API token of her own: shown once, working, then revoked.
    open_tab(page, "account")
    page.locator("#token-name").fill("carol-laptop")
    page.locator("#token-form button[type=submit]").click()
    value = page.locator("#new-token .token-value")
    expect(value).to_have_text(re.compile(r"^prismd_"))
    token = value.inner_text()
    me = httpx.get(f"{srv.url}/api/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["user"]["name"] == "carol"
    row = page.locator("#my-tokens tr", has_text="carol-laptop")
    row.locator(".btn.danger").click()
    row.locator(".btn.danger").click()
    expect(page.locator("#my-tokens tr", has_text="carol-laptop")).to_have_count(0)
    me = httpx.get(f"{srv.url}/api/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401
    expect(page.locator("#my-logins tr.current")).to_contain_text("this browser")
    # Usage: her two turns, in the totals and per chat.
    open_tab(page, "usage")
    figures = page.locator(".totals").first
    expect(figures.locator(".figure").first).to_contain_text("2")
    expect(page.locator("#settings-body")).to_contain_text("Sent today")
    expect(page.locator("#usage-user")).to_have_count(0)  # only admins choose whose
    # Signed out, she signs in with the new password.
    page.locator("#settings-back").click()
    page.locator("#logout").click()
    expect(page.locator("#login-view")).to_be_visible()
    page.locator("#login-user").fill("carol")
    page.locator("#login-pass").fill("carol-new-password")
    page.locator("#login-submit").click()
    expect(page.locator("#chat-view")).to_be_visible()
