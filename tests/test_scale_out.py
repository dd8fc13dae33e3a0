"""Several prismd processes on one PostgreSQL and one Redis (issue 10): a client may land on any
process and move between them; a session's turn runs in exactly one; its events reach every
bound connection on every process, in order, once; stop and approvals cross processes; a
process killed mid-turn, a Redis restart and a PostgreSQL outage lose nothing a client saw.

Real servers: the test session's PostgreSQL cluster and Redis (tests/services.py), prismd
processes started by tests/conftest.py's PrismdServer, the scripted fake model over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from prismd.testing.fake_models import Reply
from prismd.testing.postgres_server import PostgresServer

from .conftest import Client, PrismdServer, of_type, openai_env, text_of
from .test_tool_turns import call
from .waiting import wait_for

PIECES = [f"p{i:03d} " for i in range(60)]
CONFIG = """
[tools]
approval_timeout_s = 20
"""


class Cluster:
    def __init__(self, tmp_path_factory: Any, env: dict[str, str], n: int) -> None:
        self.nodes = [
            PrismdServer(tmp_path_factory.mktemp(f"node{i}"), env, CONFIG) for i in range(n)
        ]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, fake_openai, make_pg_database, redis_server) -> Iterator[Cluster]:
    env = {
        **openai_env(fake_openai),
        "PRISMD_DATABASE_URL": make_pg_database(),
        "PRISMD_REDIS_URL": redis_server.url,
    }
    nodes = Cluster(tmp_path_factory, env, 2).start()
    yield nodes
    nodes.stop()


def _seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if "seq" in f]


def _followed_elsewhere(on_a: Any, on_b: Any, message: str) -> tuple[str, list[dict[str, Any]]]:
    """`message` sent on `on_a`; once it streams, `on_b` (on the other process) resumes its
    session and sees it stream too. The session id and what `on_b` saw so far."""
    on_a.send(type="chat", message=message)
    sid = on_a.until("chunk")[0]["sessionId"]
    on_b.send(type="resume", sessionId=sid)
    assert on_b.recv()["type"] == "session"
    return sid, on_b.until("chunk")


def _until_turn_end(c: Client, timeout: float = 30) -> list[dict[str, Any]]:
    return c.until("context_usage", timeout=timeout)


def test_a_turn_streams_to_connections_on_every_process(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=PIECES, delay_s=0.02), match="stream everywhere")
    with a.client() as on_a, b.client() as on_b:
        on_a.send(type="chat", message="stream everywhere")
        head = on_a.until("start")
        sid = head[0]["sessionId"]
        on_b.send(type="resume", sessionId=sid)  # the turn in progress, from its start
        bound = on_b.recv()
        assert bound["type"] == "session" and bound["turnRunning"] is True
        seen_b = _until_turn_end(on_b)
        seen_a = head + _until_turn_end(on_a)
    assert text_of(seen_b) == text_of(seen_a) == "".join(PIECES)
    events_a = [f for f in seen_a if "seq" in f]
    assert _seqs(seen_b) == _seqs(events_a) == list(range(1, len(events_a) + 1))
    assert [f["type"] for f in seen_b] == [f["type"] for f in events_a]


def test_two_chats_at_once_on_two_processes_start_exactly_one_turn(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=PIECES[:10], delay_s=0.05), match="only once")
    sid = "race-two-processes"
    before = len(fake_openai.requests)
    results: dict[str, list[dict[str, Any]]] = {}

    def chat(name: str, node: PrismdServer) -> None:
        with node.client() as c:
            c.send(type="chat", message="only once", sessionId=sid)
            results[name] = c.until("context_usage", "error", timeout=30)

    threads = [threading.Thread(target=chat, args=(n, node)) for n, node in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ends = sorted(frames[-1]["type"] for frames in results.values())
    assert ends == ["context_usage", "error"]
    refused = next(f[-1] for f in results.values() if f[-1]["type"] == "error")
    assert refused["code"] == "turn_in_progress"
    assert len([r for r in fake_openai.requests[before:] if "only once" in str(r)]) == 1


def test_client_message_id_holds_across_processes(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=["said ", "once"]), match="idempotent")
    with a.client() as c:
        first = c.turn(message="idempotent", clientMessageId="cm-x")
    sid = first[0]["sessionId"]
    before = len(fake_openai.requests)
    with b.client() as c:
        c.send(type="chat", message="idempotent", clientMessageId="cm-x", sessionId=sid)
        again = c.until("context_usage")
    assert len(fake_openai.requests) == before  # not run again
    assert text_of(again) == "said once"
    assert _seqs(again) == _seqs(first)


def test_a_retry_on_one_process_is_seen_by_the_next_turn_on_another(cluster, fake_openai):
    """Process A has the session loaded; process B drops its last exchange (retry, which logs
    no event); A's next turn must not send the dropped exchange to the model."""
    a, b = cluster.nodes
    with a.client() as c:
        first = c.turn(message="keep this question")
        sid = first[0]["sessionId"]
        c.turn(message="drop this question", sessionId=sid)
        retried = httpx.post(f"{b.url}/api/sessions/{sid}/retry", timeout=10)
        assert retried.status_code == 200, retried.text
        c.turn(message="the next one", sessionId=sid)
    users = [m["content"] for m in fake_openai.requests[-1]["messages"] if m["role"] == "user"]
    assert users == ["keep this question", "the next one"]


def test_stop_from_another_process_ends_the_turn(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=PIECES * 5, delay_s=0.05), match="stop me elsewhere")
    with a.client() as on_a, b.client() as on_b:
        _followed_elsewhere(on_a, on_b, "stop me elsewhere")
        on_b.send(type="stop")
        tail = _until_turn_end(on_b)
        seen_a = _until_turn_end(on_a)  # from its first chunk on: `done` is among these
    assert of_type(tail, "stopped") and of_type(tail, "done")[0]["stopReason"] == "stopped"
    assert of_type(seen_a, "done")[0]["stopReason"] == "stopped"
    assert fake_openai.wait_aborted(1, timeout=10)  # the upstream request was closed


def test_stop_with_no_turn_anywhere_says_so(cluster):
    _, b = cluster.nodes
    with b.client() as c:
        sid = c.turn(message="nothing left to stop")[0]["sessionId"]
        c.send(type="stop")
        assert c.recv() == {"type": "stopped", "turnRunning": False}
    assert sid


def test_an_approval_answered_on_another_process(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(
        Reply(tool_calls=[call("shell", {"command": "echo approved-elsewhere"})], times=1),
        match="needs approval",
    )
    fake_openai.script(Reply(text=["ran it"], times=1), match="needs approval")
    with a.client() as on_a, b.client() as on_b:
        on_a.send(type="chat", message="needs approval")
        request = on_a.until("approval_request")[-1]
        on_b.send(type="resume", sessionId=request["sessionId"])
        assert on_b.recv()["type"] == "session"
        on_b.until("approval_request")
        on_b.send(type="approval_response", requestId=request["requestId"], approved=True)
        frames = _until_turn_end(on_a)
    end = of_type(frames, "tool_end")[0]
    assert end["status"] == "ok" and "approved-elsewhere" in end["output"]
    assert of_type(frames, "approval_resolved")[0]["approved"] is True


def test_a_note_saved_through_one_process_is_found_through_another(cluster, fake_openai):
    """The memory tools keep their notes in PostgreSQL: what an agent noted in a turn on one
    process, a turn of another session on the other process finds (no machine's file)."""
    a, b = cluster.nodes
    note = "The team's deploy window is Tuesday 14:00 UTC."
    fake_openai.script(
        Reply(tool_calls=[call("memory_note", {"text": note, "tags": ["deploy"]})], times=1),
        match="remember the window",
    )
    fake_openai.script(Reply(text=["noted"], times=1), match="remember the window")
    fake_openai.script(
        Reply(tool_calls=[call("memory_search", {"query": "when is the deploy window?"})], times=1),
        match="recall the window",
    )
    fake_openai.script(Reply(text=["Tuesday"], times=1), match="recall the window")
    with a.client() as on_a:
        saved = of_type(on_a.turn(message="remember the window"), "tool_end")[0]
    assert saved["status"] == "ok" and saved["output"].startswith("saved note #")
    with b.client() as on_b:
        found = of_type(on_b.turn(message="recall the window"), "tool_end")[0]
    assert found["status"] == "ok"
    assert found["output"].startswith(saved["output"].removeprefix("saved note ") + " (")
    assert found["output"].endswith(f"[deploy]: {note}")
    for node in cluster.nodes:
        assert not (node.data_dir / "memory.db").exists()
        assert not (node.data_dir / "prismd.db").exists()


def test_a_client_that_moves_to_another_process_mid_turn_loses_nothing(cluster, fake_openai):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=PIECES, delay_s=0.03), match="move mid-turn")
    with a.client() as on_a:
        on_a.send(type="chat", message="move mid-turn")
        seen = on_a.until("chunk")
        while len(of_type(seen, "chunk")) < 5:
            seen.append(on_a.recv())
    sid, last = seen[0]["sessionId"], max(_seqs(seen))
    with b.client() as on_b:
        on_b.send(type="resume", sessionId=sid, lastSeq=last)
        assert on_b.recv()["type"] == "session"
        rest = _until_turn_end(on_b)
    assert _seqs(rest) == list(range(last + 1, last + 1 + len(_seqs(rest))))
    assert text_of(seen) + text_of(rest) == "".join(PIECES)


def test_deleting_a_session_on_one_process_detaches_its_sockets_on_the_others(cluster):
    a, b = cluster.nodes
    with a.client() as on_a:
        sid = on_a.turn(message="to be deleted elsewhere")[0]["sessionId"]
        assert httpx.delete(f"{b.url}/api/sessions/{sid}", timeout=10).status_code == 200
        assert on_a.recv(timeout=10) == {
            "type": "session_ended",
            "sessionId": sid,
            "reason": "deleted",
        }
    assert a.get(f"/api/sessions/{sid}").status_code == 404


def test_kill_9_of_the_process_running_a_turn(
    tmp_path_factory, fake_openai, make_pg_database, redis_server
):
    env = {
        **openai_env(fake_openai),
        "PRISMD_DATABASE_URL": make_pg_database(),
        "PRISMD_REDIS_URL": redis_server.url,
    }
    nodes = Cluster(tmp_path_factory, env, 2).start()
    a, b = nodes.nodes
    try:
        fake_openai.script(Reply(text=PIECES * 10, delay_s=0.05), match="killed mid-turn")
        with a.client() as on_a, b.client() as on_b:
            sid, seen = _followed_elsewhere(on_a, on_b, "killed mid-turn")
            a.kill()
            seen += on_b.until("context_usage", timeout=30)  # the lease (6 s) runs out
        done = of_type(seen, "done")[0]
        assert done["stopReason"] == "interrupted"
        assert done["finalContent"] == text_of(seen)
        assert _seqs(seen) == list(range(_seqs(seen)[0], _seqs(seen)[-1] + 1))
        msgs = b.get(f"/api/sessions/{sid}/messages").json()
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["status"] == "interrupted"
        fake_openai.script(Reply(text=["after ", "the crash"]), match="still there")
        with b.client() as c:
            after = c.turn(message="still there", sessionId=sid)
        assert text_of(after) == "after the crash"
        assert _seqs(after)[0] == _seqs(seen)[-1] + 1
    finally:
        nodes.stop()


def test_a_redis_restart_loses_no_event(cluster, fake_openai, redis_server):
    a, b = cluster.nodes
    fake_openai.script(Reply(text=PIECES * 2, delay_s=0.03), match="through a redis restart")
    with a.client() as on_a, b.client() as on_b:
        sid, seen = _followed_elsewhere(on_a, on_b, "through a redis restart")
        redis_server.restart()
        seen += _until_turn_end(on_b, timeout=60)
        _until_turn_end(on_a, timeout=60)
    assert text_of(seen) == "".join(PIECES * 2)
    assert _seqs(seen) == list(range(1, _seqs(seen)[-1] + 1))
    # Both processes work normally afterwards.
    for node in (a, b):
        with node.client() as c:
            assert of_type(c.turn(message=f"after the restart {node.port}"), "done")


def test_postgres_unreachable_gives_a_coded_error_then_recovers(
    tmp_path_factory, fake_openai, redis_server
):
    with PostgresServer() as own:
        env = {
            **openai_env(fake_openai),
            "PRISMD_DATABASE_URL": own.create_database(),
            "PRISMD_REDIS_URL": redis_server.url,
        }
        node = PrismdServer(tmp_path_factory.mktemp("pgdown"), env, CONFIG).start()
        try:
            with node.client() as c:
                assert of_type(c.turn(message="before the outage"), "done")
            own.stop()
            with node.client() as c:
                # A coded error, not a hang (c.turn gives up after its timeout).
                frames = c.turn(message="during the outage", timeout=30)
                assert frames[-1]["type"] == "error"
                assert frames[-1]["code"] == "store_unavailable", frames[-1]
            own.start()
            deadline = time.monotonic() + 30
            while True:
                with node.client() as c:
                    frames = c.turn(message="after the outage", timeout=30)
                if frames[-1]["type"] == "context_usage" or time.monotonic() > deadline:
                    break
            assert of_type(frames, "done"), frames[-1]
        finally:
            node.stop()


def test_serve_refuses_several_workers_without_postgres_and_redis(tmp_path):
    from .test_cli_config import prismd

    out = prismd("serve", "--workers", "2", home=tmp_path)
    assert out.returncode == 2
    assert "PRISMD_DATABASE_URL" in out.stderr and "PRISMD_REDIS_URL" in out.stderr


def test_serve_says_when_postgres_cannot_be_reached(tmp_path, redis_server):
    from .conftest import free_port
    from .test_cli_config import prismd

    url = f"postgresql://prismd:secret-pass@127.0.0.1:{free_port()}/prismd"
    out = prismd("serve", home=tmp_path, env={"PRISMD_DATABASE_URL": url})
    assert out.returncode == 2 and "cannot use the store" in out.stderr
    assert "Traceback" not in out.stderr and "secret-pass" not in out.stderr


def test_serve_with_several_workers(tmp_path, fake_openai, make_pg_database, redis_server):
    """`prismd serve --workers 2`: two processes on one port, sharing sessions."""
    import signal
    import subprocess
    import sys

    from .conftest import ROOT, free_port

    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PRISMD_")}
    env.update(
        openai_env(fake_openai),
        PRISMD_HOME=str(tmp_path),
        PRISMD_DATABASE_URL=make_pg_database(),
        PRISMD_REDIS_URL=redis_server.url,
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismd", "serve", "--workers", "2", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        node = PrismdServer(tmp_path, env)
        node.port = port
        pids: set[int] = set()

        def both_answered() -> bool:  # each worker reports its process in health
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                body = httpx.get(f"{node.url}/api/health", timeout=2).json()
                if "pid" in body:
                    pids.add(body["pid"])
            return len(pids) >= 2

        wait_for(both_answered, "both workers to answer", 60)
        fake_openai.script(Reply(text=["two ", "workers"]), match="workers")
        with node.client() as c:
            frames = c.turn(message="workers")
        sid = frames[0]["sessionId"]
        assert text_of(frames) == "two workers"
        with node.client() as c:  # may land on the other worker
            again = c.turn(message="workers again", sessionId=sid)
        assert again[0]["type"] == "session" or of_type(again, "done")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_login_and_connection_limits_count_across_processes(
    tmp_path_factory, fake_openai, make_pg_database, redis_server
):
    from .test_auth import add_user, make_token, ws_client

    # A Redis database of its own: the connection counts of processes that earlier tests
    # killed (from the same address) still count until they expire, 30 s after the kill.
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/7"
    config = (
        CONFIG
        + "\n[server]\nmax_connections_per_client = 2\nlimit_loopback = true\n"
        + f'\n[store]\nurl = "{make_pg_database()}"\n\n[bus]\nurl = "{redis_url}"\n'
    )
    nodes = [
        PrismdServer(tmp_path_factory.mktemp(f"limits{i}"), openai_env(fake_openai), config)
        for i in range(2)
    ]
    add_user(nodes[0].home, "alice")  # the store is shared: alice exists for both
    for node in nodes:
        node.start()
    a, b = nodes
    try:
        wrong = {"username": "alice", "password": "not-her-password"}
        for _ in range(5):  # the address's minute allows five failures, wherever they land
            assert httpx.post(f"{a.url}/api/auth/login", json=wrong, timeout=10).status_code == 401
        sixth = httpx.post(f"{b.url}/api/auth/login", json=wrong, timeout=10)
        assert sixth.status_code == 429 and int(sixth.headers["Retry-After"]) >= 1

        # (The address is at its login limit now: the sockets use a token.)
        add_user(a.home, "bob")
        headers = {"Authorization": f"Bearer {make_token(a.home, 'bob')}"}
        first = ws_client(a.ws_url, additional_headers=headers)
        second = ws_client(b.ws_url, additional_headers=headers)
        # A third, on either process, is refused: two are open.
        with connect(a.ws_url, additional_headers=headers, open_timeout=10) as third:
            refused = json.loads(third.recv(timeout=10))
        assert refused["type"] == "error" and refused["code"] == "rate_limited"
        for c in (first, second):
            c.close()
    finally:
        for node in nodes:
            node.stop()


def test_a_rolling_restart_finishes_the_turns_it_runs(
    tmp_path_factory, fake_openai, make_pg_database, redis_server
):
    """SIGTERM to the process running a turn: it stops taking connections, and the turn
    finishes before it exits; the session's clients on the other process get all of it."""
    env = {
        **openai_env(fake_openai),
        "PRISMD_DATABASE_URL": make_pg_database(),
        "PRISMD_REDIS_URL": redis_server.url,
    }
    nodes = Cluster(tmp_path_factory, env, 2).start()
    a, b = nodes.nodes
    try:
        fake_openai.script(Reply(text=PIECES, delay_s=0.04), match="restart under me")
        with a.client() as on_a, b.client() as on_b:
            on_a.send(type="chat", message="restart under me")
            head = on_a.until("chunk")
            on_b.send(type="resume", sessionId=head[0]["sessionId"])
            assert on_b.recv()["type"] == "session"
            stopping = threading.Thread(target=a.stop)
            stopping.start()
            seen = _until_turn_end(on_b, timeout=60)
            stopping.join(60)
        done = of_type(seen, "done")[0]
        assert done["stopReason"] == "end" and done["finalContent"] == "".join(PIECES)
        assert a.proc is not None and a.proc.returncode is not None  # it did exit
    finally:
        nodes.stop()
