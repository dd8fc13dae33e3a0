"""The one path resolver of the file tools: relative paths that stay inside the workspace.

A path is joined to the workspace and resolved with `os.path.realpath` (every symlink followed,
in intermediate directories and in the last component, also a dangling one); the result must be
the workspace or inside it. Writes go to the resolved path, by renaming a temporary file over it,
so that a symlink is never written through to a place outside.

The check and the use are made atomic by the use: a resolved path has no symlink in it, so the
tools reach it one component at a time from an fd of the workspace with O_NOFOLLOW (`dir_fd`,
`open_file`). A process running in the workspace at the same time (a user's sandboxed `shell`,
as its own uid, while prismd is root) that swaps a directory for a symlink in between makes the
call fail; it never makes prismd read or write through the symlink. Files are opened with
O_NONBLOCK, so a FIFO put in the workspace cannot hang a server thread.

Errors name paths relative to the workspace, never the server's: an OSError becomes a ToolError
through `os_error`, and over-long paths are refused before the system sees them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
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


_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def adopt_owner(dirfd: int, name: str | None = None, fd: int | None = None) -> None:
    """Give a new entry (`name` in the directory `dirfd`, or the open `fd`) the owner of that
    directory, when prismd is root and the directory is another user's (a workspace the sandbox
    user owns: see sandbox.py), so that sandboxed runs can change what the file tools made."""
    if os.geteuid() != 0:
        return
    st = os.fstat(dirfd)
    if st.st_uid == 0 and st.st_gid == 0:
        return
    if fd is not None:
        os.fchown(fd, st.st_uid, st.st_gid)
    elif name is not None:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dirfd, follow_symlinks=False)


@contextlib.contextmanager
def dir_fd(workspace: Path, real: Path, *, create: bool = False) -> Iterator[int]:
    """An O_PATH fd of the directory `real` (resolved, inside the workspace), reached from the
    workspace one component at a time without following a symlink (NotADirectoryError when one
    was swapped in since `resolve`). `create`: make the missing directories (`mkdir -p`)."""
    rel = os.path.relpath(real, root(workspace))
    fd = os.open(root(workspace), _DIR_FLAGS)
    try:
        for name in [] if rel == "." else rel.split(os.sep):
            if create:
                try:
                    os.mkdir(name, dir_fd=fd)
                except FileExistsError:
                    pass
                else:
                    adopt_owner(fd, name)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_file(workspace: Path, real: Path) -> int:
    """A read-only fd of the file `real`, reached as `dir_fd` does; never through a symlink,
    and never blocking on a FIFO (opened with O_NONBLOCK, set blocking again afterwards)."""
    with dir_fd(workspace, real.parent) as parent:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(real.name, flags, dir_fd=parent)
    os.set_blocking(fd, True)
    return fd


def open_listing(workspace: Path, real: Path) -> int:
    """A readable fd of the directory `real` (for os.scandir), reached as `dir_fd` does."""
    with dir_fd(workspace, real) as fd:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)


def write_at(dirfd: int, name: str, data: bytes) -> None:
    """Write `data` to `name` in the directory `dirfd` via a temporary file there and a rename:
    readers see the old or the new content, and a symlink is never written through. The file
    keeps its mode (new: 0666 less the umask) and takes the directory's owner (`adopt_owner`)."""
    try:
        mode = stat.S_IMODE(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = f".{name[:200]}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dirfd)
            break
        except FileExistsError:
            continue
    try:
        adopt_owner(dirfd, fd=fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
