"""The event bus: who receives a session's events.

In one process this is a dict of subscriber sets. A multi-process deployment would put Redis
pub/sub behind the same three methods; seq numbering stays with the session's event log.
"""

from __future__ import annotations

import abc
from typing import Protocol


class Subscriber(Protocol):
    def deliver(self, seq: int, frame: str) -> None:
        """Queue one already-serialised frame; must not block."""

    def session_gone(self, session_id: str, reason: str) -> None:
        """The session was deleted (`reason` "deleted"), or dropped after its store failed
        ("store_failed"): stop treating it as bound (a deleted id may be reused)."""


class EventBus(abc.ABC):
    @abc.abstractmethod
    def subscribe(self, session_id: str, subscriber: Subscriber) -> None: ...

    @abc.abstractmethod
    def unsubscribe(self, session_id: str, subscriber: Subscriber) -> None: ...

    @abc.abstractmethod
    def publish(
        self, session_id: str, seq: int, frame: str, exclude: Subscriber | None = None
    ) -> None: ...

    @abc.abstractmethod
    def subscribers(self, session_id: str) -> int: ...

    @abc.abstractmethod
    def detach_all(self, session_id: str, reason: str = "deleted", everywhere: bool = True) -> None:
        """Unsubscribe everyone from a session and tell them (`session_gone`); on every
        process, or (`everywhere` False) on this one only."""

    def position(self, session_id: str, seq: int) -> None:  # noqa: B027 - optional
        """This process's connections to the session have every event up to `seq`."""


class LocalBus(EventBus):
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscriber]] = {}

    def subscribe(self, session_id: str, subscriber: Subscriber) -> None:
        self._subs.setdefault(session_id, set()).add(subscriber)

    def unsubscribe(self, session_id: str, subscriber: Subscriber) -> None:
        subs = self._subs.get(session_id)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._subs[session_id]

    def publish(
        self, session_id: str, seq: int, frame: str, exclude: Subscriber | None = None
    ) -> None:
        for sub in tuple(self._subs.get(session_id, ())):
            if sub is not exclude:
                sub.deliver(seq, frame)

    def subscribers(self, session_id: str) -> int:
        return len(self._subs.get(session_id, ()))

    def detach_all(self, session_id: str, reason: str = "deleted", everywhere: bool = True) -> None:
        for sub in self._subs.pop(session_id, ()):
            sub.session_gone(session_id, reason)
