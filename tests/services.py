"""Throwaway servers for the tests: a PostgreSQL cluster of the test session's own.

`postgres` starts one cluster per test session, on first use (tests that do not ask for it pay
nothing): `initdb` in a temporary directory, `pg_ctl start` on a free 127.0.0.1 port with its
socket in that directory, stopped and removed at the end (also when a test fails). It uses
Debian's `postgresql` package (`make install` installs it); as root, the server runs as the
`postgres` user the package creates (PostgreSQL refuses to run as root).

`make_pg_database()` creates a fresh, empty database on that cluster and returns its URL: one
per test module at most (a database costs a copy of the template; tests in a module share one
and `reset_pg_database` empties it between them).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


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


class PostgresCluster:
    """One PostgreSQL server in a temporary directory, trusting local connections."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
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
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{proc.stderr}\n{log}")
        return proc

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        # fsync off: a test cluster is thrown away, and the tests do not crash PostgreSQL.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        args = ["-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options]
        self._run("pg_ctl", *args, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database]
        return self._run("psql", *args, "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()

    def watch(self) -> None:
        """If this test process dies without cleaning up (SIGKILL), a watchdog stops the
        cluster and removes its directory: no test run leaves a server behind."""
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
            start_new_session=True,  # not in the test's process group: it outlives a kill
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed (Debian's `postgresql`): run `make install`")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.watch()
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def make_pg_database(postgres: PostgresCluster) -> Callable[[], str]:
    """A function that creates a fresh database on the test cluster and returns its URL
    (for whole-server tests: `PRISMD_DATABASE_URL=make_pg_database()`)."""
    return postgres.create_database


def reset_pg_database(cluster: PostgresCluster, url: str) -> None:
    """Empty every table of prismd's schema (the schema and its version stay)."""
    database = url.rsplit("/", 1)[1]
    tables = cluster.psql(
        "SELECT string_agg(quote_ident(tablename), ',') FROM pg_tables "
        "WHERE schemaname='public' AND tablename <> 'schema_migrations'",
        database,
    ).strip()
    if tables:
        cluster.psql(f"TRUNCATE {tables}", database)


@pytest.fixture(scope="module")
def pg_module_url(postgres: PostgresCluster) -> str:
    """A fresh database for one test module (its tests empty it with reset_pg_database)."""
    return postgres.create_database()
