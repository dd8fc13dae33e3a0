"""Prices and context windows from the `genai-prices` package (no made-up defaults).

The table (~5.5 MB in the server) is loaded on first use, not at startup: `load()` runs in a
thread when the first WebSocket connects, so an idle server does not hold it and the first
turn does not wait for it.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version
from typing import Any

_OFFICIAL = {"openai": "openai", "anthropic": "anthropic"}
TABLE = "genai-prices"
TABLE_VERSION = version("genai-prices")
MTOK = Decimal(1_000_000)

_snapshot: Any = None
_loading = threading.Lock()


def load() -> Any:
    """The price table (imported once, from any thread)."""
    global _snapshot
    if _snapshot is None:
        with _loading:
            if _snapshot is None:
                from genai_prices.data_snapshot import get_snapshot

                _snapshot = get_snapshot()
    return _snapshot


def preload() -> threading.Thread | None:
    """Load the table in a thread of its own if it is not loaded (or loading) yet."""
    if _snapshot is not None or _loading.locked():
        return None
    thread = threading.Thread(target=load, name="price table", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True, slots=True)
class ModelInfo:
    provider: Any  # genai_prices Provider
    model: Any  # genai_prices ModelInfo


@functools.lru_cache(maxsize=512)
def lookup(kind: str, base_url: str | None, model: str) -> ModelInfo | None:
    """Find the price entry for `model` as served by this provider, or None.

    Local models (Ollama, prismd's own `local` runtime) have no price. A custom base URL is
    matched by genai-prices' URL patterns (DeepSeek, Groq, OpenRouter…); an unrecognised URL
    falls back to the model name, because OpenAI-compatible proxies mostly relay the named
    model.
    """
    if kind in ("ollama", "local") or not model:
        return None
    snapshot = load()
    attempts: list[tuple[str | None, str | None]] = []
    if base_url:
        attempts.append((None, base_url))
    attempts.append((_OFFICIAL.get(kind), None))
    attempts.append((None, None))
    for provider_id, url in attempts:
        try:
            provider, info = snapshot.find_provider_model(model, None, provider_id, url)
        except LookupError:
            continue
        return ModelInfo(provider, info)
    return None


def price(
    kind: str, base_url: str | None, model: str, tokens_in: int, tokens_out: int
) -> tuple[float | None, dict[str, Any] | None]:
    """(costUsd, costSource) for one turn's summed tokens; (None, None) when unknown."""
    info = lookup(kind, base_url, model)
    if info is None:
        return None, None
    now = datetime.now(tz=UTC)
    try:
        prices = info.model.get_prices(now)
    except LookupError:
        return None, None
    per_in, per_out = prices.input_mtok, prices.output_mtok
    if isinstance(per_in, Decimal | None) and isinstance(per_out, Decimal | None):
        # Flat prices per million tokens (most models): the same sum genai-prices computes,
        # without its general machinery (~0.2 ms a call, once per turn on the hot path).
        total = (Decimal(tokens_in) * (per_in or 0) + Decimal(tokens_out) * (per_out or 0)) / MTOK
    else:  # tiered prices (by context size…): genai-prices decides
        from genai_prices import Usage as PriceUsage

        try:
            total = info.model.calc_price(
                PriceUsage(input_tokens=tokens_in, output_tokens=tokens_out),
                info.provider,
                genai_request_timestamp=now,
            ).total_price
        except LookupError:
            return None, None
    source = {
        "table": TABLE,
        "version": TABLE_VERSION,
        "provider": info.provider.id,
        "model": info.model.id,
    }
    return float(total), source


def context_window(kind: str, base_url: str | None, model: str) -> int | None:
    info = lookup(kind, base_url, model)
    return getattr(info.model, "context_window", None) if info else None
