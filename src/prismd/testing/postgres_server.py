"""A throwaway PostgreSQL server on a free 127.0.0.1 port, for tests and benchmarks.

Debian's `postgresql` package (installed by `make install`; the newest of
/usr/lib/postgresql/N/bin): `initdb` in a temporary directory, the server on a free port with
its socket in that directory, stopped and its directory removed on exit. As root, it runs as
the `postgres` user the package creates (PostgreSQL refuses to run as root). Local connections
are trusted; fsync is off (a throwaway cluster; nothing here crashes PostgreSQL itself).
`stop()` / `start()` stop and start it again on the same port, as an operator's restart would.
A watchdog removes it if the process that started it dies without cleaning up (SIGKILL).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin_dir() -> Path | None:
    """Debian installs each major version under /usr/lib/postgresql/N/bin; the newest wins."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


class PostgresServer:
    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or postgres_bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (make install installs it)")
        self.bin_dir = found
        self._as_postgres = os.geteuid() == 0
        # As root, in /tmp: the `postgres` user must reach it (a root-only TMPDIR would not
        # do), and the socket path must stay short.
        self.root = Path(
            tempfile.mkdtemp(prefix="prismd-pg-", dir="/tmp" if self._as_postgres else None)
        )
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{proc.stderr}\n{log}")
        return proc

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._watch()
            init = ["-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
            self._run("initdb", *init, "--locale=C", "--no-sync")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        args = ["-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options]
        self._run("pg_ctl", *args, "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """`fast`: connections are ended, as by an operator's restart; `immediate`: as by a
        crash."""
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def psql(self, sql: str, database: str = "postgres") -> str:
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database]
        return self._run("psql", *args, "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None

    def _watch(self) -> None:
        stop = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
        if self._as_postgres:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        script = (
            "import os, shutil, subprocess, sys, time\n"
            "while os.getppid() == int(sys.argv[1]):\n"
            "    time.sleep(1)\n"
            "subprocess.run(sys.argv[3:], capture_output=True)\n"
            "shutil.rmtree(sys.argv[2], ignore_errors=True)\n"
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", script, str(os.getpid()), str(self.root), *stop],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in the starter's process group: it outlives a kill
        )

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
