"""Anything a provider's stream raises becomes a ProviderError with a protocol code."""

from __future__ import annotations

import orjson

from .base import ProviderError


def translate(exc: BaseException, label: str) -> ProviderError:
    """Transport and HTTP failures are ProviderErrors already (providers/_http.py); what is
    left is a malformed stream or a bug."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, orjson.JSONDecodeError | ValueError | KeyError | TypeError):
        return ProviderError(f"{label} sent a malformed stream: {exc}")
    return ProviderError(f"{label} failed: {type(exc).__name__}: {exc}")
