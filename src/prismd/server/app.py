"""The ASGI application: the service container (core.py) behind the routes and middleware."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .. import __version__
from ..auth.middleware import AuthMiddleware
from ..config import Settings
from ..core import Prismd

__all__ = ["Prismd", "create_app"]

log = logging.getLogger("prismd")


def create_app(settings: Settings, probe_ollama: bool = True) -> FastAPI:
    core = Prismd(settings, probe_ollama=probe_ollama)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

        from .uploads import prune_periodically

        await core.start()
        log.info("prismd %s serving data from %s", __version__, settings.data_dir)
        janitor = asyncio.create_task(prune_periodically(core), name="prismd-uploads-janitor")
        try:
            yield
        finally:
            janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await janitor
            await core.stop()

    app = FastAPI(
        title="prismd",
        version=__version__,
        description="A self-hosted agentic AI harness speaking CortexPrism's WebSocket protocol.",
        lifespan=lifespan,
        # /docs is served by web.py with a vendored Swagger UI (FastAPI's loads it from a CDN,
        # which an offline server cannot reach); ReDoc would need one too.
        docs_url=None,
        redoc_url=None,
    )
    app.state.prismd = core
    app.add_middleware(AuthMiddleware, core=core)
    from .limits import BodyLimitMiddleware
    from .routes.uploads import max_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit=lambda: max_body_bytes(settings))

    from . import routes, ws

    # /ws first: routes are matched in order, and every connection would otherwise be
    # compared with each REST route before it (a quarter of a millisecond per connection).
    app.include_router(ws.router)
    routes.install(app)
    from . import voice

    app.include_router(voice.router)
    from . import metrics

    app.include_router(metrics.router)
    from . import web

    app.include_router(web.router)
    return app


def from_environment() -> FastAPI:
    """The app of one worker of `prismd serve --workers N` (the settings come from the
    environment and PRISMD_CONFIG; see cli.py)."""
    import os

    from ..config import load_settings
    from ..logs import configure_logging

    settings = load_settings(os.environ.get("PRISMD_CONFIG") or None)
    configure_logging(settings)
    return create_app(settings)
