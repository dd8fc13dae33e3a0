"""The API docs at /docs render offline: Swagger UI comes from the vendored copy."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import Page

from ..conftest import PrismdServer


def test_api_docs_render_from_this_server_only(page: Page, web_server: PrismdServer) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(web_server.url + "/docs")
    # Swagger UI fetched /openapi.json and drew an operation block per route.
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() > 30
    assert page.get_by_text("/api/sessions/{session_id}/messages").count() >= 1
    origins = {urlsplit(u).netloc for u in requested if u.startswith("http")}
    assert origins == {urlsplit(web_server.url).netloc}, requested
    assert page.request.get(web_server.url + "/redoc").status == 404
