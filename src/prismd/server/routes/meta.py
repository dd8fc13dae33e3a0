"""The server itself: health, status, version; and the CortexPrism routes prismd has nothing
behind, answered as an empty CortexPrism would answer them (PROTOCOL.md D)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from ... import __version__
from ...core import Prismd
from ...protocol import PROTOCOL_VERSION
from .common import Caller, Core, Open, api_router, doc
from .providers import provider_model

router = api_router(tags=["server"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HealthOut(Open):
    status: str
    ts: str
    version: str | None = Field(default=None, description="prismd, with credentials")


class Daemons(BaseModel):
    validator: bool
    executor: bool
    scheduler: bool


class StatusOut(Open):
    provider: str | None = Field(description="The default provider (null: none configured)")
    model: str | None = Field(description="Its default model")
    daemons: Daemons = Field(description="prismd runs no CortexPrism daemons: all false")
    ts: str
    providerConfigured: bool = Field(description="prismd")
    version: str = Field(description="prismd")


class VersionOut(BaseModel):
    version: str
    protocol: int


@router.get(
    "/health", summary="Liveness (and a summary, with credentials)", responses=doc(HealthOut)
)
async def health(request: Request, core: Core) -> dict[str, Any]:
    if getattr(request.state, "user", None) is None:
        # Credentials are needed and none were given: liveness only.
        return {"status": "ok", "ts": _now()}
    return {
        "status": "ok",
        "ts": _now(),
        "version": __version__,
        "provider": core.providers.default_kind,
        "providerConfigured": core.providers.default_kind is not None,
        # The offline demo model says so here: {displayName, note, demo, runtime…}.
        "model": core.providers.describe(),
        "connections": len(core.connections),
        "liveSessions": core.sessions.live_count(),
        "runningTurns": len(core.sessions.running_turns()),
        # Which process answered (several serve one port with --workers, or a load balancer).
        "process": core.origin,
        "pid": os.getpid(),
    }


async def status_body(core: Prismd) -> dict[str, Any]:
    kind = core.providers.default_kind
    body: dict[str, Any] = {
        "provider": kind,
        "model": await provider_model(core, kind) if kind else None,
        # CortexPrism's validator, executor and scheduler processes: prismd has none.
        "daemons": {"validator": False, "executor": False, "scheduler": False},
        "ts": _now(),
        "providerConfigured": kind is not None,
        "version": __version__,
    }
    if kind is not None:
        # prismd's: how to show the model (the offline demo model says what it is).
        shown = core.providers.describe()
        body.update(displayName=shown["displayName"], note=shown["note"], demo=shown["demo"])
    return body


@router.get(
    "/status",
    summary="The default provider and model (CortexPrism's model label)",
    responses=doc(StatusOut),
)
async def status(core: Core, caller: Caller) -> dict[str, Any]:
    return await status_body(core)


@router.get("/version", summary="Server and protocol versions", responses=doc(VersionOut))
async def version() -> dict[str, Any]:
    return {"version": __version__, "protocol": PROTOCOL_VERSION}


# CortexPrism routes its web page reads that have nothing behind them in prismd: an empty
# CortexPrism answers these with an empty list.
EMPTY_LISTS = ("/plugins/panels", "/plugins/slots", "/lens/recent")


async def _empty_list(caller: Caller) -> list[Any]:
    return []


for _path in EMPTY_LISTS:
    router.add_api_route(
        _path,
        _empty_list,
        methods=["GET"],
        summary="CortexPrism's; prismd has none of these: always empty",
        responses=doc(list[dict[str, Any]]),
    )
