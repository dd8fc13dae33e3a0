"""Masking secrets: the one function behind `GET /api/config`, `GET /api/tools` (MCP errors and
stderr) and the log (MCP stderr lines, connection errors).

Two kinds of secret are masked:

- **known** ones, from the configuration: an MCP server's `env` and `headers` values, the
  user and password of its URL, its query values and fragment, token-like segments of its
  path, and the values of its secret-looking `args` (`--token=X`, `--api-key X`, `-p X`,
  `API_KEY=X`). `secrets_of()` collects them; `mask_text()` replaces them wherever they occur
  (a crashing server may print its own token). Values shorter than MIN_KNOWN characters are
  masked only in place, not in free text ("1" or "true" would garble every line);
- **recognisable** ones in any text: credentials in URLs, `name=value` / `name: value` /
  `--name value` where the name says secret (token, key, password, secret, auth…),
  `Bearer …`, and well-known token formats (`sk-…`, `ghp_…`, `xoxb-…`, `AKIA…`, JWTs).

What it does not do: find a secret that is neither configured nor recognisable (an arbitrary
word a server prints). Such text reaches admins only through the log at DEBUG level
(mcp.py logs stderr lines there) and a non-admin only masked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from ..config import McpServerSettings, Settings

MASK = "••••"
MIN_KNOWN = 6

# A name (flag, parameter, variable, header) that holds a secret: it ends with one of these
# words (`--api-key`, `GITHUB_TOKEN`, `client_secret`, `X-Auth`), so `--max-tokens` or
# `--token-file` do not count.
_SECRET_WORD = (
    r"(?:pass|passwd|password|passphrase|pwd|secret|token|apikey|api[-_]?key|key|auth"
    r"|authorization|credentials?|cookie|sig|signature|session|bearer|access[-_]?key)"
)
SECRET_NAME = re.compile(rf"(?i)^(?:[A-Za-z0-9]*[-_.])*[A-Za-z0-9]*{_SECRET_WORD}$")
# Short flags that take a password (mysql/psql style `-p SECRET`, `-pSECRET`).
_SHORT_SECRET_FLAGS = ("-p",)

# Token formats that are secrets wherever they appear.
_TOKEN_FORMATS = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{16,}"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_AUTH_SCHEME = re.compile(r"(?i)\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{4,}")
# name=value, name: value, "name": "value" (in free text: log lines, stderr)…
_ASSIGNED = re.compile(
    rf"(?i)(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]*{_SECRET_WORD})"
    r"(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s'\",;&)\]}]+)"
)
# …and --name value, -p value, also as argv printed as a list ('--token', 'X').
_FLAGGED = re.compile(
    rf"(?i)(?<![A-Za-z0-9_.-])(?P<name>--?(?:[A-Za-z0-9_.-]*{_SECRET_WORD}|p))"
    r"(?P<sep>['\"]?,?\s+['\"]?)(?P<value>[^\s'\",;&)\]}-][^\s'\",;&)\]}]*)"
)
# A path segment that is a token (`/bot123:ABC…`, `/services/T0/B0/XXXX`, `/key/abc…`): long,
# with letters and digits, and not an ordinary word.
_TOKEN_SEGMENT = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_:.~+=-]{20,}$")


def _mask_url_match(m: re.Match[str]) -> str:
    url = m.group(0)
    cut = len(url.rstrip(".,:;!?)]}"))  # sentence punctuation after a URL is not part of it
    return mask_url(url[:cut]) + url[cut:]


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.match(name.strip().lstrip("-")))


def mask_url(url: str) -> str:
    """A URL without its secrets: user and password, every query value, the fragment, and
    path segments that look like tokens."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    path = "/".join(
        MASK if _TOKEN_SEGMENT.match(unquote(seg)) else seg for seg in parts.path.split("/")
    )
    query = "&".join(
        f"{pair.split('=', 1)[0]}={MASK}" if "=" in pair else pair
        for pair in parts.query.split("&")
        if pair
    )
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def _url_secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [v for v in (parts.username, parts.password) if v]
    found += [unquote(v) for v in (parts.username, parts.password) if v]
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=False)]
    if parts.fragment:
        found.append(parts.fragment)
    found += [seg for seg in parts.path.split("/") if _TOKEN_SEGMENT.match(unquote(seg))]
    return found


def mask_args(args: list[str]) -> list[str]:
    """Command-line arguments without their secrets (see the module's docstring)."""
    return [masked for _, masked in _arg_pairs(args)]


def _arg_pairs(args: list[str]) -> list[tuple[str | None, str]]:
    """(secret found in the argument or None, the argument masked) for each argument."""
    out: list[tuple[str | None, str]] = []
    takes_value = False
    for arg in args:
        if takes_value and not (arg.startswith("-") and len(arg) > 1):
            out.append((arg, MASK))
            takes_value = False
            continue
        takes_value = False
        if arg.startswith("-"):
            flag, eq, value = arg.partition("=")
            if eq and value and is_secret_name(flag):
                out.append((value, f"{flag}={MASK}"))
                continue
            if not eq and (is_secret_name(flag) or flag in _SHORT_SECRET_FLAGS):
                takes_value = True
            elif not eq and any(
                flag.startswith(f) and len(flag) > len(f) for f in _SHORT_SECRET_FLAGS
            ):
                out.append((flag[2:], flag[:2] + MASK))  # -pSECRET
                continue
        elif "=" in arg and "://" not in arg.split("=", 1)[0]:
            name, _, value = arg.partition("=")
            if value and is_secret_name(name):
                out.append((value, f"{name}={MASK}"))
                continue
        if "://" in arg:
            masked = _URL.sub(_mask_url_match, arg)
            out.append((None, masked))
            continue
        masked = mask_text(arg)
        out.append((arg if masked != arg else None, masked))
    return out


def secrets_of(server: McpServerSettings) -> list[str]:
    """The secret values in an MCP server's configuration, longest first."""
    found: list[str] = [v for v in server.env.values() if v]
    for value in server.headers.values():
        if value:
            found.append(value)
            scheme, _, rest = value.partition(" ")
            if rest:
                found.append(rest.strip())
    if server.url:
        found += _url_secrets(server.url)
    for arg, _ in _arg_pairs(server.args):
        if arg:
            found.append(arg)
    for arg in server.args:
        for url in _URL.findall(arg):
            found += _url_secrets(url)
    return sorted({f for f in found if f}, key=len, reverse=True)


def configured_secrets(settings: Settings) -> list[str]:
    """Every secret value of the configuration (MCP servers', API keys, the token)."""
    known = [s for server in settings.mcp_servers for s in secrets_of(server)]
    known += [p.api_key for p in settings.providers.values() if p.api_key]
    known += [k for k in (settings.voice.stt.api_key, settings.voice.tts.api_key) if k]
    if settings.auth.token:
        known.append(settings.auth.token)
    return sorted(set(known), key=len, reverse=True)


class RedactingFilter(logging.Filter):
    """Masks every record that passes a handler (installed by `prismd serve` on the log's
    handlers): its message, and the text of its exception."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        super().__init__()
        self.known = list(known)
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's problem, not ours
            return True
        masked = mask_text(message, self.known)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_text(
                self._formatter.formatException(record.exc_info), self.known
            )
        return True


def mask_text(text: str, known: Iterable[str] = ()) -> str:
    """`text` with the `known` secrets (MIN_KNOWN characters or more) and every recognisable
    secret masked."""
    for secret in known:
        if len(secret) >= MIN_KNOWN and secret in text:
            text = text.replace(secret, MASK)
    text = _URL.sub(_mask_url_match, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _TOKEN_FORMATS.sub(MASK, text)
    text = _ASSIGNED.sub(_mask_named, text)
    return _FLAGGED.sub(_mask_named, text)


def _mask_named(m: re.Match[str]) -> str:
    name, value = m.group("name"), m.group("value")
    if (
        value.startswith(MASK)
        or value.lower() in ("bearer", "basic", "token")
        or not (is_secret_name(name) or name in _SHORT_SECRET_FLAGS)
    ):
        return m.group(0)
    return f"{name}{m.group('sep')}{MASK}"
