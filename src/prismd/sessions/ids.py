"""Ids and timestamps of sessions, turns, messages and events."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    """Random, collision-free ids (128 bits), never derived from the clock."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
