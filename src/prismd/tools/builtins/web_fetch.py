"""`web_fetch`: a web page as readable text, without reaching private networks.

Server-side request forgery is prevented like this, unless `tools.web_fetch.allow_private`:
- The host is resolved first (`loop.getaddrinfo`, or an injected resolver) and EVERY address it
  resolves to must be public (`check_address`): loopback, private (RFC 1918), CGNAT, ULA,
  link-local, multicast, unspecified, reserved and documentation ranges are refused, also when
  embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64). A host that resolves to any such address
  is refused, before any connection is made.
- The connection goes to the checked address (pinned): the request URL is rewritten to the IP,
  with the original `Host` header, and for https the `sni_hostname` request extension, so that
  TLS SNI and certificate verification use the host name. A second DNS answer (rebinding) is
  never used. Proxies from the environment are ignored (trust_env=False).
- Redirects are followed by hand (at most `max_redirects`), and each new location is checked
  the same way before it is requested.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ..base import Tool, ToolContext, ToolError, ToolSpec

Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressCheck = Callable[[str, bool], None]

USER_AGENT = "prismd-web-fetch/0.1"
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_BENCHMARK = ipaddress.ip_network("198.18.0.0/15")


def _why_not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT (100.64.0.0/10)"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _BENCHMARK:
        return "reserved (benchmarking)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def check_address(ip: str, allow_private: bool) -> None:
    """Raise ToolError when `ip` may not be fetched from (see the module docstring)."""
    if allow_private:
        return
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise ToolError(f"refused: {ip!r} is not an IP address") from None
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        if addr.sixtofour is not None:
            candidates.append(addr.sixtofour)
        if addr.teredo is not None:
            candidates.extend(addr.teredo)
        if addr in _NAT64 or addr in _NAT64_LOCAL:
            candidates.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    for candidate in candidates:
        why = _why_not_public(candidate)
        if why is not None:
            raise ToolError(
                f"refused: {ip} is a {why} address; web_fetch only reaches public internet hosts"
            )


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host}: {exc.strerror}") from None
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in seen:
            seen.append(ip)
    return seen


_ssl_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context (certifi's CAs), built once: it takes tens of ms."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


def _format_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class _Response:
    def __init__(self, url: httpx.URL, status: int, reason: str, headers: httpx.Headers) -> None:
        self.url = url
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = b""
        self.truncated = False


class WebFetch(Tool):
    spec = ToolSpec(
        name="web_fetch",
        description=(
            "Fetch a public web page (http or https) and return it as readable text: HTML is "
            "converted to Markdown with the title first; plain text and JSON are returned as "
            "they are; other content (images, PDFs, binaries) is refused. Private, loopback "
            "and local-network addresses are refused. Large pages are cut."
        ),
        parameters={
            "type": "object",
            "properties": {
                "url": {"type": "string", "description": "The http:// or https:// URL to fetch."}
            },
            "required": ["url"],
            "additionalProperties": False,
        },
        data_access="public",  # public addresses only (private ones are refused)
    )

    def __init__(
        self,
        resolver: Resolver | None = None,
        address_check: AddressCheck | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        """The arguments are for tests: a resolver (host, port) -> addresses, an address check
        (ip, allow_private), an httpx transport, and the TLS context that verifies servers."""
        self.resolver = resolver or system_resolver
        self.address_check = address_check or check_address
        self.transport = transport
        self.verify = verify

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        url = args.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ToolError("url must be a non-empty string")
        settings = ctx.settings.web_fetch
        try:
            async with asyncio.timeout(settings.timeout_s):
                response = await self._fetch(url.strip(), ctx)
        except TimeoutError:
            raise ToolError(f"timed out after {settings.timeout_s:g} s fetching {url}") from None
        return _render(response, settings.max_bytes)

    async def _fetch(self, url: str, ctx: ToolContext) -> _Response:
        settings = ctx.settings.web_fetch
        timeout = httpx.Timeout(settings.timeout_s)
        async with httpx.AsyncClient(
            timeout=timeout,
            verify=self.verify or default_ssl_context(),
            follow_redirects=False,
            trust_env=False,
            transport=self.transport,
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,"
                "application/json;q=0.9,*/*;q=0.5",
            },
        ) as client:
            current = self._parse(url)
            for hop in range(settings.max_redirects + 1):
                response = await self._request(client, current, ctx)
                if response.status in REDIRECT_CODES and "location" in response.headers:
                    if hop >= settings.max_redirects:
                        raise ToolError(
                            f"too many redirects (more than {settings.max_redirects}) from {url}"
                        )
                    try:
                        nxt = current.join(response.headers["location"])
                    except (httpx.InvalidURL, ValueError):
                        raise ToolError(
                            f"bad redirect location: {response.headers['location']!r}"
                        ) from None
                    current = self._parse(str(nxt))
                    continue
                return response
        raise ToolError(f"too many redirects from {url}")  # pragma: no cover

    @staticmethod
    def _parse(url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ToolError(f"invalid URL {url!r}: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise ToolError(f"only http and https URLs can be fetched, not {parsed.scheme!r}")
        if not parsed.host:
            raise ToolError(f"the URL has no host: {url}")
        return parsed

    async def _addresses(self, host: str, port: int, allow_private: bool) -> list[str]:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            addresses = [host]
        except ValueError:
            addresses = await self.resolver(host, port)
        if not addresses:
            raise ToolError(f"cannot resolve {host}")
        for ip in addresses:  # every address, before any connection
            self.address_check(ip, allow_private)
        return addresses

    async def _request(
        self, client: httpx.AsyncClient, url: httpx.URL, ctx: ToolContext
    ) -> _Response:
        settings = ctx.settings.web_fetch
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await self._addresses(host, port, settings.allow_private)
        host_header = _format_host(host) + (f":{url.port}" if url.port else "")
        last_error: Exception | None = None
        for ip in addresses:
            pinned = url.copy_with(host=ip)
            extensions = {"sni_hostname": host} if url.scheme == "https" else {}
            request = client.build_request(
                "GET", pinned, headers={"Host": host_header}, extensions=extensions
            )
            try:
                resp = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            except httpx.TimeoutException:
                raise TimeoutError from None
            except httpx.HTTPError as exc:
                raise ToolError(f"fetching {url} failed: {exc}") from None
            try:
                result = _Response(url, resp.status_code, resp.reason_phrase, resp.headers)
                if resp.status_code in REDIRECT_CODES:
                    return result
                body = bytearray()
                try:
                    async for chunk in resp.aiter_bytes():  # decoded (gzip…)
                        body += chunk
                        if len(body) > settings.max_bytes:
                            result.truncated = True
                            del body[settings.max_bytes :]
                            break
                except httpx.TimeoutException:
                    raise TimeoutError from None
                except httpx.HTTPError as exc:
                    raise ToolError(f"fetching {url} failed while reading: {exc}") from None
                result.body = bytes(body)
                return result
            finally:
                await resp.aclose()
        raise ToolError(f"cannot connect to {url.host}: {last_error}")


_TEXT_TYPES = re.compile(
    r"^(text/.*|application/(json|.*\+json|xml|.*\+xml|javascript|x-javascript|ecmascript|"
    r"x-yaml|yaml|toml|x-toml|csv|ld\+json|x-ndjson|ndjson))$"
)


def _charset(headers: httpx.Headers) -> str | None:
    ctype = headers.get("content-type", "")
    match = re.search(r"charset\s*=\s*\"?([\w.:-]+)", ctype, re.IGNORECASE)
    return match.group(1) if match else None


def _render(response: _Response, max_bytes: int) -> str:
    if response.status >= 400:
        raise ToolError(f"HTTP {response.status} {response.reason} for {response.url}")
    if response.status in REDIRECT_CODES:
        raise ToolError(f"HTTP {response.status} redirect without a Location header")
    ctype = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    body = response.body
    if not ctype:
        sample = body[:1024].lstrip().lower()
        if b"\x00" in body[:8192]:
            ctype = "application/octet-stream"
        elif sample.startswith((b"<!doctype html", b"<html")):
            ctype = "text/html"
        else:
            ctype = "text/plain"
    note = f"\n\n[content cut at {max_bytes} bytes]" if response.truncated else ""
    head = f"URL: {response.url}"
    if ctype in ("text/html", "application/xhtml+xml"):
        title, text = html_to_markdown(body, _charset(response.headers))
        lines = [f"Title: {title}" if title else None, head]
        return "\n".join(x for x in lines if x) + "\n\n" + text + note
    if _TEXT_TYPES.match(ctype):
        charset = _charset(response.headers) or "utf-8"
        try:
            text = body.decode(charset, "replace")
        except LookupError:
            text = body.decode("utf-8", "replace")
        if ctype.endswith("json") and not response.truncated:
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except ValueError:
                pass
        return f"{head}\nContent-Type: {ctype}\n\n{text}{note}"
    raise ToolError(
        f"refused: {response.url} is {ctype}, not text; web_fetch returns HTML, text and JSON only"
    )


_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "head")


def html_to_markdown(html: bytes, charset: str | None) -> tuple[str, str]:
    """(title, Markdown text) of an HTML document."""
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(html, "html.parser", from_encoding=charset)
    title = ""
    if soup.title and soup.title.string:
        title = " ".join(soup.title.string.split())
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    body = soup.body or soup
    text = MarkdownConverter(heading_style="ATX", strip=["img"]).convert_soup(body)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return title, text
