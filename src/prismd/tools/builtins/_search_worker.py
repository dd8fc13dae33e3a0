"""The worker of `file_search`: `python -I -B _search_worker.py`, a JSON request on stdin.

It runs in a child process so that a pathological regular expression (catastrophic backtracking)
is stopped by the tool's timeout and kill instead of spinning a server thread forever. Standard
library only; it must not import prismd.
"""

from __future__ import annotations

import json
import os
import re
import sys


def glob_to_regex(glob: str) -> str:
    """`**` crosses directories, `*` and `?` do not; `[...]` classes as in fnmatch."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = glob.find("]", i + 2)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = glob[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out) + r"\Z"


def inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def main() -> None:
    req = json.load(sys.stdin)
    root: str = req["root"]
    start: str = req["start"]
    regex = re.compile(req["pattern"], re.IGNORECASE if req["ignore_case"] else 0)
    glob = req.get("glob")
    include = re.compile(glob_to_regex(glob)) if glob else None
    basename_only = bool(glob) and "/" not in glob
    skip_dirs = set(req["skip_dirs"])
    max_matches: int = req["max_matches"]
    max_line: int = req["max_line"]
    max_file_bytes: int = req["max_file_bytes"]

    matches: list[str] = []
    stats = {"files": 0, "binary": 0, "large": 0}
    truncated = False

    def search_file(full: str) -> bool:
        """False when the match cap is reached."""
        nonlocal truncated
        rel_start = os.path.relpath(full, start)
        if include is not None:
            target = os.path.basename(full) if basename_only else rel_start
            if not include.match(target):
                return True
        if os.path.islink(full):
            real = os.path.realpath(full)
            if not inside(root, real):
                return True
        else:
            real = full
        try:
            if not os.path.isfile(real):
                return True
            if os.path.getsize(real) > max_file_bytes:
                stats["large"] += 1
                return True
            with open(real, "rb") as f:
                data = f.read(max_file_bytes + 1)
        except OSError:
            return True
        if b"\x00" in data[:8192]:
            stats["binary"] += 1
            return True
        stats["files"] += 1
        shown = os.path.relpath(full, root)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if regex.search(line):
                if len(matches) >= max_matches:
                    truncated = True
                    return False
                text = line.strip()
                if len(text) > max_line:
                    text = text[:max_line] + "…"
                matches.append(f"{shown}:{number}: {text}")
        return True

    if os.path.isfile(start):
        search_file(start)
    else:
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
            if not all(search_file(os.path.join(dirpath, name)) for name in sorted(filenames)):
                break
    json.dump({"matches": matches, "truncated": truncated, **stats}, sys.stdout)


if __name__ == "__main__":
    main()
