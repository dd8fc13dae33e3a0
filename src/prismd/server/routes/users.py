"""Users and credentials over REST: the admin page (`/api/admin/...`, admins only: anyone
else gets 403 `unauthorized`) and every user's own account (`/api/account/...`); usage totals
(`/api/usage`).

Every change goes through the credentials service (auth/service.py), which writes the core
database and closes at once the sockets whose credential no longer holds (auth/live.py), so a
removed user, a revoked token or an ended login is cut off now. `prismd users|tokens|passwd`
call the same service on the same database. Secrets never leave the server: a token is shown
once, when it is made; a login session is named by a prefix of its cookie's hash (the
`sessionId` that `POST /api/auth/login` answers), never by the cookie.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ...auth import AccountError, Principal
from ...auth.service import MAX_PASSWORD_CHARS
from ...protocol import ErrorCode
from ...store.base import LoginRecord, TokenRecord, UserRecord
from ..uploads import budget_of, utc_day
from .common import Admin, ApiError, Caller, Core, Ok, Open, api_router, doc, set_login_cookie

router = api_router(tags=["users"])

# A login session's public id: this many hex digits of its cookie's SHA-256.
LOGIN_ID_CHARS = 32

# ---------------------------------------------------------------- shapes (OpenAPI)


class UsageOut(Open):
    turns: int
    tokensIn: int
    tokensOut: int
    totalTokens: int
    costUsd: float = Field(description="The priced turns' cost")
    costKnown: bool = Field(description="false when some turns used a model with no price")
    unpricedTurns: int
    sessions: int


class AdminUserOut(Open):
    id: str
    name: str
    admin: bool
    createdAt: str
    tokens: int = Field(description="API tokens the user holds")
    logins: int = Field(description="Unexpired login sessions")
    usage: UsageOut


class TokenOut(Open):
    id: str
    name: str
    userId: str
    userName: str | None
    createdAt: str
    lastUsedAt: str | None


class NewTokenOut(TokenOut):
    token: str = Field(description="The token itself: shown this once, never again")


class LoginOut(Open):
    id: str = Field(description="The login session's id (a prefix of its cookie's hash)")
    userId: str
    userName: str | None
    createdAt: str | None
    expiresAt: str
    current: bool = Field(description="The caller's own login session")


class NewUserIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)
    admin: bool = False


class PasswordIn(BaseModel):
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)


class ChangePasswordIn(BaseModel):
    currentPassword: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)
    newPassword: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)


class TokenIn(BaseModel):
    name: str = Field(default="", max_length=100)


class UsageReport(Open):
    userId: str | None = Field(description="Whose usage (null: everyone's, `user=all`)")
    total: UsageOut = Field(description="Every stored turn")
    recent: UsageOut = Field(description="Turns ended in the last `days` days")
    days: int
    uploads: dict[str, Any] | None = Field(
        default=None, description="{bytes, files, maxBytes, maxFiles, maxAgeDays}; one user's"
    )
    today: dict[str, Any] | None = Field(
        default=None, description="{day, bytes, files, maxBytes, maxFiles} (UTC); one user's"
    )


# ---------------------------------------------------------------- helpers


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _refused(exc: AccountError) -> ApiError:
    text = str(exc)
    return ApiError(
        409 if exc.conflict else 422,
        ErrorCode.INVALID_MESSAGE,
        text,
        details={"field": exc.field, "reason": text},
    )


def _token_json(t: TokenRecord, names: dict[str, str]) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "userId": t.user_id,
        "userName": names.get(t.user_id),
        "createdAt": t.created_at,
        "lastUsedAt": t.last_used_at,
    }


def _login_json(login: LoginRecord, names: dict[str, str], caller: Principal) -> dict[str, Any]:
    return {
        "id": login.token_hash[:LOGIN_ID_CHARS],
        "userId": login.user_id,
        "userName": names.get(login.user_id),
        "createdAt": _iso(login.created_at),
        "expiresAt": _iso(login.expires_at),
        "current": caller.via == "cookie" and caller.key == login.token_hash,
    }


async def _names(core: Core) -> dict[str, str]:
    return {u.id: u.name for u in await core.store.list_users()}


async def _user(core: Core, caller: Principal) -> UserRecord:
    """The caller's user record: the open mode and the configured token have none."""
    user = await core.store.get_user(caller.id)
    if user is None:
        raise ApiError(
            409,
            ErrorCode.INVALID_MESSAGE,
            "This server has no users yet (or you use its configured token): add a user first",
        )
    return user


def _missing(what: str) -> ApiError:
    return ApiError(404, ErrorCode.INVALID_MESSAGE, f"{what} not found")


async def _end_login(core: Core, login_id: str, owner: str | None) -> None:
    """End a login session by its public id (`owner`: only if it is that user's)."""
    for login in await core.store.list_logins(owner):
        if login.token_hash[:LOGIN_ID_CHARS] == login_id:
            await core.auth.end_login(login.token_hash)
            return
    raise _missing("Login session")


async def _revoke_token(core: Core, token_id: str, owner: str | None) -> None:
    tokens = await core.store.list_tokens()
    if not any(t.id == token_id and owner in (None, t.user_id) for t in tokens):
        raise _missing("Token")
    await core.auth.revoke_token(token_id)


# ---------------------------------------------------------------- admin: users


@router.get(
    "/admin/users",
    summary="Admins: every user, with their tokens, login sessions and usage",
    responses=doc(list[AdminUserOut], 403),
)
async def list_users(core: Core, admin: Admin) -> list[dict[str, Any]]:
    tokens = await core.store.list_tokens()
    logins = await core.store.list_logins()
    out = []
    for u in await core.store.list_users():
        usage = await core.store.usage_totals(u.id)
        out.append(
            {
                "id": u.id,
                "name": u.name,
                "admin": u.admin,
                "createdAt": u.created_at,
                "tokens": sum(t.user_id == u.id for t in tokens),
                "logins": sum(login.user_id == u.id for login in logins),
                "usage": usage.to_json(),
            }
        )
    return out


@router.post(
    "/admin/users",
    status_code=201,
    summary="Admins: add a user (the first one is an admin, and ends the open mode)",
    responses=doc(AdminUserOut, 403, 409, status=201),
)
async def add_user(core: Core, admin: Admin, body: NewUserIn) -> dict[str, Any]:
    try:
        user = await core.auth.add_user(body.name, body.password, body.admin)
    except AccountError as exc:
        raise _refused(exc) from None
    return {
        "id": user.id,
        "name": user.name,
        "admin": user.admin,
        "createdAt": user.created_at,
        "tokens": 0,
        "logins": 0,
        "usage": (await core.store.usage_totals(user.id)).to_json(),
    }


@router.delete(
    "/admin/users/{user_id}",
    summary="Admins: remove a user (their logins end, their tokens are revoked, their sockets "
    "close and their turns stop; their sessions are kept)",
    responses=doc(Ok, 403, 404, 409),
)
async def remove_user(core: Core, admin: Admin, user_id: str) -> dict[str, Any]:
    if user_id == admin.id:
        raise ApiError(409, ErrorCode.INVALID_MESSAGE, "You cannot remove yourself")
    if not await core.auth.remove_user(user_id):
        raise _missing("User")
    return {"ok": True}


@router.post(
    "/admin/users/{user_id}/password",
    summary="Admins: set a user's password (their login sessions end; tokens stay)",
    responses=doc(Ok, 403, 404),
)
async def reset_password(core: Core, admin: Admin, user_id: str, body: PasswordIn) -> Any:
    if await core.store.get_user(user_id) is None:
        raise _missing("User")
    try:
        await core.auth.set_password(user_id, body.password)
    except AccountError as exc:
        raise _refused(exc) from None
    return {"ok": True}


# ---------------------------------------------------------------- admin: tokens, logins


@router.get(
    "/admin/tokens",
    summary="Admins: every API token (never the token itself)",
    responses=doc(list[TokenOut], 403),
)
async def list_all_tokens(core: Core, admin: Admin) -> list[dict[str, Any]]:
    names = await _names(core)
    return [_token_json(t, names) for t in await core.store.list_tokens()]


@router.delete(
    "/admin/tokens/{token_id}",
    summary="Admins: revoke any API token (its sockets close at once)",
    responses=doc(Ok, 403, 404),
)
async def revoke_any_token(core: Core, admin: Admin, token_id: str) -> dict[str, Any]:
    await _revoke_token(core, token_id, None)
    return {"ok": True}


@router.get(
    "/admin/logins",
    summary="Admins: who is signed in (every unexpired login session)",
    responses=doc(list[LoginOut], 403),
)
async def list_all_logins(core: Core, admin: Admin) -> list[dict[str, Any]]:
    names = await _names(core)
    return [_login_json(login, names, admin) for login in await core.store.list_logins()]


@router.delete(
    "/admin/logins/{login_id}",
    summary="Admins: end any login session (its sockets close at once)",
    responses=doc(Ok, 403, 404),
)
async def end_any_login(core: Core, admin: Admin, login_id: str) -> dict[str, Any]:
    await _end_login(core, login_id, None)
    return {"ok": True}


# ---------------------------------------------------------------- the caller's account


@router.post(
    "/account/password",
    summary="Change your own password (needs the current one)",
    description="Every login session of yours ends (and its sockets close); when you are "
    "signed in with the cookie, the answer signs you in again with a new one. 401 "
    "`unauthorized` when the current password is wrong.",
    responses=doc(Ok, 401, 409, 429),
)
async def change_password(
    request: Request, core: Core, caller: Caller, body: ChangePasswordIn
) -> JSONResponse:
    user = await _user(core, caller)
    try:
        await core.auth.change_password(user.id, body.currentPassword, body.newPassword)
    except PermissionError as exc:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, str(exc)) from None
    except AccountError as exc:
        raise _refused(exc) from None
    response = JSONResponse({"ok": True})
    if caller.via == "cookie":
        _, cookie = await core.auth.start_login(user)
        set_login_cookie(response, request, core, cookie)
    return response


@router.get(
    "/account/tokens",
    summary="Your API tokens (never the tokens themselves)",
    responses=doc(list[TokenOut]),
)
async def my_tokens(core: Core, caller: Caller) -> list[dict[str, Any]]:
    names = {caller.id: caller.name}
    return [_token_json(t, names) for t in await core.store.list_tokens() if t.user_id == caller.id]


@router.post(
    "/account/tokens",
    status_code=201,
    summary="Make an API token for yourself: the answer holds it, once",
    responses=doc(NewTokenOut, 409, status=201),
)
async def new_token(core: Core, caller: Caller, body: TokenIn) -> dict[str, Any]:
    user = await _user(core, caller)
    record, token = await core.auth.create_token(user.id, body.name.strip())
    return {**_token_json(record, {user.id: user.name}), "token": token}


@router.delete(
    "/account/tokens/{token_id}",
    summary="Revoke one of your API tokens (its sockets close at once)",
    responses=doc(Ok, 404),
)
async def revoke_my_token(core: Core, caller: Caller, token_id: str) -> dict[str, Any]:
    await _revoke_token(core, token_id, caller.id)
    return {"ok": True}


@router.get(
    "/account/logins",
    summary="Where you are signed in (your unexpired login sessions)",
    responses=doc(list[LoginOut]),
)
async def my_logins(core: Core, caller: Caller) -> list[dict[str, Any]]:
    names = {caller.id: caller.name}
    return [_login_json(login, names, caller) for login in await core.store.list_logins(caller.id)]


@router.delete(
    "/account/logins/{login_id}",
    summary="End one of your login sessions (its sockets close at once)",
    responses=doc(Ok, 404),
)
async def end_my_login(core: Core, caller: Caller, login_id: str) -> dict[str, Any]:
    await _end_login(core, login_id, caller.id)
    return {"ok": True}


# ---------------------------------------------------------------- usage


@router.get(
    "/usage",
    summary="Your usage: tokens, cost and turns from the stored turns; uploads and today's "
    "chat budget against their limits",
    description="Admins may ask for another user's (`user=ID`) or everyone's (`user=all`); "
    "anyone else gets 403 for a user not their own.",
    responses=doc(UsageReport, 403, 404),
)
async def usage(
    core: Core,
    caller: Caller,
    user: Annotated[
        str | None, Query(max_length=128, description="admins: a user id, or all")
    ] = None,
    days: Annotated[int, Query(ge=1, le=3660, description="the `recent` window")] = 30,
) -> dict[str, Any]:
    who: str | None = caller.id
    if user is not None and user != caller.id:
        if not caller.admin:
            raise ApiError(403, ErrorCode.UNAUTHORIZED, "Only an admin may see another's usage")
        if user == "all":
            who = None
        elif await core.store.get_user(user) is None:
            raise _missing("User")
        else:
            who = user
    now = datetime.now(UTC)
    since = (now - timedelta(days=days)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    limits = core.settings.uploads
    body: dict[str, Any] = {
        "userId": who,
        "total": (await core.store.usage_totals(who)).to_json(),
        "recent": (await core.store.usage_totals(who, since)).to_json(),
        "days": days,
    }
    if who is not None:
        size, files = await core.store.upload_usage(who)
        day = utc_day(now)
        day_bytes, day_files = await budget_of(core).used(core.store, who, day)
        body["uploads"] = {
            "bytes": size,
            "files": files,
            "maxBytes": limits.max_bytes_per_user,
            "maxFiles": limits.max_files_per_user,
            "maxAgeDays": limits.max_age_days,
        }
        body["today"] = {
            "day": day,
            "bytes": day_bytes,
            "files": day_files,
            "maxBytes": limits.chat_bytes_per_day,
            "maxFiles": limits.chat_files_per_day,
        }
    return body
