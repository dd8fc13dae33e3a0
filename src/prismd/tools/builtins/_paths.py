"""The one path resolver of the file tools: relative paths that stay inside the workspace.

A path is joined to the workspace and resolved with `os.path.realpath` (every symlink followed,
in intermediate directories and in the last component, also a dangling one); the result must be
the workspace or inside it. Writes go to the resolved path, by renaming a temporary file over it,
so that a symlink is never written through to a place outside.

(The check and the use are not atomic: a process running in the workspace at the same time
could swap a directory for a symlink in between. Such a process would be one the agent started
with `shell`, which can already write anywhere the server's user can.)

Errors name paths relative to the workspace, never the server's: an OSError becomes a ToolError
through `os_error`, and over-long paths are refused before the system sees them.
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


# Longer paths are refused with a clear error (Linux: PATH_MAX 4096, NAME_MAX 255 bytes).
MAX_PATH_BYTES = 4000
MAX_NAME_BYTES = 255
_SHOWN_CHARS = 200


def shown(path: str) -> str:
    """The model's own path, cut when it is long, for an error message."""
    return path if len(path) <= _SHOWN_CHARS else path[:_SHOWN_CHARS] + f"… ({len(path)} chars)"


def escapes(path: str, why: str = "") -> ToolError:
    return ToolError(f"path escapes the workspace: {shown(path)}" + (f" ({why})" if why else ""))


def redact(text: str, workspace: Path, *others: Path | str) -> str:
    """`text` with the workspace's absolute path made relative and other server paths hidden."""
    text = text.replace(os.path.realpath(workspace) + os.sep, "").replace(
        os.path.realpath(workspace), "."
    )
    for other in others:
        for form in {str(other), os.path.realpath(other)}:
            if form and form != "/":
                text = text.replace(form, "<server>")
    return text


def os_error(exc: OSError, workspace: Path, what: str = "") -> ToolError:
    """An OSError for the model: its reason, and the path only relative to the workspace."""
    reason = exc.strerror or type(exc).__name__
    name = exc.filename
    where = ""
    if isinstance(name, str | bytes | os.PathLike):
        path = os.fsdecode(name)
        root = os.path.realpath(workspace)
        if os.path.isabs(path) and is_inside(root, path):
            where = display(workspace, Path(path))
    prefix = f"{what}: " if what else ""
    return ToolError(f"{prefix}{shown(where) + ': ' if where else ''}{reason}")


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
    encoded = os.fsencode(path)
    if len(encoded) > MAX_PATH_BYTES:
        raise ToolError(f"path is too long: {len(encoded)} bytes (the limit is {MAX_PATH_BYTES})")
    if any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise ToolError(f"a name in the path is longer than {MAX_NAME_BYTES} bytes: {shown(path)}")
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


def adopt_owner(path: str | int, directory: str | Path) -> None:
    """Give a new file or directory the owner of the directory it is in, when prismd is root
    and that owner is another user (a workspace the sandbox user owns: see sandbox.py), so
    that sandboxed runs can change what the file tools created. `path`: a path or an open fd."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory)
    if st.st_uid == 0 and st.st_gid == 0:
        return
    if isinstance(path, int):
        os.fchown(path, st.st_uid, st.st_gid)
    else:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


def make_dirs(directory: Path) -> None:
    """`mkdir -p` (of a resolved path), each new directory owned as `adopt_owner` says."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:
            if not new.is_dir():
                raise
            continue  # made meanwhile by someone else
        adopt_owner(str(new), new.parent)
