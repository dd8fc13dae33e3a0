"""What `GET /api/config` shows and `PATCH /api/config` may change.

Secrets are masked. The keys that can change at run time are a short list (RUNTIME_KEYS); a
change is validated against the whole configuration, applied to the running server, and
written to `$PRISMD_HOME/config.toml` so that it survives a restart (the file is rewritten
from its parsed content: comments in it are not kept). The file is read and written in a
thread, off the event loop, one change at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..auth.redact import MASK, configured_secrets, mask_args, mask_text
from ..config import ConfigError, Settings

if TYPE_CHECKING:
    from .app import Prismd

SECRET_KEYS = {"api_key", "token", "password", "secret"}
# Dotted keys PATCH /api/config accepts, each applied to the running server at once.
RUNTIME_KEYS = (
    "default_agent",
    "provider",
    "model",
    "providers.openai.model",
    "providers.anthropic.model",
    "providers.ollama.model",
    "tools.max_rounds",
    "tools.approval_timeout_s",
    "tools.max_output_chars",
    "tools.display_output_chars",
)


def _mask(node: Any, known: Sequence[str] = (), key: str = "") -> Any:
    """Secrets masked (auth/redact.py): values of secret keys, of `env` and `headers`, secret
    `args`, credentials in URLs, and any configured secret wherever else it occurs."""
    if isinstance(node, dict):
        masked: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("env", "headers") and isinstance(v, dict):
                masked[k] = {name: MASK for name in v}
            elif k == "args" and isinstance(v, list) and all(isinstance(a, str) for a in v):
                masked[k] = [mask_text(a, known) for a in mask_args(v)]
            else:
                masked[k] = _mask(v, known, k)
        return masked
    if isinstance(node, list):
        return [_mask(v, known, key) for v in node]
    if key in SECRET_KEYS and node:
        return MASK
    if isinstance(node, str):
        return mask_text(node, known)
    return node


def effective(settings: Settings) -> dict[str, Any]:
    body = _mask(settings.model_dump(mode="json"), configured_secrets(settings))
    return {"config": body, "runtimeKeys": list(RUNTIME_KEYS)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class ConfigChangeError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    if value is None:
        tree.pop(last, None)
    else:
        tree[last] = value


# One change at a time per server: each validates against the settings the one before left,
# and the file is read, changed and replaced whole.
_locks: weakref.WeakKeyDictionary[Prismd, asyncio.Lock] = weakref.WeakKeyDictionary()


async def apply(core: Prismd, changes: dict[str, Any]) -> dict[str, Any]:
    """Validate, write the file (in a thread), apply to the running server. Raises
    ConfigChangeError; nothing is applied when the file cannot be written."""
    lock = _locks.get(core)
    if lock is None:
        lock = _locks[core] = asyncio.Lock()
    async with lock:
        return await _apply(core, changes)


async def _apply(core: Prismd, changes: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(changes)
    if not flat:
        raise ConfigChangeError("(body)", "no keys given")
    for key in flat:
        if key not in RUNTIME_KEYS:
            raise ConfigChangeError(key, "cannot be changed at run time (edit config.toml)")
    settings = core.settings
    tree = settings.model_dump(mode="json", exclude_none=True)
    for key, value in flat.items():
        _set(tree, key, value)
    try:
        new = Settings.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigChangeError(key, err["msg"]) from None
    if new.default_agent != settings.default_agent and core.agents.find(new.default_agent) is None:
        raise ConfigChangeError("default_agent", f"no agent with id {new.default_agent!r}")
    await asyncio.to_thread(_write, settings.home.expanduser() / "config.toml", flat)
    for key in flat:
        parts = key.split(".")
        if parts[0] == "providers":
            kind, name = parts[1], parts[2]
            if kind not in settings.providers:
                settings.providers[kind] = new.providers[kind]  # type: ignore[index]
            else:
                value = getattr(new.providers[kind], name)
                setattr(settings.providers[kind], name, value)
            continue
        target: Any = settings
        source: Any = new
        for part in parts[:-1]:
            target, source = getattr(target, part), getattr(source, part)
        setattr(target, parts[-1], getattr(source, parts[-1]))
    core.agents.default_id = settings.default_agent
    core.providers.reconfigure()
    return effective(settings)


def _write(path: Path, flat: dict[str, Any]) -> None:
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigChangeError("(file)", f"cannot read {path}: {exc}") from None
    for key, value in flat.items():
        _set(tree, key, value)
    text = dumps_toml(tree)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - a bug in dumps_toml
        raise ConfigError(f"internal error writing {path}: {exc}") from None
    tmp = path.with_suffix(".toml.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigChangeError("(file)", f"cannot write {path}: {exc}") from None


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def dumps_toml(tree: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for configuration trees (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_key(key)} = {_scalar(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{_key(key)}"
        if isinstance(value, dict):
            body = dumps_toml(value, name + ".")
            out += f"\n[{name}]\n{body}"
        else:
            for item in value:
                out += f"\n[[{name}]]\n{dumps_toml(item, name + '.')}"
    return out
