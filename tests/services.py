"""Throwaway servers for the tests: a PostgreSQL cluster and a Redis of the test session's own
(prismd.testing.postgres_server, prismd.testing.redis_server).

`postgres` starts one cluster per test session, on first use (tests that do not ask for it pay
nothing), and stops and removes it at the end, also when tests fail.

`make_pg_database()` creates a fresh, empty database on that cluster and returns its URL (for
whole-server tests: `PRISMD_DATABASE_URL`). A test module needs one at most (`pg_module_url`);
its tests empty it between them with `reset_pg_database`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from prismd.testing.postgres_server import PostgresServer, postgres_bin_dir
from prismd.testing.redis_server import RedisServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if postgres_bin_dir() is None:
        pytest.fail("PostgreSQL is not installed (Debian's `postgresql`): run `make install`")
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def make_pg_database(postgres: PostgresServer) -> Callable[[], str]:
    """A function that creates a fresh database on the test cluster and returns its URL."""
    return postgres.create_database


@pytest.fixture(scope="module")
def pg_module_url(postgres: PostgresServer) -> str:
    """A fresh database for one test module (its tests empty it with reset_pg_database)."""
    return postgres.create_database()


def reset_pg_database(server: PostgresServer, url: str) -> None:
    """Empty every table of prismd's schema (the schema and its version stay)."""
    database = url.rsplit("/", 1)[1]
    tables = server.psql(
        "SELECT string_agg(quote_ident(tablename), ',') FROM pg_tables "
        "WHERE schemaname='public' AND tablename <> 'schema_migrations'",
        database,
    ).strip()
    if tables:
        server.psql(f"TRUNCATE {tables}", database)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis for the test session (prismd.testing.redis_server)."""
    with RedisServer() as server:
        yield server
