"""The Redis event bus between processes, on a real Redis server: two buses (as two prismd
processes would have) share one Redis and one event log; whatever Redis drops, every
subscriber gets every event once, in order, from the log."""

from __future__ import annotations

import asyncio
import json

from prismd.sessions.redis_bus import RedisBus


class Log:
    """The event log both processes read (the store's read_events)."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[int, str]]] = {}

    def add(self, session_id: str, seq: int) -> str:
        frame = json.dumps({"type": "chunk", "delta": f"d{seq}", "seq": seq})
        self.events.setdefault(session_id, []).append((seq, frame))
        return frame

    async def read(self, session_id: str, after: int) -> list[tuple[int, str]]:
        return [(s, f) for s, f in self.events.get(session_id, []) if s > after]


class Tab:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.frames: list[str] = []
        self.gone: list[str] = []
        self.changed = asyncio.Event()

    def deliver(self, seq: int, frame: str) -> None:
        self.seqs.append(seq)
        self.frames.append(frame)
        self.changed.set()

    def session_gone(self, session_id: str, reason: str) -> None:
        self.gone.append(reason)
        self.changed.set()

    async def until(self, cond, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


async def _pair(url: str, log: Log) -> tuple[RedisBus, RedisBus]:
    a = RedisBus(url, "process-a", log.read)
    b = RedisBus(url, "process-b", log.read)
    await a.start()
    await b.start()
    await a.connected.wait()
    await b.connected.wait()
    return a, b


def test_events_reach_the_other_process_once_in_order(redis_server):
    async def main() -> None:
        log = Log()
        a, b = await _pair(redis_server.url, log)
        tab_a, tab_b = Tab(), Tab()
        a.subscribe("s1", tab_a)
        b.subscribe("s1", tab_b)
        await b.ready("s1")
        for seq in range(1, 51):
            a.publish("s1", seq, log.add("s1", seq))
        a.publish("s1", 0, json.dumps({"type": "voice_state", "speaking": True}))
        await tab_b.until(lambda: len(tab_b.seqs) == 51)
        assert tab_b.seqs == [*range(1, 51), 0]
        assert tab_a.seqs == [*range(1, 51), 0]  # local delivery, not echoed back
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_gap_is_filled_from_the_log(redis_server):
    async def main() -> None:
        log = Log()
        a, b = await _pair(redis_server.url, log)
        tab = Tab()
        b.subscribe("s2", tab)
        await b.ready("s2")
        a.publish("s2", 1, log.add("s2", 1))
        await tab.until(lambda: tab.seqs == [1])
        log.add("s2", 2)  # logged, but its message is lost
        log.add("s2", 3)
        a.publish("s2", 4, log.add("s2", 4))
        await tab.until(lambda: len(tab.seqs) == 4)
        assert tab.seqs == [1, 2, 3, 4]
        a.publish("s2", 4, log.add("s2", 4))  # a duplicate is dropped
        a.publish("s2", 5, log.add("s2", 5))
        await tab.until(lambda: len(tab.seqs) == 5)
        assert tab.seqs == [1, 2, 3, 4, 5]
        await a.close()
        await b.close()

    asyncio.run(main())


def test_nothing_is_lost_across_a_redis_restart(redis_server):
    async def main() -> None:
        log = Log()
        a, b = await _pair(redis_server.url, log)
        tab = Tab()
        b.subscribe("s3", tab)
        await b.ready("s3")
        for seq in range(1, 4):
            a.publish("s3", seq, log.add("s3", seq))
        await tab.until(lambda: len(tab.seqs) == 3)
        await asyncio.to_thread(redis_server.restart)
        for seq in range(4, 8):  # while Redis comes back: some of these are lost
            a.publish("s3", seq, log.add("s3", seq))
        await b.connected.wait()
        await a.connected.wait()
        a.publish("s3", 8, log.add("s3", 8))
        await tab.until(lambda: len(tab.seqs) == 8, within=20)
        assert tab.seqs == list(range(1, 9))
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_deleted_session_detaches_everywhere(redis_server):
    async def main() -> None:
        log = Log()
        a, b = await _pair(redis_server.url, log)
        tab = Tab()
        b.subscribe("s4", tab)
        await b.ready("s4")
        a.detach_all("s4", "deleted")
        await tab.until(lambda: tab.gone == ["deleted"])
        assert b.subscribers("s4") == 0
        await a.close()
        await b.close()

    asyncio.run(main())


def test_login_limits_count_in_the_process_while_redis_is_down():
    """Redis unreachable: a login attempt is not a server error; the process counts alone
    meanwhile, and still refuses the sixth failure of a minute."""
    import redis.asyncio as aioredis

    from prismd.auth.limits import RateLimited, RedisLimits

    from .conftest import free_port

    async def main() -> None:
        dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
        limits = RedisLimits(dead, "p1", per_minute=5, delay_max_s=0)
        tokens = [await limits.login_attempt("10.0.0.1", f"user{i}") for i in range(5)]
        assert all(isinstance(t, float) for t in tokens)
        try:
            await limits.login_attempt("10.0.0.1", "another")
        except RateLimited:
            pass
        else:
            raise AssertionError("the sixth attempt of the minute was let through")
        await limits.login_succeeded("10.0.0.1", "user0", tokens[0])  # not an error either
        await dead.aclose()

    asyncio.run(main())
