"""The web app: `/` and its static files under `/static/`, with a strict security policy.

The app is plain ES modules and vendored libraries (see `web/vendor.mjs`); nothing is built
at run time and nothing is fetched from another origin. Every response carries a
Content-Security-Policy that allows no inline script and no inline style attribute, so model
output that slipped through the sanitiser still could not run.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), geolocation=(), microphone=(self)",
}
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".webmanifest": "application/manifest+json",
}

router = APIRouter(include_in_schema=False)


def _headers(cache: str) -> dict[str, str]:
    return {**SECURITY_HEADERS, "Cache-Control": cache}


def _not_found() -> JSONResponse:
    return JSONResponse(
        {"error": "Not found", "code": "not_found"}, status_code=404, headers=_headers("no-store")
    )


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> Response:
    return FileResponse(
        WEB_DIR / "index.html",
        media_type=_TYPES[".html"],
        headers=_headers("no-cache"),
    )


@router.get("/docs")
async def api_docs() -> Response:
    """The OpenAPI schema in Swagger UI, from the vendored copy (no CDN)."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="prismd API",
        swagger_js_url="/static/vendor/swagger/swagger-ui-bundle.js",
        swagger_css_url="/static/vendor/swagger/swagger-ui.css",
        swagger_favicon_url="/favicon.ico",
    )


@router.get("/favicon.ico")
async def favicon() -> Response:
    return FileResponse(
        WEB_DIR / "icon.svg", media_type=_TYPES[".svg"], headers=_headers("max-age=86400")
    )


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static(path: str) -> Response:
    root = WEB_DIR.resolve()
    target = (root / path).resolve()
    # No escape from the web directory, no dot files, no directories.
    if not target.is_relative_to(root) or any(p.startswith(".") for p in Path(path).parts):
        return _not_found()
    if not target.is_file():
        return _not_found()
    media = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
    if media is None or target.suffix in (".py", ".pyc"):
        return _not_found()
    # Revalidated every time (ETag/Last-Modified): an upgrade never leaves stale modules.
    return FileResponse(target, media_type=media, headers=_headers("no-cache"))
