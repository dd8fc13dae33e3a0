"""File tools confined to the workspace: file_read/_write/_edit/_list/_search.

They run as prismd's user (root, possibly) in workspaces where a user's sandboxed `shell` may be
running as another uid: paths are checked by `_paths.resolve` and then reached without following
a symlink (`_paths.dir_fd`, `open_file`, `write_at`), so that nothing swapped in meanwhile leads
them outside; `file_search` for such a user runs in the sandbox itself.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec
from . import _paths, sandbox
from ._paths import SKIP_DIRS, display, looks_binary, resolve
from ._proc import run_process, scrubbed_env

MAX_READ_LINE_CHARS = 2000
DEFAULT_READ_LINES = 2000
MAX_WRITE_BYTES = 10 * 1024 * 1024
MAX_EDIT_FILE_BYTES = 10 * 1024 * 1024
MAX_LIST_ENTRIES = 1000
MAX_SEARCH_MATCHES = 200
MAX_SEARCH_LINE_CHARS = 300
MAX_SEARCH_FILE_BYTES = 5 * 1024 * 1024
SEARCH_TIMEOUT_S = 30.0
SEARCH_OUTPUT_BYTES = 4 * 1024 * 1024
SEARCH_WORKER = Path(__file__).with_name("_search_worker.py")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_SUBDIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _str_arg(args: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise ToolError(f"missing argument: {name}")
        return None
    if not isinstance(value, str):
        raise ToolError(f"{name} must be a string")
    return value


def _int_arg(args: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = args.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ToolError(f"{name} must be an integer")
    if value < minimum:
        raise ToolError(f"{name} must be at least {minimum}")
    return int(value)


def _under(root: str, rel: str) -> str:
    return os.path.normpath(os.path.join(root, rel))


def _bool_arg(args: dict[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ToolError(f"{name} must be true or false")
    return value


class _FileTool(Tool):
    """A file tool: an OSError becomes a ToolError that names paths relative to the workspace
    (never the server's data path or a user id)."""

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        try:
            return await self._run(args, ctx)
        except OSError as exc:
            raise _paths.os_error(exc, ctx.workspace, f"{self.spec.name} failed") from None

    @abc.abstractmethod
    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str: ...


# --- file_read --------------------------------------------------------------------------------


class FileRead(_FileTool):
    spec = ToolSpec(
        name="file_read",
        description=(
            "Read a text file in the workspace. Lines are shown numbered (`   12\\tline`); the "
            "numbers are not part of the file. Reads up to `limit` lines from line `offset` "
            "(1-based); long output stops early and says which offset to continue from. "
            "Binary files are refused. Paths are relative to the workspace."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "File path relative to the workspace."},
                "offset": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "First line to read (1-based). Default 1.",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "description": f"Maximum number of lines. Default {DEFAULT_READ_LINES}.",
                },
            },
            "required": ["path"],
            "additionalProperties": False,
        },
    )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        rel = _str_arg(args, "path")
        offset = _int_arg(args, "offset", 1, 1)
        limit = _int_arg(args, "limit", DEFAULT_READ_LINES, 1)
        real = resolve(ctx.workspace, rel)
        budget = max(1024, ctx.settings.max_output_chars - 200)
        return await asyncio.to_thread(self._read, ctx.workspace, real, offset, limit, budget)

    @staticmethod
    def _read(workspace: Path, real: Path, offset: int, limit: int, budget: int) -> str:
        shown = display(workspace, real)
        if real.is_dir():
            raise ToolError(f"{shown} is a directory; use file_list")
        if not real.exists():
            raise ToolError(f"no such file: {shown}")
        try:
            f = os.fdopen(_paths.open_file(workspace, real), "rb")
        except OSError as exc:
            raise ToolError(f"cannot read {shown}: {exc.strerror}") from None
        with f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ToolError(f"{shown} is not a regular file")
            if looks_binary(f.read(_paths.BINARY_SNIFF_BYTES)):
                size = os.fstat(f.fileno()).st_size
                raise ToolError(f"{shown} is a binary file ({size} bytes); file_read reads text")
            f.seek(0)
            out: list[str] = []
            used = 0
            total = 0
            stopped_at: int | None = None
            for number, raw in enumerate(f, 1):
                total = number
                if number < offset or stopped_at is not None or number >= offset + limit:
                    continue
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) > MAX_READ_LINE_CHARS:
                    line = line[:MAX_READ_LINE_CHARS] + f"… [line cut at {MAX_READ_LINE_CHARS}]"
                entry = f"{number:>6}\t{line}"
                if used + len(entry) + 1 > budget and out:
                    stopped_at = number
                    continue
                out.append(entry)
                used += len(entry) + 1
        if total == 0:
            return f"{shown}: empty file"
        if offset > total:
            raise ToolError(f"offset {offset} is past the end of {shown} ({total} lines)")
        last = offset + len(out) - 1
        header = f"{shown} (lines {offset}-{last} of {total})"
        body = "\n".join(out)
        if stopped_at is not None:
            body += f"\n[output limit reached: continue with offset={stopped_at}]"
        elif last < total:
            body += f"\n[{total - last} more lines: continue with offset={last + 1}]"
        return f"{header}\n{body}"


# --- file_write -------------------------------------------------------------------------------


class FileWrite(_FileTool):
    spec = ToolSpec(
        name="file_write",
        description=(
            "Create or overwrite a file in the workspace with `content` (UTF-8 text). Missing "
            "parent directories are created. The write is atomic. To change part of an existing "
            "file prefer file_edit. Paths are relative to the workspace."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "File path relative to the workspace."},
                "content": {"type": "string", "description": "The complete new file content."},
            },
            "required": ["path", "content"],
            "additionalProperties": False,
        },
    )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        rel = _str_arg(args, "path")
        content = _str_arg(args, "content")
        assert rel is not None and content is not None
        data = content.encode("utf-8", "surrogatepass")
        if len(data) > MAX_WRITE_BYTES:
            raise ToolError(f"content is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
        real = resolve(ctx.workspace, rel)
        return await asyncio.to_thread(self._write, ctx.workspace, real, data)

    @staticmethod
    def _write(workspace: Path, real: Path, data: bytes) -> str:
        shown = display(workspace, real)
        if real == Path(os.path.realpath(workspace)) or real.is_dir():
            raise ToolError(f"{shown} is a directory")
        existed = real.exists()
        try:
            with _paths.dir_fd(workspace, real.parent, create=True) as parent:
                _paths.write_at(parent, real.name, data)
        except (NotADirectoryError, FileExistsError):
            raise ToolError(f"cannot write {shown}: a parent is not a directory") from None
        except OSError as exc:
            raise ToolError(f"cannot write {shown}: {exc.strerror or exc}") from None
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        verb = "overwrote" if existed else "created"
        return f"{verb} {shown} ({len(data)} bytes, {lines} lines)"


# --- file_edit --------------------------------------------------------------------------------


class FileEdit(_FileTool):
    spec = ToolSpec(
        name="file_edit",
        description=(
            "Replace exact text in a file of the workspace: `old_string` must occur exactly once "
            "(include enough surrounding lines to make it unique) unless `replace_all` is true. "
            "Whitespace and indentation must match the file exactly; do not include the line "
            "numbers that file_read shows. Paths are relative to the workspace."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "File path relative to the workspace."},
                "old_string": {"type": "string", "description": "The exact text to replace."},
                "new_string": {"type": "string", "description": "The replacement text."},
                "replace_all": {
                    "type": "boolean",
                    "description": "Replace every occurrence. Default false.",
                },
            },
            "required": ["path", "old_string", "new_string"],
            "additionalProperties": False,
        },
    )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        rel = _str_arg(args, "path")
        old = _str_arg(args, "old_string")
        new = _str_arg(args, "new_string")
        replace_all = _bool_arg(args, "replace_all")
        assert old is not None and new is not None
        if old == "":
            raise ToolError("old_string is empty; use file_write to create or overwrite a file")
        if old == new:
            raise ToolError("old_string and new_string are the same; nothing to change")
        real = resolve(ctx.workspace, rel)
        return await asyncio.to_thread(self._edit, ctx.workspace, real, old, new, replace_all)

    @staticmethod
    def _edit(workspace: Path, real: Path, old: str, new: str, replace_all: bool) -> str:
        shown = display(workspace, real)
        if not real.is_file():
            raise ToolError(f"no such file: {shown}")
        with os.fdopen(_paths.open_file(workspace, real), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{shown} is not a regular file")
            if info.st_size > MAX_EDIT_FILE_BYTES:
                raise ToolError(f"{shown} is larger than {MAX_EDIT_FILE_BYTES} bytes; not edited")
            data = f.read(MAX_EDIT_FILE_BYTES + 1)
        if looks_binary(data[: _paths.BINARY_SNIFF_BYTES]):
            raise ToolError(f"{shown} is a binary file; file_edit edits text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{shown} is not valid UTF-8; not edited") from None
        count = text.count(old)
        if count == 0 and "\r\n" in text and "\n" in old and "\r\n" not in old:
            # The file has Windows line endings; the model wrote Unix ones.
            old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
            count = text.count(old)
        if count == 0:
            raise ToolError(
                f"old_string not found in {shown}; read the file again and copy the text exactly"
            )
        if count > 1 and not replace_all:
            raise ToolError(
                f"old_string occurs {count} times in {shown}; include more surrounding text to "
                "make it unique, or set replace_all to true"
            )
        text = text.replace(old, new) if replace_all else text.replace(old, new, 1)
        with _paths.dir_fd(workspace, real.parent) as parent:
            _paths.write_at(parent, real.name, text.encode("utf-8", "surrogatepass"))
        return f"replaced {count if replace_all else 1} occurrence(s) in {shown}"


# --- file_list --------------------------------------------------------------------------------


class FileList(_FileTool):
    spec = ToolSpec(
        name="file_list",
        description=(
            "List a directory of the workspace (default: its root). Directories end with '/', "
            "symlinks with '@'. With `recursive`, lists the whole tree (not descending into "
            ".git, node_modules, __pycache__, virtualenvs and caches). Paths are shown relative "
            f"to the workspace; at most {MAX_LIST_ENTRIES} entries."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {
                    "type": "string",
                    "description": "Directory relative to the workspace. Default: the root.",
                },
                "recursive": {"type": "boolean", "description": "List subdirectories too."},
            },
            "required": [],
            "additionalProperties": False,
        },
    )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        rel = _str_arg(args, "path", required=False)
        recursive = _bool_arg(args, "recursive")
        real = resolve(ctx.workspace, rel, default=".")
        return await asyncio.to_thread(self._list, ctx.workspace, real, recursive)

    @staticmethod
    def _list(workspace: Path, real: Path, recursive: bool) -> str:
        shown = display(workspace, real)
        if not real.exists():
            raise ToolError(f"no such directory: {shown}")
        if not real.is_dir():
            raise ToolError(f"{shown} is a file, not a directory")
        entries: list[str] = []
        truncated = False

        def walk(fd: int, prefix: str) -> None:
            """List the directory `fd`; subdirectories are opened from it without following a
            symlink (one swapped in meanwhile is not descended into)."""
            nonlocal truncated
            try:
                with os.scandir(fd) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError:
                return
            for entry in items:
                if len(entries) >= MAX_LIST_ENTRIES:
                    truncated = True
                    return
                rel = prefix + entry.name
                is_dir = entry.is_dir(follow_symlinks=False)
                name = rel + ("@" if entry.is_symlink() else "/" if is_dir else "")
                if recursive and is_dir and entry.name in SKIP_DIRS:
                    name += " (not listed)"
                entries.append(name)
                if recursive and is_dir and entry.name not in SKIP_DIRS:
                    try:
                        child = os.open(entry.name, _SUBDIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    try:
                        walk(child, rel + "/")
                    finally:
                        os.close(child)
                    if truncated:
                        return

        top = _paths.open_listing(workspace, real)
        try:
            walk(top, "" if shown == "." else shown + "/")
        finally:
            os.close(top)
        if not entries:
            return f"{shown}/ is empty"
        out = "\n".join(entries)
        if truncated:
            out += f"\n[listing stopped at {MAX_LIST_ENTRIES} entries]"
        return out


# --- file_search ------------------------------------------------------------------------------


class FileSearch(_FileTool):
    spec = ToolSpec(
        name="file_search",
        description=(
            "Search the text files of the workspace for a regular expression (Python syntax) "
            "and return matching lines as `path:line: text`. `path` narrows the search to a "
            "directory, a file, or a glob ('*.py' matches at any depth, 'src/**/*.ts' under src). "
            f"Binary files and files over {MAX_SEARCH_FILE_BYTES // (1024 * 1024)} MB are "
            f"skipped; at most {MAX_SEARCH_MATCHES} matches."
        ),
        parameters={
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "Regular expression to search for."},
                "path": {
                    "type": "string",
                    "description": "Directory, file or glob relative to the workspace. "
                    "Default: the whole workspace.",
                },
                "case_insensitive": {"type": "boolean", "description": "Ignore case."},
            },
            "required": ["pattern"],
            "additionalProperties": False,
        },
    )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        pattern = _str_arg(args, "pattern")
        assert pattern is not None
        where = _str_arg(args, "path", required=False) or "."
        ignore_case = _bool_arg(args, "case_insensitive")
        try:
            re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None
        match = _GLOB_MAGIC.search(where)
        glob: str | None = None
        if match is None:
            start = resolve(ctx.workspace, where)
        else:
            prefix_end = where.rfind("/", 0, match.start())
            prefix = where[:prefix_end] if prefix_end >= 0 else "."
            glob = where[prefix_end + 1 :]
            start = resolve(ctx.workspace, prefix or ".")
        if not start.exists():
            raise ToolError(f"no such file or directory: {display(ctx.workspace, start)}")
        # A caller who is not trusted may have a sandboxed shell changing the workspace while
        # the search runs: the worker then runs in the sandbox too (it sees nothing else).
        sandboxed = not ctx.trusted and (await asyncio.to_thread(sandbox.probe))["bwrap"]
        root = sandbox.WORKSPACE_MOUNT if sandboxed else _paths.root(ctx.workspace)
        request = {
            "root": root,
            "start": _under(root, display(ctx.workspace, start)),
            "pattern": pattern,
            "ignore_case": ignore_case,
            "glob": glob,
            "skip_dirs": sorted(SKIP_DIRS),
            "max_matches": MAX_SEARCH_MATCHES,
            "max_line": MAX_SEARCH_LINE_CHARS,
            "max_file_bytes": MAX_SEARCH_FILE_BYTES,
        }
        stdin = json.dumps(request).encode()
        if sandboxed:
            spec = sandbox.RunSpec(
                [sys.executable, "-I", "-B", "search_worker.py"],
                memory_mb=512,
                max_processes=4,
                workspace=ctx.workspace,
                files={"search_worker.py": SEARCH_WORKER.read_bytes()},
                stdin_data=stdin,
            )
            run = await sandbox.run(
                spec, timeout_s=SEARCH_TIMEOUT_S, max_output_bytes=SEARCH_OUTPUT_BYTES
            )
            result = run.proc
        else:
            result = await run_process(
                [sys.executable, "-I", "-B", str(SEARCH_WORKER)],
                cwd=str(start if start.is_dir() else start.parent),
                env=scrubbed_env(str(ctx.workspace)),
                timeout_s=SEARCH_TIMEOUT_S,
                max_output_bytes=SEARCH_OUTPUT_BYTES,
                stdin_data=stdin,
            )
        if result.timed_out:
            raise ToolError(
                f"search timed out after {SEARCH_TIMEOUT_S:.0f} s (a pattern that backtracks "
                "badly, or a very large tree); narrow the path or simplify the pattern"
            )
        try:
            found = json.loads(result.output)
        except ValueError:
            why = result.output.strip()[-500:]
            why = _paths.redact(why, ctx.workspace, ctx.data_dir, SEARCH_WORKER.parent)
            raise ToolError(f"search failed: {why}") from None
        matches: list[str] = found["matches"]
        notes = []
        if found["truncated"]:
            notes.append(f"stopped at {MAX_SEARCH_MATCHES} matches; narrow the search")
        if found["binary"]:
            notes.append(f"{found['binary']} binary file(s) skipped")
        if found["large"]:
            notes.append(f"{found['large']} large file(s) skipped")
        if not matches:
            text = f"no matches in {found['files']} file(s)"
        else:
            text = "\n".join(matches)
        if notes:
            text += "\n[" + "; ".join(notes) + "]"
        return text
