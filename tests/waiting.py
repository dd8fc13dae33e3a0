"""Waiting on a condition, never on a fixed time: poll it until it holds. The deadline only
guards against a hang (the test then fails, naming what it waited for); it never decides a
result, so a slow machine passes and a broken one fails."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_S = 0.02  # between two looks at the condition


def _timed_out(what: str, detail: Callable[[], Any] | None) -> str:
    return f"timed out waiting for {what}" + (f": {detail()}" if detail is not None else "")


def wait_for(
    condition: Callable[[], T],
    what: str,
    within: float = 30.0,
    detail: Callable[[], Any] | None = None,
) -> T:
    """Call `condition` until it returns something true, and return that. `detail` adds the
    state seen last to the failure."""
    deadline = time.monotonic() + within
    while not (value := condition()):
        assert time.monotonic() < deadline, _timed_out(what, detail)
        time.sleep(POLL_S)
    return value


async def until(
    condition: Callable[[], T | Awaitable[T]],
    what: str,
    within: float = 30.0,
    detail: Callable[[], Any] | None = None,
) -> T:
    """`wait_for` on the event loop; `condition` may be a coroutine function."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        assert time.monotonic() < deadline, _timed_out(what, detail)
        await asyncio.sleep(POLL_S)
