"""Who may use host-level tools: in a server with users, `shell` (and MCP servers shared by
everyone) are for admins unless config.toml grants them; a user's approval never widens that.

The attack this answers: a non-admin's own socket received the `approval_request` for `shell`,
approved it, and the shell ran as prismd's user (root), read every workspace and made the user
an admin. Here the model (attacker-controlled) asks for `shell` on a non-admin's turn, and the
tool is simply not there: no approval is asked, nothing runs.
"""

from __future__ import annotations

import httpx
import pytest

from prismd.testing.fake_models import Reply

from .conftest import PrismdServer, of_type, openai_env
from .test_auth import add_user, make_token, ws_client
from .test_tool_turns import call, script_rounds


@pytest.fixture(scope="module")
def users(tmp_path_factory, fake_openai):
    """alice (admin), bob (a user), carol (a user granted `shell` in config.toml)."""
    home = tmp_path_factory.mktemp("privilege")
    for name in ("alice", "bob", "carol"):
        add_user(home, name)
    tokens = {name: make_token(home, name) for name in ("alice", "bob", "carol")}
    config = '[tools]\napproval_timeout_s = 5\n[tools.grants]\ncarol = ["shell"]\n'
    srv = PrismdServer(home, openai_env(fake_openai), config).start()
    srv.tokens = tokens  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def _client(srv: PrismdServer, user: str):
    token = srv.tokens[user]  # type: ignore[attr-defined]
    return ws_client(srv.ws_url, additional_headers={"Authorization": f"Bearer {token}"})


def _tool_names(request: dict) -> set[str]:
    return {t["function"]["name"] for t in request.get("tools", [])}


def test_a_users_model_cannot_reach_the_shell(users, fake_openai):
    marker = users.home / "shell-ran"
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": f"touch {marker}"})]),
        Reply(text=["no shell for you"]),
    )
    with _client(users, "bob") as c:
        frames = c.turn(message="become root")
    assert of_type(frames, "approval_request") == []
    end = of_type(frames, "tool_end")[0]
    assert end["name"] == "shell" and end["status"] == "error"
    assert "Unknown tool 'shell'" in end["output"]
    assert not marker.exists()
    # The model was never offered the tool either.
    first = fake_openai.requests[-2]
    assert "shell" not in _tool_names(first) and "file_read" in _tool_names(first)
    assert of_type(frames, "done")[0]["finalContent"] == "no shell for you"


def test_a_users_approval_cannot_run_the_shell(users, fake_openai):
    """Even answering yes before being asked (a request id guessed) changes nothing."""
    marker = users.home / "approved-shell-ran"
    script_rounds(
        fake_openai,
        Reply(tool_calls=[call("shell", {"command": f"touch {marker}"})]),
        Reply(text=["done"]),
    )
    with _client(users, "bob") as c:
        c.send(type="chat", message="run it")
        c.send(type="approval_response", requestId="appr_guess", approved=True)
        frames = c.until("context_usage")
    assert of_type(frames, "approval_request") == []
    assert [e["status"] for e in of_type(frames, "tool_end")] == ["error"]
    assert not marker.exists()


def test_admins_and_granted_users_are_asked(users, fake_openai):
    for user in ("alice", "carol"):
        script_rounds(
            fake_openai,
            Reply(tool_calls=[call("shell", {"command": "echo hi"})]),
            Reply(text=["ok"]),
        )
        with _client(users, user) as c:
            c.send(type="chat", message="say hi")
            request = c.until("approval_request")[-1]
            assert request["request"]["tool"] == "shell"
            # Derived from what the tool reaches: the host itself.
            assert request["request"]["dataClassification"] == "restricted"
            assert "shell" in _tool_names(fake_openai.requests[-1])
            c.send(type="approval_response", requestId=request["requestId"], approved=False)
            frames = c.until("context_usage")
        assert [e["status"] for e in of_type(frames, "tool_end")] == ["denied"]


def test_tools_endpoint_says_who_may_use_what(users):
    def tools_for(user: str) -> dict[str, dict]:
        headers = {"Authorization": f"Bearer {users.tokens[user]}"}
        resp = httpx.get(f"{users.url}/api/tools", headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text
        return {t["name"]: t for t in resp.json()["tools"]}

    bob, carol, alice = tools_for("bob"), tools_for("carol"), tools_for("alice")
    assert bob["shell"]["hostLevel"] is True
    assert bob["shell"]["agents"]["assistant"] == "deny"
    assert "admins only" in bob["shell"]["why"]["assistant"]
    assert carol["shell"]["agents"]["assistant"] == "approve"
    assert "granted to carol" in carol["shell"]["why"]["assistant"]
    assert alice["shell"]["agents"]["assistant"] == "approve"
    assert bob["file_read"]["agents"]["assistant"] == "allow"
    classes = {
        name: bob[name]["dataClassification"] for name in ("shell", "file_read", "web_fetch")
    }
    assert classes == {"shell": "restricted", "file_read": "internal", "web_fetch": "public"}
    assert bob["code_exec"]["hostLevel"] is False


def test_mcp_tools_are_host_level_unless_the_server_allows_users():
    """An MCP server runs (or connects) with the server's credentials for every caller."""
    from dataclasses import dataclass

    from prismd.config import AgentSettings, Settings
    from prismd.tools.base import Tool, ToolSpec
    from prismd.tools.registry import ToolRegistry

    class Dummy(Tool):
        def __init__(self, name: str, host_level: bool) -> None:
            self.spec = ToolSpec(name, "", {"type": "object"}, host_level=host_level)

        async def run(self, args, ctx):  # pragma: no cover - never called
            return ""

    @dataclass
    class Caller:
        name: str
        admin: bool

    settings = Settings.model_validate({"tools": {"grants": {"dora": ["gh__*"]}}})
    registry = ToolRegistry(settings, [Dummy("gh__issue", True), Dummy("notes__add", False)])
    agent = AgentSettings(id="a", name="A")
    granted = AgentSettings(id="g", name="G", grant=["gh__issue"])
    assert set(registry.view(agent, Caller("eve", False)).tools) == {"notes__add"}
    assert set(registry.view(agent, Caller("dora", False)).tools) == {"gh__issue", "notes__add"}
    assert set(registry.view(agent, Caller("root", True)).tools) == {"gh__issue", "notes__add"}
    assert set(registry.view(granted, Caller("eve", False)).tools) == {"gh__issue", "notes__add"}
    # The cache keeps callers apart: eve's view did not become dora's.
    assert set(registry.view(agent, Caller("eve", False)).tools) == {"notes__add"}
