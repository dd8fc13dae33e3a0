"""`/api/providers`: the model providers, which are configured, and the models each offers."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Body, Response
from pydantic import BaseModel, ConfigDict, Field

from ...auth.redact import mask_text, mask_url
from ...config import PROVIDER_KINDS
from ...core import Prismd
from ...protocol import ErrorCode, ProtocolError
from ...providers.base import Provider
from ...providers.registry import ProviderRegistry
from .common import ApiError, Caller, Core, api_router, doc

router = api_router(tags=["providers"])


class ProviderOut(BaseModel):
    kind: str
    configured: bool
    model: str | None
    baseUrl: str | None
    # When configured: how to show the model; `note` is a line to show beside it (the offline
    # demo model says what it is and how to connect a real one).
    displayName: str | None = None
    note: str | None = None
    demo: bool = False


class ProviderList(BaseModel):
    default: str | None
    providers: list[ProviderOut]


class ConfiguredProvider(BaseModel):
    kind: str
    model: str


class ModelOut(BaseModel):
    id: str


class ModelsIn(BaseModel):
    """Credentials to try before saving them (admins only); without them, the configured
    provider's models."""

    model_config = ConfigDict(extra="ignore")
    apiKey: str | None = Field(default=None, max_length=4096)
    baseUrl: str | None = Field(default=None, max_length=2048)


async def provider_model(core: Prismd, kind: str) -> str | None:
    """The model a provider uses when none is asked for (Ollama's may need a probe)."""
    model: str | None = await asyncio.to_thread(core.providers._default_model, kind)
    return model


async def provider_info(core: Prismd, kind: str) -> dict[str, Any]:
    ps = core.settings.provider_settings(kind)
    configured = kind == core.providers.default_kind or bool(ps.api_key or ps.base_url)
    if kind == "anthropic":
        configured = bool(ps.api_key)
    if kind == "local":
        configured = kind == core.providers.default_kind or bool(ps.model or ps.models)
    model = ps.model
    if configured and not model:
        model = await provider_model(core, kind)
    # Any user may read this: a URL's credentials (user:password@, ?key=) are masked.
    base_url = mask_url(ps.base_url) if ps.base_url else None
    info = {"kind": kind, "configured": configured, "model": model, "baseUrl": base_url}
    if configured:
        shown = core.providers.describe(kind, model)
        info.update(displayName=shown["displayName"], note=shown["note"], demo=shown["demo"])
    return info


@router.get(
    "/providers",
    summary="The model providers, which are configured, and the default",
    responses=doc(ProviderList),
)
async def list_providers(core: Core) -> dict[str, Any]:
    return {
        "default": core.providers.default_kind,
        "providers": [await provider_info(core, kind) for kind in PROVIDER_KINDS],
    }


@router.get(
    "/providers/configured",
    summary="The configured providers and their default models",
    responses=doc(list[ConfiguredProvider]),
)
async def configured_providers(core: Core) -> list[dict[str, Any]]:
    infos = [await provider_info(core, kind) for kind in PROVIDER_KINDS]
    return [{"kind": i["kind"], "model": i["model"] or ""} for i in infos if i["configured"]]


MODELS_CACHE_S = 300.0
# server -> kind -> (when, model ids)
_models_cache: weakref.WeakKeyDictionary[Prismd, dict[str, tuple[float, list[str]]]] = (
    weakref.WeakKeyDictionary()
)


def _failed(response: Response, code: ErrorCode | str, reason: str) -> None:
    # CortexPrism answers [] when the models cannot be listed; prismd says why in headers.
    response.headers["X-Prismd-Error"] = str(code)
    detail = mask_text(reason).encode("ascii", "replace").decode()[:300]
    response.headers["X-Prismd-Error-Detail"] = detail


async def _list_models(response: Response, get: Callable[[], Provider]) -> list[str] | None:
    """The model ids of the provider `get` builds, or None (and the reason in headers)."""
    try:
        # Building a provider imports its SDK (a second or two) and may probe Ollama.
        provider = await asyncio.to_thread(get)
        ids = await asyncio.wait_for(provider.list_models(), 30)
    except ProtocolError as exc:
        _failed(response, exc.code, exc.message)
        return None
    except Exception as exc:  # noqa: BLE001 - the SDKs raise many kinds; all mean the same here
        _failed(response, ErrorCode.PROVIDER_ERROR, f"listing the models failed: {exc}")
        return None
    return sorted(set(ids))


async def _models(core: Prismd, kind: str, response: Response) -> list[dict[str, Any]]:
    if kind not in PROVIDER_KINDS:
        _failed(response, "not_found", f"no provider {kind!r}")
        return []
    cache = _models_cache.setdefault(core, {})
    hit = cache.get(kind)
    if hit is not None and time.monotonic() - hit[0] < MODELS_CACHE_S:
        response.headers["X-Prismd-Cached"] = "true"
        return [{"id": m} for m in hit[1]]
    ids = await _list_models(response, lambda: core.providers.get(kind))
    if ids is None:
        return []
    cache[kind] = (time.monotonic(), ids)
    response.headers["X-Prismd-Cached"] = "false"
    return [{"id": m} for m in ids]


@router.get(
    "/providers/{kind}/models",
    summary="The models a provider offers (live from its /models, cached 5 minutes)",
    description="`[]` when they cannot be listed (unknown or unconfigured provider, provider "
    "error); then `X-Prismd-Error` holds the error code and `X-Prismd-Error-Detail` the "
    "reason. `X-Prismd-Cached` says whether the list came from the cache.",
    responses=doc(list[ModelOut]),
)
async def provider_models(core: Core, kind: str, response: Response) -> list[dict[str, Any]]:
    return await _models(core, kind, response)


@router.post(
    "/providers/{kind}/models",
    summary="The models a provider offers, optionally with credentials not yet saved",
    description="Without `apiKey`/`baseUrl`, the same as GET. With them (admins only), the "
    "models that those credentials reach; nothing is saved.",
    responses=doc(list[ModelOut], 403),
)
async def provider_models_with(
    core: Core,
    caller: Caller,
    kind: str,
    response: Response,
    body: Annotated[ModelsIn | None, Body()] = None,
) -> list[dict[str, Any]]:
    if body is None or not (body.apiKey or body.baseUrl):
        return await _models(core, kind, response)
    if not caller.admin:
        raise ApiError(403, ErrorCode.UNAUTHORIZED, "Only an admin may try provider credentials")
    if kind not in PROVIDER_KINDS:
        _failed(response, "not_found", f"no provider {kind!r}")
        return []
    settings = core.settings.model_copy(deep=True)
    trial = settings.provider_settings(kind).model_copy(
        update={"api_key": body.apiKey, "base_url": body.baseUrl}
    )
    settings.providers[kind] = trial  # type: ignore[index]
    registry = ProviderRegistry(settings, probe_ollama=False)
    try:
        ids = await _list_models(response, lambda: registry.get(kind))
    finally:
        await registry.aclose()
    return [{"id": m} for m in ids or ()]
