"""Control groups for sandboxed runs: one bound on the memory and the process count of a run's
whole process tree, and a kill of everything in it.

Each run gets a group of its own, `prismd-sbx.<owner>.<n>`, created beneath the group the
server itself runs in (never above it: the run stays inside whatever limits the server has),
where `<owner>` is the server's pid and start time. The group is removed when the run ends; a
server that died (kill -9) leaves its groups behind, and the next server to start removes every
group whose owner is no longer running (`sweep`), killing what is left in it.

- cgroup v1: the `memory` hierarchy (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes`
  where swap is accounted, so that a run cannot swap its way past the bound) and the `pids`
  hierarchy (`pids.max`).
- cgroup v2: a delegated subtree: the server's group, or its parent, must have `memory` and
  `pids` in `cgroup.subtree_control` and be writable (systemd: `Delegate=memory pids` with
  `DelegateSubgroup=`). `memory.max`, `memory.swap.max = 0`, `pids.max`, and `cgroup.kill`.

Where neither is available (prismd not root and nothing delegated, a container without its
cgroup mounted writable) `detect()` says why and runs go without a group: the process tree is
then bounded only per process (rlimits) and killed through its PID namespace and session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from dataclasses import dataclass, field

PREFIX = "prismd-sbx."
_seq = itertools.count(1)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with
    the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[19].decode()
    except IndexError:
        return None


_owner: tuple[int, str] | None = None


def owner_id() -> str:
    """`<pid>-<start time>` of this process (the marker of what it starts)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, _start_time(pid) or "0")
    return f"{_owner[0]}-{_owner[1]}"


def owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition("-")
    if not pid.isdigit():
        return True  # not ours to judge
    return _start_time(int(pid)) == start


def parse_owner(name: str) -> str | None:
    """The owner of a marked name (`prismd-sbx.<owner>.<n>`), None when it is not one."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(".")
    return parts[0] if len(parts) == 2 else None


# --- where groups can be made --------------------------------------------------------------


@dataclass(slots=True)
class Layout:
    version: int  # 1 or 2
    # controller -> the directory beneath which run groups are created (v2: one directory for
    # both "memory" and "pids").
    bases: dict[str, str]
    swap_accounted: bool = False

    @property
    def dirs(self) -> list[str]:
        return sorted(set(self.bases.values()))


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root within the hierarchy, fstype, options) of the cgroup mounts."""
    found: list[tuple[str, str, str, set[str]]] = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3 or rparts[0] not in ("cgroup", "cgroup2"):
            continue
        mount_point = parts[4].replace("\\040", " ")
        found.append((mount_point, parts[3], rparts[0], set(rparts[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (v1) or "" (v2) -> this process's group path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return paths
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if not controllers:
            paths[""] = path
        for c in controllers.split(","):
            paths[c] = path
    return paths


def _join(mount_point: str, mount_root: str, path: str) -> str:
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return os.path.normpath(mount_point + "/" + path.lstrip("/"))


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def detect() -> tuple[Layout | None, str]:
    """Where this process may create run groups, or None and the reason there is none."""
    own = _own_paths()
    mounts = _mounts()
    v1: dict[str, str] = {}
    for mount_point, root, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in ("memory", "pids"):
            if controller in options and controller in own:
                base = _join(mount_point, root, own[controller])
                if _writable_dir(base):
                    v1[controller] = base
    if set(v1) == {"memory", "pids"}:
        swap = os.path.exists(os.path.join(v1["memory"], "memory.memsw.limit_in_bytes"))
        return Layout(1, v1, swap_accounted=swap), "cgroup v1 (memory, pids)"
    for mount_point, root, fstype, _options in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        own_dir = _join(mount_point, root, own[""])
        for candidate in (own_dir, os.path.dirname(own_dir)):
            if not candidate.startswith(mount_point):
                continue
            try:
                with open(os.path.join(candidate, "cgroup.subtree_control")) as f:
                    enabled = set(f.read().split())
            except OSError:
                continue
            if {"memory", "pids"} <= enabled and _writable_dir(candidate):
                swap = os.path.exists(os.path.join(candidate, "memory.swap.max"))
                layout = Layout(2, {"memory": candidate, "pids": candidate}, swap_accounted=swap)
                return layout, "cgroup v2 (delegated subtree)"
    if v1:
        return None, f"cgroup v1 has only {', '.join(sorted(v1))} writable (needs memory and pids)"
    return None, (
        "no writable cgroup with the memory and pids controllers (cgroup v1 hierarchies or a "
        "delegated cgroup v2 subtree)"
    )


# --- one run's group ------------------------------------------------------------------------


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(slots=True)
class RunGroup:
    layout: Layout
    name: str
    dirs: list[str]
    _procs_fds: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, layout: Layout, memory_bytes: int, max_pids: int) -> RunGroup:
        name = f"{PREFIX}{owner_id()}.{next(_seq)}"
        group = cls(layout, name, [os.path.join(d, name) for d in layout.dirs])
        try:
            for d in group.dirs:
                os.mkdir(d, 0o755)
            memory_dir = os.path.join(layout.bases["memory"], name)
            pids_dir = os.path.join(layout.bases["pids"], name)
            if layout.version == 1:
                _write(os.path.join(memory_dir, "memory.limit_in_bytes"), str(memory_bytes))
                if layout.swap_accounted:
                    _write(
                        os.path.join(memory_dir, "memory.memsw.limit_in_bytes"), str(memory_bytes)
                    )
            else:
                _write(os.path.join(memory_dir, "memory.max"), str(memory_bytes))
                if layout.swap_accounted:
                    _write(os.path.join(memory_dir, "memory.swap.max"), "0")
            _write(os.path.join(pids_dir, "pids.max"), str(max_pids))
            for d in group.dirs:
                fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                group._procs_fds.append(fd)
        except OSError:
            group.close_fds()
            group.remove()
            raise
        return group

    def join(self) -> None:
        """Move the calling process into the group; called in the child before it execs (so
        that everything it starts is in the group from the first instruction)."""
        pid = str(os.getpid()).encode()
        for fd in self._procs_fds:
            os.write(fd, pid)

    def close_fds(self) -> None:
        for fd in self._procs_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._procs_fds.clear()

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for reaching the memory bound."""
        d = os.path.join(self.layout.bases["memory"], self.name)
        name = "memory.oom_control" if self.layout.version == 1 else "memory.events"
        try:
            with open(os.path.join(d, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            found |= _procs(d)
        return found

    def kill(self) -> None:
        kill_dir_tree(self.dirs, self.layout.version)

    def remove(self) -> bool:
        """Remove the group (True when gone); it must be empty (`kill` first)."""
        return _rmdirs(self.dirs)


def _procs(directory: str) -> set[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            return {int(line) for line in f if line.strip()}
    except (OSError, ValueError):
        return set()


def kill_dir_tree(dirs: list[str], version: int) -> None:
    """SIGKILL every process in the groups `dirs` (looking again: one may fork meanwhile; the
    pids bound keeps that finite)."""
    if version == 2:
        for d in dirs:
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "cgroup.kill"), "1")
    for _ in range(50):
        pids = set().union(*(_procs(d) for d in dirs)) if dirs else set()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def sweep(layout: Layout) -> list[str]:
    """Kill what is left in the run groups of servers that are no longer running and remove
    those groups. Returns the names removed."""
    removed = []
    by_name: dict[str, list[str]] = {}
    for base in layout.dirs:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            owner = parse_owner(name)
            if owner is not None and not owner_alive(owner):
                by_name.setdefault(name, []).append(os.path.join(base, name))
    for name, dirs in by_name.items():
        for _ in range(100):  # killed processes take a moment to be gone (at most a second)
            kill_dir_tree(dirs, layout.version)
            if _rmdirs(dirs):
                removed.append(name)
                break
            time.sleep(0.01)
    return removed


def _rmdirs(dirs: list[str]) -> bool:
    gone = True
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            gone = False
    return gone
