"""The command line and the configuration layers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from prismd.config import ConfigError, load_settings
from prismd.testing.fake_models import Reply

from .conftest import ROOT, stored_rows


def prismd(*args: str, home: Path, env: dict[str, str] | None = None, input: str | None = None):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "PRISMD_", "ANTHROPIC_"))
    }
    full_env.update({"PRISMD_HOME": str(home), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "prismd", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=60,
        input=input,
    )


def test_help_everywhere(tmp_path):
    for args in ([], ["serve"], ["chat"], ["sessions"], ["sessions", "list"], ["agents"]):
        out = prismd(*args, "--help", home=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "usage: prismd" in out.stdout


def test_layers_file_then_env_then_flags(tmp_path):
    (tmp_path / "config.toml").write_text('[server]\nport = 4000\nhost = "127.0.0.2"\n')
    env = {"PRISMD_HOME": str(tmp_path)}
    assert load_settings(env=env).server.port == 4000
    assert load_settings(env={**env, "PRISMD_PORT": "4001"}).server.port == 4001
    s = load_settings(overrides={("server", "port"): 4002}, env={**env, "PRISMD_PORT": "4001"})
    assert s.server.port == 4002 and s.server.host == "127.0.0.2"
    assert s.data_dir == tmp_path / "data"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 'abc'\n", "server.port"),
        ("[server]\nprot = 3000\n", "server.prot: unknown key"),
        ("provider = 'skynet'\n", "provider"),
        ("[[agents]]\nid = 'has space'\nname = 'x'\n", "agents.0.id"),
        ("[[agents]]\nid = 'a'\n", "agents.0.name"),
        ("[providers.openai]\ntimeout_s = -1\n", "providers.openai.timeout_s"),
        ("server = [1\n", "not valid TOML"),
        ("default_agent = 'ghost'\n", "default_agent"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"PRISMD_HOME": str(tmp_path)})
    assert expected in str(exc.value)
    out = prismd("agents", "list", home=tmp_path)
    assert out.returncode == 2
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_agents_list(tmp_path):
    (tmp_path / "config.toml").write_text(
        "[[agents]]\nid = 'coder'\nname = 'Coder'\ndescription = 'Writes code'\n"
    )
    out = prismd("agents", "list", home=tmp_path)
    assert out.returncode == 0
    assert "* assistant" in out.stdout and "coder" in out.stdout and "Writes code" in out.stdout
    # --json: GET /api/agents's objects (CortexPrism's AgentConfig), sorted by name.
    listed = json.loads(prismd("agents", "list", "--json", home=tmp_path).stdout)
    assert [(a["id"], a["default"], a["builtin"]) for a in listed] == [
        ("assistant", True, True),
        ("coder", False, True),
    ]
    assert listed[1]["description"] == "Writes code" and listed[1]["systemPrompt"]


def test_chat_one_shot_and_sessions_commands(server, fake_openai):
    fake_openai.script(Reply(text=["streamed ", "to ", "the terminal"], usage=(10, 3)))
    home = server.home
    out = prismd("chat", "--url", server.ws_url, "-m", "hello from cli", home=home)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "streamed to the terminal\n"
    assert "10 in / 3 out" in out.stderr
    sid = out.stderr.split("[session ")[1].split("]")[0]

    listing = prismd("sessions", "list", home=home)
    assert listing.returncode == 0 and sid in listing.stdout
    shown = prismd("sessions", "show", sid, home=home)
    assert "hello from cli" in shown.stdout and "streamed to the terminal" in shown.stdout
    # --json: the same rows as the REST API.
    rows = json.loads(prismd("sessions", "list", "--json", home=home).stdout)
    (row,) = [r for r in rows if r["id"] == sid]
    rest = {r["id"]: r for r in server.get("/api/sessions?limit=500").json()}
    assert row == rest[sid]
    shown = json.loads(prismd("sessions", "show", sid, "--json", home=home).stdout)
    assert shown["session"]["agent_id"] == "assistant" and shown["session"]["turn_count"] == 1
    assert shown["messages"] == server.get(f"/api/sessions/{sid}/messages").json()

    again = prismd("chat", "--url", server.ws_url, "--session", sid, "-q", "-m", "more", home=home)
    assert again.returncode == 0 and again.stderr == ""
    history = fake_openai.requests[-1]["messages"]
    assert history[1]["content"] == "hello from cli"

    assert prismd("sessions", "show", "bad/id", home=home).returncode == 2
    assert prismd("sessions", "show", "sess_nope", home=home).returncode == 1


def test_chat_interactive(server, fake_openai):
    fake_openai.script(Reply(text=["answer one"]), match="first")
    fake_openai.script(Reply(text=["answer two"]), match="second")
    out = prismd("chat", "--url", server.ws_url, "-q", home=server.home, input="first\nsecond\n")
    assert out.returncode == 0, out.stderr
    assert "answer one\n" in out.stdout and "answer two\n" in out.stdout
    assert fake_openai.requests[-1]["messages"][1]["content"] == "first"  # same session


def test_chat_reports_an_unreachable_server(tmp_path):
    out = prismd("chat", "--url", "ws://127.0.0.1:9/ws", "-m", "hi", home=tmp_path)
    assert out.returncode == 1 and "Is `prismd serve` running?" in out.stderr


def test_sessions_delete(server):
    with server.client() as c:
        sid = c.turn(message="to delete")[0]["sessionId"]
    out = prismd("sessions", "delete", sid, home=server.home)
    assert out.returncode == 0
    assert stored_rows(server, "session_messages", sid) == []


def test_serve_refuses_a_bad_config_without_traceback(tmp_path):
    (tmp_path / "config.toml").write_text("[server]\nport = 99999\n")
    out = prismd("serve", home=tmp_path)
    assert out.returncode == 2
    assert "server.port" in out.stderr and "Traceback" not in out.stderr


def test_chat_ctrl_c_stops_the_answer(server, fake_openai):
    import signal

    fake_openai.script(Reply(text=[f"word{i} " for i in range(200)], delay_s=0.05))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PRISMD_"))}
    env["PRISMD_HOME"] = str(server.home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismd", "chat", "--url", server.ws_url, "-m", "long story"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(6)  # the answer has started streaming
    assert first.startswith("word0")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in err
    assert fake_openai.wait_aborted(1)
    assert len((first + out).split()) < 200


def test_sessions_export_writes_a_standalone_database(server, fake_openai, tmp_path):
    fake_openai.script(Reply(text=["exported ", "answer"]), match="export me")
    with server.client() as c:
        frames = c.turn(message="export me")
    sid = frames[0]["sessionId"]
    out = tmp_path / "one.db"
    result = prismd("sessions", "export", sid, "--out", str(out), home=server.home)
    assert result.returncode == 0, result.stderr
    db = sqlite3.connect(out)
    rows = db.execute("SELECT role, content FROM session_messages ORDER BY rowid").fetchall()
    assert rows == [("user", "export me"), ("assistant", "exported answer")]
    seqs = [r[0] for r in db.execute("SELECT seq FROM session_events ORDER BY seq")]
    assert seqs == [f["seq"] for f in frames if "seq" in f]
    assert prismd("sessions", "export", "sess_nope", home=server.home).returncode == 1
