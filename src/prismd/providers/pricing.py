"""Prices and context windows from the `genai-prices` package (no made-up defaults)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from genai_prices import Usage as PriceUsage
from genai_prices.data_snapshot import get_snapshot

_OFFICIAL = {"openai": "openai", "anthropic": "anthropic"}
TABLE = "genai-prices"
TABLE_VERSION = version("genai-prices")


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
    snapshot = get_snapshot()
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
    try:
        calc = info.model.calc_price(
            PriceUsage(input_tokens=tokens_in, output_tokens=tokens_out),
            info.provider,
            genai_request_timestamp=datetime.now(tz=UTC),
        )
    except LookupError:
        return None, None
    source = {
        "table": TABLE,
        "version": TABLE_VERSION,
        "provider": info.provider.id,
        "model": info.model.id,
    }
    return float(calc.total_price), source


def context_window(kind: str, base_url: str | None, model: str) -> int | None:
    info = lookup(kind, base_url, model)
    return getattr(info.model, "context_window", None) if info else None
