"""Limits that must count across every prismd process: failed logins (per client address and
per username) and open WebSocket connections per client address.

One process keeps them in memory (`LocalLimits`). Several processes (`[bus] url`) keep them in
Redis (`RedisLimits`), so that a client cannot multiply a limit by the number of processes
behind a load balancer. A message rate is per connection, and a connection lives in one
process: it stays local (server/ws.py).

Failed logins: an attempt is counted when it arrives (before the password check, so attempts
sent all at once cannot all pass), and taken back when it succeeds. Per address, at most
`per_minute` in a sliding minute; per username, after `per_minute` failures in a row each
attempt waits 1 s after the last failure, doubling up to `delay_max_s` (the name's owner waits,
and is never locked out).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from typing import Any

from ..protocol import ErrorCode, PrismdError

log = logging.getLogger("prismd.auth")
WINDOW_S = 60.0
NAME_FORGET_S = 900.0  # a username's failures are forgotten this long after the last one
CONNECTIONS_TTL_S = 30.0  # a dead process's connection counts expire this long after it


class RateLimited(PrismdError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins: try again in {retry_after} s")
        self.retry_after = retry_after


def _name_wait(count: int, last: float, now: float, free: int, cap: float) -> float:
    if count < free:
        return 0.0
    return max(0.0, last + min(cap, 2.0 ** (count - free)) - now)


class LocalLimits:
    """One process: counts in memory."""

    def __init__(self, per_minute: int, delay_max_s: float) -> None:
        self.per_minute = per_minute
        self.delay_max_s = delay_max_s
        self._addresses: dict[str, deque[float]] = {}
        self._names: dict[str, tuple[int, float]] = {}  # name -> (failures, last failure)
        self._connections: dict[str, int] = {}

    async def login_attempt(self, client: str, name: str) -> Any:
        """Count an attempt; raises RateLimited (nothing counted) when it must wait. Returns a
        token for `login_succeeded`."""
        now = time.time()
        window = self._addresses.get(client)
        if window is not None:
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
        address_wait = (
            window[0] + WINDOW_S - now if window and len(window) >= self.per_minute else 0.0
        )
        count, last = self._names.get(name, (0, now))
        if now - last > NAME_FORGET_S:
            count = 0
        wait = max(address_wait, _name_wait(count, last, now, self.per_minute, self.delay_max_s))
        if wait > 0:
            raise RateLimited(max(1, math.ceil(wait)))
        self._addresses.setdefault(client, deque()).append(now)
        self._names.pop(name, None)
        self._names[name] = (count + 1, now)  # re-inserted: the dict stays oldest-first
        for table in (self._addresses, self._names):
            if len(table) > 100_000:  # bounded memory under a spray of names or addresses
                table.pop(next(iter(table)))
        return now

    async def login_succeeded(self, client: str, name: str, token: Any) -> None:
        window = self._addresses.get(client)
        if window is not None:
            try:
                window.remove(token)
            except ValueError:
                pass
        self._names.pop(name, None)

    async def connect(self, client: str, limit: int) -> bool:
        """Count a connection from `client`; False (not counted) when it has `limit`."""
        if limit and self._connections.get(client, 0) >= limit:
            return False
        self._connections[client] = self._connections.get(client, 0) + 1
        return True

    async def disconnect(self, client: str) -> None:
        left = self._connections.get(client, 1) - 1
        if left > 0:
            self._connections[client] = left
        else:
            self._connections.pop(client, None)

    async def close(self) -> None:
        pass


class RedisLimits(LocalLimits):
    """Several processes: counts in Redis (the bus's client), shared by all of them."""

    PREFIX = "prismd:limits:"

    def __init__(self, redis: Any, origin: str, per_minute: int, delay_max_s: float) -> None:
        super().__init__(per_minute, delay_max_s)
        self.redis = redis
        self.origin = origin
        # This process's connection counts live in a hash of its own that expires unless it
        # is refreshed: a process that dies takes its counts with it.
        self._mine = f"{self.PREFIX}conns:{origin}"
        self._procs = f"{self.PREFIX}procs"
        self._heartbeat: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    async def _beat(self) -> None:
        while True:
            try:
                now = time.time()
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self._procs, {self.origin: now})
                    pipe.zremrangebyscore(self._procs, 0, now - CONNECTIONS_TTL_S)
                    if self._connections:
                        pipe.hset(self._mine, mapping=self._connections)
                    pipe.expire(self._mine, int(CONNECTIONS_TTL_S))
                    await pipe.execute()
            except Exception:  # noqa: BLE001 - Redis is down: counts stay local meanwhile
                pass
            await asyncio.sleep(CONNECTIONS_TTL_S / 3)

    async def login_attempt(self, client: str, name: str) -> Any:
        try:
            return await self._shared_attempt(client, name)
        except RateLimited:
            raise
        except Exception:  # noqa: BLE001 - Redis is down: this process counts alone meanwhile
            log.warning("login limits: Redis unavailable, counting in this process only")
            return await super().login_attempt(client, name)  # a float: see login_succeeded

    async def _shared_attempt(self, client: str, name: str) -> Any:
        now = time.time()
        address = f"{self.PREFIX}addr:{client}"
        user = f"{self.PREFIX}name:{name}"
        member = f"{now:.6f}:{secrets.token_hex(4)}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(address, 0, now - WINDOW_S)
            pipe.zrange(address, 0, 0, withscores=True)
            pipe.zcard(address)
            pipe.hmget(user, "count", "last")
            _, oldest, in_window, (count, last) = await pipe.execute()
        count = int(count or 0)
        last = float(last or now)
        if now - last > NAME_FORGET_S:
            count = 0
        address_wait = oldest[0][1] + WINDOW_S - now if in_window >= self.per_minute else 0.0
        wait = max(address_wait, _name_wait(count, last, now, self.per_minute, self.delay_max_s))
        if wait > 0:
            raise RateLimited(max(1, math.ceil(wait)))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(address, {member: now})
            pipe.expire(address, int(WINDOW_S) + 1)
            pipe.hincrby(user, "count", 1)
            pipe.hset(user, "last", now)
            pipe.expire(user, int(NAME_FORGET_S))
            pipe.zcard(address)
            *_, counted = await pipe.execute()
        if counted > self.per_minute:  # others counted meanwhile: this one is over
            await self.redis.zrem(address, member)
            raise RateLimited(max(1, math.ceil(WINDOW_S - (time.time() - now))))
        return member

    async def login_succeeded(self, client: str, name: str, token: Any) -> None:
        if isinstance(token, float):  # counted locally while Redis was down
            await super().login_succeeded(client, name, token)
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(f"{self.PREFIX}addr:{client}", token)
                pipe.delete(f"{self.PREFIX}name:{name}")
                await pipe.execute()
        except Exception:  # noqa: BLE001 - the failure is forgotten when its window ends
            pass

    async def connect(self, client: str, limit: int) -> bool:
        if limit:
            try:
                procs = await self.redis.zrangebyscore(
                    self._procs, time.time() - CONNECTIONS_TTL_S, "+inf"
                )
                async with self.redis.pipeline(transaction=False) as pipe:
                    for proc in procs:
                        name = proc.decode() if isinstance(proc, bytes) else proc
                        if name != self.origin:
                            pipe.hget(f"{self.PREFIX}conns:{name}", client)
                    others = sum(int(n or 0) for n in await pipe.execute())
            except Exception:  # noqa: BLE001 - Redis is down: judge by this process alone
                others = 0
            if others + self._connections.get(client, 0) >= limit:
                return False
        self._connections[client] = self._connections.get(client, 0) + 1
        await self._publish_count(client)
        return True

    async def disconnect(self, client: str) -> None:
        await super().disconnect(client)
        await self._publish_count(client)

    async def _publish_count(self, client: str) -> None:
        try:
            count = self._connections.get(client, 0)
            async with self.redis.pipeline(transaction=False) as pipe:
                if count:
                    pipe.hset(self._mine, client, count)
                else:
                    pipe.hdel(self._mine, client)
                pipe.expire(self._mine, int(CONNECTIONS_TTL_S))
                await pipe.execute()
        except Exception:  # noqa: BLE001 - Redis is down: the heartbeat writes it later
            pass
