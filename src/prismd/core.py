"""The service container: everything a request handler needs, built once per server.

Routes, the WebSocket handler and the middleware receive it (`app.state.prismd`); nothing in it
imports the web layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING

from .agent.agents import AgentDirectory
from .agent.runner import TurnRunner
from .auth import Auth
from .auth.limits import RedisLimits
from .config import ConfigError, Settings
from .providers.registry import ProviderRegistry
from .server.metrics import Metrics
from .sessions.bus import EventBus, LocalBus
from .sessions.coordination import LocalCoordination
from .sessions.redis_bus import RedisBus  # imports redis only when one is built
from .sessions.service import SessionService
from .store import make_store
from .store.base import LOCAL_USER_ID, Store
from .tools.builtins import builtin_tools, sandbox
from .tools.registry import ToolRegistry

if TYPE_CHECKING:
    from .tools.mcp import McpManager

log = logging.getLogger("prismd")


class Prismd:
    """Everything a request handler needs, built once per server."""

    def __init__(self, settings: Settings, probe_ollama: bool = True) -> None:
        self.settings = settings
        # This process among several (logs, leases, the bus's origin).
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.store: Store = make_store(settings)
        self.bus, coordination = self._coordination(settings)
        self.sessions = SessionService(
            self.store,
            self.bus,
            max_events=settings.server.max_events_per_session,
            coordination=coordination,
        )
        self.providers = ProviderRegistry(settings, probe_ollama=probe_ollama)
        self.agents = AgentDirectory(settings)
        self.tools = ToolRegistry(settings, builtin_tools())
        self.mcp: McpManager | None = None
        self.runner = TurnRunner(settings, self.providers, self.sessions, self.tools)
        # Speech engines, loaded on first use (voice/engines.py imports nothing heavy).
        from .voice.engines import VoiceEngines

        self.voice = VoiceEngines(settings.voice)
        self.runner.reply_speaker = self.voice.reply_speaker
        self.connections: set[object] = set()
        self.auth = Auth(settings, self.store)
        self.metrics = Metrics(self.connections)
        self.sessions.observers.append(
            lambda live, event: self.metrics.on_event(live.record.agent_id, event)
        )
        self._background: set[asyncio.Task[None]] = set()

    def _coordination(self, settings: Settings) -> tuple[EventBus, LocalCoordination]:
        """The in-process bus, or Redis between processes (sessions/coordination.py)."""
        if not settings.bus.url:
            return LocalBus(), LocalCoordination()
        if not hasattr(self.store, "acquire_lease"):
            raise ConfigError(
                "bus.url (Redis) coordinates several prismd processes over a shared PostgreSQL "
                "store: set store.url (PRISMD_DATABASE_URL) too"
            )
        from .sessions.coordination import DistributedCoordination

        bus = RedisBus(settings.bus.url, self.origin, self.store.read_events)
        return bus, DistributedCoordination(self.store, bus, self.origin)

    async def start(self) -> None:
        # What sandboxed runs of servers that died left behind (blocking: milliseconds).
        await asyncio.to_thread(sandbox.sweep_leftovers)
        await self.store.open()
        if isinstance(self.bus, RedisBus):
            await self.bus.start()
            # Failed logins and connections per address count across the processes.
            auth = self.settings.auth
            limits = RedisLimits(
                self.bus.redis, self.origin, auth.login_attempts_per_minute, auth.login_delay_max_s
            )
            limits.start()
            self.auth.limits = limits
        await self.sessions.start()
        await self.store.sync_agents(self.agents.rows())
        self.agents.load(await self.store.list_custom_agents(), LOCAL_USER_ID)
        if self.settings.mcp_servers:
            # The MCP SDK costs ~25 MB of memory: loaded only when servers are configured.
            from .tools.mcp import McpManager

            # Its tools come and go at run time (tools/mcp.py): the registry follows.
            self.mcp = McpManager(
                self.settings.mcp_servers, lambda tools: self.tools.set_group("mcp", tools)
            )
            await self.mcp.start()
        warm = asyncio.create_task(asyncio.to_thread(self.providers.warm_up))
        self._background.add(warm)
        warm.add_done_callback(self._background.discard)
        if self.settings.voice.preload:
            preload = asyncio.create_task(self.voice.preload())
            self._background.add(preload)
            preload.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        await self.auth.aclose()
        turns = [t.task for t in self.sessions.running_turns() if t.task is not None]
        drain = self.settings.server.drain_s
        if drain is None:  # several processes: their clients reconnect elsewhere and resume
            drain = 30.0 if self.sessions.coordination.distributed else 0.0
        if turns and drain > 0:
            # A rolling restart: the turns running here finish (their events still reach the
            # session's connections on the other processes) before the process exits.
            log.info("waiting up to %g s for %d running turn(s) to finish", drain, len(turns))
            done, _ = await asyncio.wait(turns, timeout=drain)
            log.info("%d of %d turn(s) finished", len(done), len(turns))
        for task in turns:
            task.cancel()
        if turns:
            await asyncio.gather(*turns, return_exceptions=True)
        await self.sessions.shutdown()
        await self.auth.limits.close()
        if isinstance(self.bus, RedisBus):
            await self.bus.close()
        await self.providers.aclose()
        await self.tools.aclose()
        if self.mcp is not None:
            await self.mcp.aclose()
        self.voice.close()
        await self.store.close()
