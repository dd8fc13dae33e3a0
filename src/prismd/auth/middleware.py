"""The credential check in front of every route: an ASGI middleware, so it covers REST routes,
`/metrics` and the `/ws` upgrade alike (including routes other modules add under `/api`).

A request that needs credentials and has none gets 401 before it reaches a route; a WebSocket
upgrade gets an HTTP 401 response instead of the handshake (PROTOCOL B4). The principal is left
in `scope["state"]["user"]` (`request.state.user`), None on the few open routes.

Cross-site requests (CSRF), in every mode: a request that changes something (any method but
GET/HEAD/OPTIONS), and a WebSocket upgrade that the login cookie (or the open mode) would
authorise, must not come from another site's page: its `Origin` must be the server's own or one
of `auth.allowed_origins`; without an `Origin`, a `Sec-Fetch-Site` of `cross-site` or
`same-site` is refused too (a page on another port of the host, or on a sibling subdomain, is
"same-site" but not the same origin). Otherwise 403 `unauthorized`. A script that sends a bearer
token and no cookie is not a browser acting for a visitor: it is not checked.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from .service import COOKIE_NAME, LOCAL_PRINCIPAL, Principal

if TYPE_CHECKING:
    from ..core import Prismd

# Reachable without credentials: they say no more than whether a login is needed (health then
# answers only {"status": "ok"}); logout only ends the login session its cookie names.
OPEN_PATHS = frozenset(
    {"/api/auth/login", "/api/auth/logout", "/api/auth/status", "/api/auth/check", "/api/health"}
)


def protected(path: str) -> bool:
    return path == "/metrics" or path == "/ws" or path == "/api" or path.startswith("/api/")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}


@functools.lru_cache(maxsize=1024)  # asked on every request, for few distinct names
def is_loopback(host: str) -> bool:
    """A loopback address or name: 127.0.0.0/8, ::1, localhost (and *.localhost, RFC 6761)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:3000" → "::1")."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0]


def _origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """Same host:port as the request, or one of the configured origins."""
    origin = origin.rstrip("/").lower()
    if origin in {a.rstrip("/").lower() for a in allowed}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default_port = {"http": "80", "https": "443"}[parts.scheme]

    def norm(netloc: str, port: str) -> str:
        return netloc if ":" in netloc.rsplit("]", 1)[-1] else f"{netloc}:{port}"

    return norm(parts.netloc, default_port) == norm(host.lower(), default_port)


def route_path(scope: Scope) -> str:
    """The path routing sees: without the configured root path, so that "/p/api/…" served under
    root path "/p" is checked like "/api/…" (Starlette's router strips it the same way)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    return rest if rest == "" or rest.startswith("/") else path


class AuthMiddleware:
    """`core`: the server's services (core.py), passed in when the app is built."""

    def __init__(self, app: ASGIApp, core: Prismd) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        core = self.core
        auth = core.auth
        state = scope.setdefault("state", {})
        path = route_path(scope)
        headers = _headers(scope)
        allowed = core.settings.auth.allowed_origins
        if not await auth.required():
            refusal = _open_mode_refusal(headers, core) or _cross_site_refusal(
                scope, headers, allowed, browser=True
            )
            if refusal is not None:
                await _deny(scope, send, 403, "unauthorized", refusal)
                return
            state["user"] = LOCAL_PRINCIPAL
            await self.app(scope, receive, send)
            return
        bearer = None
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            bearer = authorization[7:].strip()
        if bearer is None and scope["type"] == "websocket":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            bearer = (query.get("token") or [None])[0]
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME)
        user: Principal | None = None
        if bearer or cookie:
            user = await auth.authenticate(cookie, bearer)
        # What a browser sends for its visitor: a cookie, or nothing (a login form). A bearer
        # token without a cookie comes from a script that holds the token.
        if scope["type"] == "websocket":
            browser = user is not None and user.via == "cookie"
        else:
            browser = cookie is not None or not authorization
        refusal = _cross_site_refusal(scope, headers, allowed, browser=browser)
        if refusal is not None:
            await _deny(scope, send, 403, "unauthorized", refusal)
            return
        state["user"] = user
        if user is None and protected(path) and path not in OPEN_PATHS:
            await _deny(scope, send, 401, "unauthorized", "Authentication required")
            return
        await self.app(scope, receive, send)


def _open_mode_refusal(headers: dict[str, str], core: Prismd) -> str | None:
    """With no password, prismd trusts whoever reaches it on loopback, but not a web page that
    the user's browser happens to show: a host name that is not loopback is refused, so DNS
    rebinding cannot turn a site's name into 127.0.0.1 (and the cross-site rules hold for every
    request, see _cross_site_refusal). Served on a public address with `--insecure`, the
    operator chose to be open: only the cross-site rules hold then."""
    settings = core.settings
    host = headers.get("host", "")
    if (
        host
        and is_loopback(settings.server.host)
        and not is_loopback(_host_name(host))
        and not any(_origin_allowed(o, host, []) for o in settings.auth.allowed_origins)
    ):
        return (
            f"Host {host!r} is not a loopback name: prismd without a password answers only "
            "localhost/127.0.0.1 (add the site to auth.allowed_origins, or set a password)"
        )
    return None


def from_another_site(headers: dict[str, str], allowed: list[str]) -> bool:
    """Sent by a page of another origin than the server's own and the allowed ones: its
    `Origin` says so, or, without one, `Sec-Fetch-Site` is `cross-site` or `same-site` (a
    sibling subdomain or another port of the same host is the same site, not the same
    origin). A client that sends neither (curl, scripts, the CLI) is not a page."""
    origin = headers.get("origin")
    if origin is not None:
        return not _origin_allowed(origin, headers.get("host", ""), allowed)
    return headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")


def _cross_site_refusal(
    scope: Scope, headers: dict[str, str], allowed: list[str], *, browser: bool
) -> str | None:
    """CSRF, in every mode. `browser`: the request would act with what a browser adds by
    itself (the login cookie, or the open mode's trust), so another site's page could send it
    for its visitor. A cross-site WebSocket is not bound by CORS, and a page may send a form or
    multipart POST to any site without a preflight: neither is taken from another site."""
    if not browser or not from_another_site(headers, allowed):
        return None
    if scope["type"] == "websocket":
        return "This Origin may not open a WebSocket"
    if scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
        return "Requests from another site are refused (see auth.allowed_origins)"
    return None


async def _deny(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": message, "code": code}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="prismd"'))
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        start: dict[str, Any] = {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": headers,
        }
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server cannot send a response instead of the handshake: refuse it (403)
        await send({"type": "websocket.close", "code": 1008})
