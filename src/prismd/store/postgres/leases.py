"""Session leases in the PostgreSQL store: which process runs a session's turns.

Leases (not part of the Store interface): a turn runs in exactly one process, which holds its
session's lease (`sessions.lease_owner`, `sessions.lease_until`) and renews it while the turn
runs. The database's clock decides expiry, never a process's (machines disagree). Lease
statements bypass the writer queue: they are coordination, run directly on the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

import asyncpg

from .core import PostgresCore

log = logging.getLogger("prismd.store")


class PostgresLeases(PostgresCore):
    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        """Take the session's lease for `ttl_s` seconds if it is free, expired, or `owner`'s
        already (then it is extended), atomically. False if another owner holds it, or the
        session's row does not exist (yet: await its `create_session` first)."""
        taken = await self._pooled(
            lambda c: c.fetchval(
                "UPDATE sessions SET lease_owner=$2, "
                "lease_until=clock_timestamp() + make_interval(secs => $3) "
                "WHERE id=$1 AND (lease_owner IS NULL OR lease_owner=$2 "
                "OR lease_until <= clock_timestamp()) RETURNING true",
                session_id,
                owner,
                float(ttl_s),
            )
        )
        return bool(taken)

    async def renew_leases(self, session_ids: list[str], owner: str, ttl_s: float) -> list[str]:
        """Extend `owner`'s unexpired leases of these sessions, in one statement; returns
        those still held. A lease that expired is lost even if nobody took it (another
        process may be repairing its turn): its turn must end."""
        if not session_ids:
            return []
        rows = await self._pooled(
            lambda c: c.fetch(
                "UPDATE sessions SET lease_until=clock_timestamp() + make_interval(secs => $3) "
                "WHERE id = ANY($1::text[]) AND lease_owner=$2 "
                "AND lease_until > clock_timestamp() RETURNING id",
                list(session_ids),
                owner,
                float(ttl_s),
            )
        )
        return [r[0] for r in rows]

    def keep_leases(
        self,
        owner: str,
        held: Callable[[], Collection[str]],
        lost: Callable[[list[str]], None],
        ttl_s: float,
        every_s: float,
    ) -> Callable[[], None]:
        """Renew `owner`'s leases (the ids `held()` returns) every `every_s`, from a thread
        with an event loop and a connection of its own: a busy event loop (a thousand streams
        on two cores) must not let a live process's leases expire, which would hand its
        running turns to another process. `lost(ids)` is called on the calling loop with the
        leases that could not be renewed. Returns a function that stops the keeper."""
        caller = asyncio.get_running_loop()
        stopping = threading.Event()

        async def keep() -> None:
            conn: Any = None
            while not stopping.is_set():
                ids = list(held())
                if ids:
                    try:
                        if conn is None or conn.is_closed():
                            conn = await asyncpg.connect(self.url, timeout=self.timeout_s)
                        rows = await conn.fetch(
                            "UPDATE sessions SET lease_until=clock_timestamp() + "
                            "make_interval(secs => $3) WHERE id = ANY($1::text[]) AND "
                            "lease_owner=$2 AND lease_until > clock_timestamp() RETURNING id",
                            ids,
                            owner,
                            float(ttl_s),
                            timeout=self.timeout_s,
                        )
                        kept = {r[0] for r in rows}
                        gone = [i for i in ids if i not in kept]
                        if gone:
                            caller.call_soon_threadsafe(lost, gone)
                    except Exception as exc:  # noqa: BLE001 - the lease outlives a blip
                        log.warning("lease renewal failed: %s", exc)
                        if conn is not None:
                            conn.terminate()
                            conn = None
                await asyncio.get_running_loop().run_in_executor(None, stopping.wait, every_s)
            if conn is not None:
                conn.terminate()

        thread = threading.Thread(
            target=lambda: asyncio.run(keep()), name="prismd-leases", daemon=True
        )
        thread.start()

        def stop() -> None:
            stopping.set()
            thread.join(self.timeout_s + every_s)

        return stop

    async def release_lease(self, session_id: str, owner: str) -> None:
        """Give the lease up (nothing happens if `owner` does not hold it)."""
        await self._pooled(
            lambda c: c.execute(
                "UPDATE sessions SET lease_owner=NULL, lease_until=NULL "
                "WHERE id=$1 AND lease_owner=$2",
                session_id,
                owner,
            )
        )

    async def running_turn(self, session_id: str) -> str | None:
        """The session's turn still `running` in the store, if any (run by whichever process
        holds the lease)."""
        value = await self._pooled(
            lambda c: c.fetchval(
                "SELECT id FROM turns WHERE session_id=$1 AND status='running' "
                "ORDER BY pos DESC LIMIT 1",
                session_id,
            )
        )
        return str(value) if value is not None else None

    async def expired_turns(self) -> list[str]:
        """Sessions with a turn still `running` and no live lease: the process that ran it
        died (or never took one)."""
        rows = await self._pooled(
            lambda c: c.fetch(
                "SELECT DISTINCT t.session_id FROM turns t "
                "LEFT JOIN sessions s ON s.id = t.session_id "
                "WHERE t.status='running' AND (s.lease_until IS NULL "
                "OR s.lease_until <= clock_timestamp())"
            )
        )
        return [r[0] for r in rows]

    async def crashed_sessions(self) -> list[str]:
        """Sessions with a turn still `running` and no live lease (see `expired_turns`): with
        several processes, a running turn under a live lease is another process's."""
        return await self.expired_turns()
