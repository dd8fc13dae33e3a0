"""Reaching the PostgreSQL server: `connect` (StoreUnavailable within a deadline), which
errors mean the server cannot be used now (`_unavailable`), and a URL as messages show it
(`describe_url`, never with credentials).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg

from ..base import StoreUnavailable

Conn = Any  # an asyncpg connection (asyncpg ships no type information)


def _unavailable(exc: BaseException) -> bool:
    """The server is unreachable, restarting, out of resources, refuses us, or the connection
    broke (rather than a bad statement or a constraint)."""
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError
        # Refused: a wrong password, a database that does not exist (yet).
        | asyncpg.exceptions.InvalidAuthorizationSpecificationError
        | asyncpg.exceptions.InvalidCatalogNameError,
    )


def describe_url(url: str) -> str:
    """host:port/database of a PostgreSQL URL, without credentials (for messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or '/'}"


async def connect(url: str, timeout_s: float, command_timeout: float | None) -> Conn:
    """A connection, or StoreUnavailable within `timeout_s`."""
    try:
        return await asyncpg.connect(url, timeout=timeout_s, command_timeout=command_timeout)
    except Exception as exc:
        if _unavailable(exc):
            reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc
            raise StoreUnavailable(
                f"PostgreSQL at {describe_url(url)}: cannot connect: {reason}"
            ) from exc
        raise
