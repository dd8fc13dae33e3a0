"""The one path resolver of the file tools: relative paths that stay inside the workspace.

A path is joined to the workspace and resolved with `os.path.realpath` (every symlink followed,
in intermediate directories and in the last component, also a dangling one); the result must be
the workspace or inside it. Writes go to the resolved path, by renaming a temporary file over it,
so that a symlink is never written through to a place outside.

(The check and the use are not atomic: a process running in the workspace at the same time
could swap a directory for a symlink in between. Such a process would be one the agent started
with `shell`, which can already write anywhere the server's user can.)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..base import ToolError

# Directories that listings and searches do not descend into.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "node_modules",
        "__pycache__",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
    }
)

BINARY_SNIFF_BYTES = 8192


def escapes(path: str, why: str = "") -> ToolError:
    return ToolError(f"path escapes the workspace: {path}" + (f" ({why})" if why else ""))


def is_inside(root: str, candidate: str) -> bool:
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)


def resolve(workspace: Path, path: object, *, default: str | None = None) -> Path:
    """The real path of `path` (relative to the workspace); a ToolError when it is not a relative
    path or when it, or a symlink on the way, leads outside the workspace."""
    if path is None or path == "":
        if default is None:
            raise ToolError("a path is required")
        path = default
    if not isinstance(path, str):
        raise ToolError("path must be a string")
    if "\x00" in path:
        raise ToolError("path contains a NUL character")
    if os.path.isabs(path) or path.startswith("~"):
        raise escapes(path, "absolute paths are not allowed; give a path relative to the workspace")
    root = os.path.realpath(workspace)
    real = os.path.realpath(os.path.join(root, path))
    if not is_inside(root, real):
        lexical = os.path.normpath(os.path.join(root, path))
        why = "a symlink on the way leads outside" if is_inside(root, lexical) else "'..'"
        raise escapes(path, why)
    return Path(real)


def root(workspace: Path) -> str:
    return os.path.realpath(workspace)


def display(workspace: Path, real: Path) -> str:
    """How a resolved path is shown to the model: relative to the workspace."""
    rel = os.path.relpath(real, os.path.realpath(workspace))
    return "." if rel == "." else rel


def looks_binary(sample: bytes) -> bool:
    return b"\x00" in sample
