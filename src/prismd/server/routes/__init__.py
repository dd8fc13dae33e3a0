"""The REST API (`/api/...`; OpenAPI schema at /openapi.json, docs at /docs), one router per
resource. The bodies are CortexPrism's (PROTOCOL.md D, shapes in rows.py); what every route
shares (the caller, the server, the caller's session, the error shape) is in common.py.

Credentials are checked before a route runs (auth/middleware.py). Sessions, agents and uploads
belong to a user: another user's object is answered exactly like a missing one (404), so ids
are not revealed; admins see everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI


def install(app: FastAPI) -> None:
    """Add the routers and the handlers that give every refusal the API's error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from ...protocol import PrismdError
    from . import agents, auth, common, config, meta, providers, sessions, tools, uploads, users

    for module in (meta, auth, sessions, agents, tools, config, providers, uploads, users):
        app.include_router(module.router)
    app.add_exception_handler(common.ApiError, common.api_error)
    app.add_exception_handler(PrismdError, common.protocol_error)
    app.add_exception_handler(RequestValidationError, common.validation_error)
    app.add_exception_handler(HTTPException, common.http_error)
