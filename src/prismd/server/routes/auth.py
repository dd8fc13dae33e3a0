"""`/api/auth`: who the caller is, logging in and out (see auth/ for the checks themselves).

`status`, `check`, `login` and `logout` answer without credentials (auth/middleware.py's
OPEN_PATHS): they tell no more than whether a login is needed and who the caller is.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ...auth import Principal, token_hash
from ...auth.limits import RateLimited
from ...auth.service import COOKIE_NAME
from ...protocol import ErrorCode
from .common import (
    ApiError,
    Caller,
    Core,
    Open,
    api_router,
    cookie_options,
    doc,
    set_login_cookie,
)
from .rows import user_json

router = api_router(tags=["auth"])


class UserOut(Open):
    id: str
    username: str
    isInstanceAdmin: bool
    name: str = Field(description="prismd: the same as username")
    admin: bool = Field(description="prismd: the same as isInstanceAdmin")


class AuthStatus(Open):
    authenticated: bool = Field(description="Whether this request is served as a user")
    user: UserOut | None = Field(default=None, description="Absent when not authenticated")
    hasPassword: bool = Field(description="Whether any user exists")
    requireAuth: bool = Field(description="Whether requests need credentials")
    authRequired: bool = Field(description="prismd: the same as requireAuth")


class AuthCheck(Open):
    authenticated: bool
    user: UserOut | None = None


class LoginIn(BaseModel):
    username: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Without it, the first admin (CortexPrism's single-password login)",
    )
    password: str = Field(min_length=1, max_length=4096)


class LoginOut(Open):
    success: bool
    sessionId: str = Field(description="The login session's id (not its secret cookie)")
    user: UserOut


class LogoutOut(BaseModel):
    success: bool


class UserBody(BaseModel):
    user: UserOut


def _caller(request: Request) -> Principal | None:
    user: Principal | None = getattr(request.state, "user", None)
    return user


def _with_user(body: dict[str, Any], user: Principal | None) -> dict[str, Any]:
    if user is not None:
        body["user"] = user_json(user)
    return body


@router.get(
    "/auth/status",
    summary="Whether credentials are needed, and who the caller is",
    responses=doc(AuthStatus),
)
async def auth_status(request: Request, core: Core) -> dict[str, Any]:
    user = _caller(request)
    required = await core.auth.required()
    has_password = await core.store.count_users() > 0
    body = {
        "authenticated": user is not None,
        "hasPassword": has_password,
        "requireAuth": required,
        "authRequired": required,
    }
    return _with_user(body, user)


@router.get(
    "/auth/check",
    summary="Whether the caller is authenticated, and as whom",
    responses=doc(AuthCheck),
)
async def auth_check(request: Request) -> dict[str, Any]:
    user = _caller(request)
    return _with_user({"authenticated": user is not None}, user)


async def _first_admin(core: Core) -> str | None:
    return next((u.name for u in await core.store.list_users() if u.admin), None)


@router.post(
    "/auth/login",
    summary="Log in with a username and password; sets the prismd_session cookie",
    responses=doc(LoginOut, 401, 429),
)
async def login(request: Request, core: Core, body: LoginIn) -> JSONResponse:
    client = request.client.host if request.client else "unknown"
    username = body.username or await _first_admin(core) or ""
    try:
        user, token = await core.auth.login(username, body.password, client)
    except RateLimited as exc:
        raise ApiError(
            429, ErrorCode.RATE_LIMITED, str(exc), headers={"Retry-After": str(exc.retry_after)}
        ) from None
    except PermissionError as exc:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, str(exc)) from None
    response = JSONResponse(
        {"success": True, "sessionId": token_hash(token)[:32], "user": user_json(user)}
    )
    set_login_cookie(response, request, core, token)
    return response


@router.post(
    "/auth/logout",
    summary="End this login session and clear its cookie",
    responses=doc(LogoutOut),
)
async def logout(request: Request, core: Core) -> JSONResponse:
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        await core.auth.logout(cookie)
    response = JSONResponse({"success": True})
    response.delete_cookie(COOKIE_NAME, **cookie_options(request))
    return response


@router.get("/auth/me", summary="The logged-in user", responses=doc(UserBody))
async def me(caller: Caller) -> dict[str, Any]:
    return {"user": user_json(caller)}
