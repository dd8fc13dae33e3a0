"""How fast a revoked credential closes its open sockets, and what the watcher costs.

Starts a prismd (fresh temporary PRISMD_HOME, fake model) on 127.0.0.1 and measures:
- `prismd tokens revoke` (another process) -> the token's socket closed (from the command's exit);
- `POST /api/auth/logout` sent -> the login's socket closed;
- the idle server's CPU with 100 open sockets, and with none.

    .venv/bin/python bench/revocation.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from prismd.testing.fake_models import FakeModelServer  # noqa: E402
from tests.conftest import Client, PrismdServer, openai_env  # noqa: E402
from tests.test_security_auth import (  # noqa: E402
    add_user,
    cookie_of,
    cookie_ws,
    token_for,
    token_ws,
)


def closed_after(client: Client, start: float) -> float:
    try:
        while True:
            client.recv(timeout=10)
    except ConnectionClosed:
        return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with FakeModelServer("openai") as fake:
        home = Path(tempfile.mkdtemp(prefix="prismd-revocation-"))
        add_user(home, "alice")
        srv = PrismdServer(home, openai_env(fake)).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PRISMD_"))}
        env["PRISMD_HOME"] = str(home)
        try:
            by_cli, by_rest = [], []
            for i in range(args.runs):
                token_id, token = token_for(home, "alice", f"bench-{i}")
                client = token_ws(srv, token)
                revoke = [sys.executable, "-m", "prismd", "tokens", "revoke", token_id]
                subprocess.run(revoke, env=env, check=True, capture_output=True)
                by_cli.append(closed_after(client, time.monotonic()))
            for _ in range(args.runs):
                cookie = cookie_of(srv.url, "alice")
                client = cookie_ws(srv, cookie)
                start = time.monotonic()
                httpx.post(f"{srv.url}/api/auth/logout", cookies={"prismd_session": cookie})
                by_rest.append(closed_after(client, start))
            print(
                f"prismd tokens revoke -> socket closed: median {statistics.median(by_cli):.3f} s,"
                f" max {max(by_cli):.3f} s ({args.runs} runs)"
            )
            print(
                f"POST /api/auth/logout -> socket closed: median {statistics.median(by_rest):.3f}"
                f" s, max {max(by_rest):.3f} s ({args.runs} runs)"
            )
            assert srv.proc is not None
            proc = psutil.Process(srv.proc.pid)
            _, token = token_for(home, "alice", "bench-idle")
            sockets = [token_ws(srv, token) for _ in range(100)]
            proc.cpu_percent(None)
            time.sleep(20)
            print(f"idle server, 100 open sockets: {proc.cpu_percent(None):.2f} % of a core")
            for s in sockets:
                s.close()
            time.sleep(2)
            proc.cpu_percent(None)
            time.sleep(20)
            print(f"idle server, no socket: {proc.cpu_percent(None):.2f} % of a core")
        finally:
            srv.stop()
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
