"""What every router shares: the server and the caller as dependencies, errors in the API's
shape (`{"error", "code"}`, PROTOCOL.md B4 and D), and the helpers for the OpenAPI schema.

A route states what it needs in its signature (`core: Core`, `caller: Caller`, and for a
session `session: OwnSession` from sessions.py); a refusal is raised as `ApiError`, which the
handler registered in `install` turns into the error body. FastAPI's own 404/405/422 come out
in the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...auth import Principal
from ...auth.service import COOKIE_NAME
from ...core import Prismd
from ...protocol import ErrorCode, PrismdError

# PROTOCOL.md D: what an unknown route under /api answers.
NOT_FOUND = "not_found"


class ApiError(Exception):
    """A refusal: becomes `{"error": message, "code": code}` (plus `details`) with `status`."""

    def __init__(
        self,
        status: int,
        code: ErrorCode | str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = str(code)
        self.message = message
        self.details = details
        self.headers = headers

    def to_response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.details, self.headers)


def error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "code": str(code)}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(field: str, reason: str, status: int = 422) -> ApiError:
    """A request field that is wrong, named as validation errors name it."""
    return ApiError(
        status,
        ErrorCode.INVALID_MESSAGE,
        f"{field}: {reason}" if field else reason,
        details={"field": field, "reason": reason},
    )


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.to_response()


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation errors in the API's error shape."""
    errors: list[dict[str, Any]] = list(getattr(exc, "errors", list)())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    return invalid(field, str(first["msg"])).to_response()


# A refusal of the services (a ProtocolError, as the WebSocket sends it) over HTTP.
_PROTOCOL_STATUS = {
    ErrorCode.INVALID_SESSION_ID: 400,
    ErrorCode.INVALID_MESSAGE: 422,
    ErrorCode.EMPTY_MESSAGE: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.AGENT_NOT_FOUND: 404,
    ErrorCode.TURN_IN_PROGRESS: 409,
    ErrorCode.PROVIDER_UNCONFIGURED: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.PROVIDER_ERROR: 502,
    ErrorCode.PROVIDER_TIMEOUT: 504,
    ErrorCode.STORE_UNAVAILABLE: 503,
    ErrorCode.BUS_UNAVAILABLE: 503,
    ErrorCode.STT_UNAVAILABLE: 503,
    ErrorCode.TTS_UNAVAILABLE: 503,
    ErrorCode.TRANSCRIPTION_FAILED: 422,
}


async def protocol_error(request: Request, exc: Exception) -> JSONResponse:
    """Any of prismd's failures (protocol.PrismdError: a refused request, the store down…)
    in the API's error shape, with the HTTP status that fits its code."""
    assert isinstance(exc, PrismdError)
    status = _PROTOCOL_STATUS.get(exc.code, 500 if exc.code == ErrorCode.INTERNAL else 400)
    return error_response(status, exc.code, exc.message, getattr(exc, "details", None))


_HTTP_CODES = {
    401: ErrorCode.UNAUTHORIZED.value,
    403: ErrorCode.UNAUTHORIZED.value,
    413: ErrorCode.PAYLOAD_TOO_LARGE.value,
    429: ErrorCode.RATE_LIMITED.value,
}


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no route, wrong method) in the API's shape. Under /api any
    route prismd does not have is a 404 `not_found`, whatever the method (PROTOCOL.md D): a
    client reading the body finds an error, never something it could take for data."""
    assert isinstance(exc, StarletteHTTPException)
    path = request.scope.get("path", "")
    api = path == "/api" or path.startswith("/api/")
    status = exc.status_code
    if status == 404 or (status == 405 and api):
        return error_response(404, NOT_FOUND, "Not found")
    if status == 405:  # the web app's pages
        return error_response(405, NOT_FOUND, "Method not allowed", headers=exc.headers)
    code = _HTTP_CODES.get(status, "internal" if status >= 500 else ErrorCode.INVALID_MESSAGE)
    message = exc.detail if isinstance(exc.detail, str) else "Request refused"
    return error_response(status, code, message, headers=exc.headers)


# ---------------------------------------------------------------- dependencies


def get_core(request: Request) -> Prismd:
    core: Prismd = request.app.state.prismd
    return core


def get_caller(request: Request) -> Principal:
    """The caller; the middleware has refused the request already if credentials are missing.
    Should a route be reached without a user all the same, it fails closed (401)."""
    user: Principal | None = getattr(request.state, "user", None)
    if user is None:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "Authentication required")
    return user


def get_admin(caller: Annotated[Principal, Depends(get_caller)]) -> Principal:
    if not caller.admin:
        raise ApiError(403, ErrorCode.UNAUTHORIZED, "Only an admin may do this")
    return caller


Core = Annotated[Prismd, Depends(get_core)]
Caller = Annotated[Principal, Depends(get_caller)]
Admin = Annotated[Principal, Depends(get_admin)]


# ---------------------------------------------------------------- OpenAPI


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, in words")
    code: str = Field(description="One of the error codes of PROTOCOL.md B4, or not_found")


class Open(BaseModel):
    """A documented shape that may carry more fields than it lists."""

    model_config = ConfigDict(extra="allow")


class Ok(BaseModel):
    ok: bool = True


def doc(model: Any = None, *errors: int, status: int = 200) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its body model and the error statuses it may answer."""
    responses: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        responses[status] = {"model": model}
    for code in errors:
        responses[code] = {"model": ErrorBody}
    return responses


def api_router(*, tags: list[str]) -> APIRouter:
    # 401 without credentials and 422 for a malformed request, on every route.
    return APIRouter(
        prefix="/api",
        tags=list(tags),
        responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )


def cookie_options(request: Request) -> dict[str, Any]:
    """How the login cookie is set and cleared: for the whole site, never to scripts or other
    sites, and only over HTTPS when the page came over HTTPS."""
    return {
        "path": "/",
        "httponly": True,
        "samesite": "strict",
        "secure": request.url.scheme == "https",
    }


def set_login_cookie(response: JSONResponse, request: Request, core: Prismd, token: str) -> None:
    response.set_cookie(COOKIE_NAME, token, max_age=int(core.auth.ttl_s), **cookie_options(request))
