"""How prismd logs: the format, the level from the settings, no secret in any line (auth/redact.py),
and uvicorn's per-connection chatter kept at debug level. Used by `prismd serve` (cli.py) and by
each worker of `serve --workers N` (server/app.py)."""

from __future__ import annotations

import logging

from .config import Settings

# uvicorn logs two INFO lines for every WebSocket (accepted, open) and one when it closes: a
# thousand clients connecting at once write thousands of lines. Kept at debug level.
_PER_CONNECTION = ('"WebSocket ', "connection open", "connection closed")


def _per_connection_lines_at_debug(record: logging.LogRecord) -> bool:
    if record.levelno == logging.INFO and isinstance(record.msg, str):
        if record.msg.startswith(_PER_CONNECTION) or '"WebSocket ' in record.msg:
            return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def _client_errors_are_not_server_errors(record: logging.LogRecord) -> bool:
    """uvicorn logs a client's invalid UTF-8 frame as an exception with a traceback; it is
    the client's fault (the connection is closed with 1007), so log one line at INFO."""
    if "Invalid UTF-8" in str(record.msg):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
    return True


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The SDKs log every HTTP request at INFO: one line per model call is noise here.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_client_errors_are_not_server_errors)
    logging.getLogger("uvicorn.error").addFilter(_per_connection_lines_at_debug)
    # No configured secret (MCP tokens, API keys) nor a recognisable one reaches the log.
    from .auth.redact import RedactingFilter, configured_secrets

    redact = RedactingFilter(configured_secrets(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    logging.getLogger("uvicorn.error").addFilter(redact)
