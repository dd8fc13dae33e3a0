"""Map SDK and transport exceptions to ProviderError with a protocol code."""

from __future__ import annotations

import json

import httpx2

from ..protocol import ErrorCode
from ._sse import StreamBroken
from .base import ProviderError


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def translate(exc: BaseException, label: str, sdk: object) -> ProviderError:
    """`sdk` is the `openai` or `anthropic` module: both SDKs share the same exception shapes."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, StreamBroken):
        cause = exc.cause
        if isinstance(cause, httpx2.TimeoutException):
            return ProviderError(
                f"{label} stopped sending in the middle of its answer (timed out)",
                ErrorCode.PROVIDER_TIMEOUT,
                retryable=True,
            )
        return ProviderError(
            f"The connection to {label} broke during its answer: {_describe(cause)}",
            retryable=True,
        )
    if isinstance(exc, sdk.APITimeoutError | httpx2.TimeoutException):  # type: ignore[attr-defined]
        return ProviderError(
            f"{label} did not answer in time (timed out)", ErrorCode.PROVIDER_TIMEOUT
        )
    if isinstance(exc, sdk.APIStatusError):  # type: ignore[attr-defined]
        detail = getattr(exc, "message", None) or str(exc)
        return ProviderError(f"{label} returned HTTP {exc.status_code}: {detail}")
    if isinstance(exc, sdk.APIConnectionError | httpx2.TransportError):  # type: ignore[attr-defined]
        return ProviderError(f"Cannot reach {label}: {_describe(exc.__cause__ or exc)}")
    if isinstance(exc, json.JSONDecodeError | ValueError):
        return ProviderError(f"{label} sent a malformed stream: {exc}")
    return ProviderError(f"{label} failed: {type(exc).__name__}: {exc}")
