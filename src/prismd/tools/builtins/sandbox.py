"""The sandbox of `code_exec`, of `shell` for callers who are not trusted (and for everyone with
`tools.shell.sandbox = "always"`), and of the PDF text extractor. What the machine allows is
probed once (in throwaway child processes) and reported by `isolation()` (`GET /api/tools`).

**With bubblewrap** (`bwrap`, Debian's `bubblewrap`; `make install` installs it) each run gets:

- its own mount namespace whose only contents are the system's read-only directories (`/usr`,
  `/bin`, `/lib*`, `/sbin`, a list of harmless files of `/etc`, Python's installation), a fresh
  `/proc` of its own PID namespace, a minimal `/dev` (its own `/dev/shm`), an empty `/tmp`
  (a tmpfs, the run's directory, whose pages count against the run's memory bound) and the
  workspace at `/workspace` (read-only for `code_exec`). The host's `/run`, `/var`, `/tmp`,
  `/home`, the data directory and the other workspaces do not exist in it, nor do the Unix
  sockets in them;
- a separate, unprivileged uid when prismd runs as root: bwrap runs as root (no user
  namespace needed) and `setpriv` drops to the `prismd-sandbox` system user (`nobody`, 65534,
  when there is none) with no capabilities, no supplementary groups and no_new_privs. When
  prismd is not root, bwrap uses a user namespace and the run keeps prismd's uid;
- its own PID, IPC, UTS and (unless configured otherwise) network namespaces: no interface but
  its own loopback, so no connection to anything, not the host's 127.0.0.1 nor its abstract
  Unix sockets; when the PID namespace's first process ends, the kernel kills everything left
  in it (a double fork with setsid() included);
- a cgroup of its own (see _cgroup.py) bounding the memory and the process count of the whole
  tree, where the server may create one;
- the parent-death signal (SIGKILL when the server dies, even by kill -9), set before bwrap is
  started and by bwrap (`--die-with-parent`) for the processes inside; the cgroups and
  processes left by a server that died anyway are removed by the next one (`sweep_leftovers`);
- a seccomp filter (_seccomp.py) denying user namespaces and other system calls that kernel
  exploits favour, where libseccomp is installed;
- per-process rlimits (CPU time, address space, file size, no core dumps; the process count
  when there is no cgroup) and a scrubbed environment.

**Without bubblewrap** (or when it cannot run here) `code_exec` falls back to what the old
sandbox had: a network namespace, Landlock (read-only system directories, workspace and Python;
writes only in a temporary directory), rlimits, the parent-death signal and a cgroup where
possible, as prismd's own uid. That is not enough for someone else's code (the host's pathname
Unix sockets stay reachable, nothing hides the host's files from reading where Landlock is
missing): `untrusted_ok` is then false and the tools refuse callers who are not trusted.

`untrusted_ok` is true only when bubblewrap runs, the run has a uid other than the server's,
and a cgroup bounds the whole process tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _cgroup, _seccomp
from ._landlock import (
    _ETC_READ,
    CLONE_NEWNET,
    CLONE_NEWUSER,
    LandlockPlan,
    landlock_abi,
    python_read_roots,
    unshare,
)
from ._proc import ProcResult, run_process, scrubbed_env, set_pdeathsig, set_rlimits

if TYPE_CHECKING:
    from ...config import ToolsSettings

log = logging.getLogger("prismd")

# --- the sandbox user ---------------------------------------------------------------------------

SANDBOX_USER = "prismd-sandbox"
FALLBACK_UID = 65534  # nobody


@dataclass(frozen=True, slots=True)
class SandboxUser:
    uid: int
    gid: int
    name: str


def sandbox_user() -> SandboxUser:
    """The account sandboxed runs use when prismd is root: `prismd-sandbox` (create it with
    `useradd --system --no-create-home --shell /usr/sbin/nologin prismd-sandbox`), else
    `nobody`, else uid/gid 65534."""
    for name in (SANDBOX_USER, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return SandboxUser(entry.pw_uid, entry.pw_gid, name)
    return SandboxUser(FALLBACK_UID, FALLBACK_UID, str(FALLBACK_UID))


# --- probing ------------------------------------------------------------------------------------

_lock = threading.Lock()
_probed: dict[str, Any] | None = None
MARKER_ENV = "PRISMD_SANDBOX_OWNER"  # in the environment of what a server starts (see sweep)


def _probe_child(preexec: Callable[[], None], code: str = "pass") -> bool:
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code],
            preexec_fn=preexec,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and b"ok" in result.stdout


_NET_CHECK = (
    "import socket\n"
    "names = [n for _, n in socket.if_nameindex()]\n"
    "assert names == ['lo'], names\n"
    "print('ok')\n"
)

# What the bubblewrap probe checks from inside: its uid, that host paths are gone, that it has
# no network interface but loopback and that it is in a PID namespace of its own.
_BWRAP_CHECK = (
    "import json, os, socket\n"
    "print(json.dumps({'uid': os.getuid(), 'pid': os.getpid(),\n"
    "    'host_paths': [p for p in ('/run', '/var', '/home', '/root/.bashrc', '/srv')\n"
    "                   if os.path.lexists(p)],\n"
    "    'ifaces': [n for _, n in socket.if_nameindex()],\n"
    "    'tmp': os.listdir('/tmp'), 'tmp_writable': os.access('/tmp', os.W_OK),\n"
    "    'userns': __import__('ctypes').CDLL(None).unshare(0x10000000) == 0}))\n"
)


def _bwrap_features(bwrap: str) -> tuple[str, set[str]]:
    try:
        version = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "", set()
    flags = {"--size", "--perms", "--disable-userns", "--unsetenv", "--die-with-parent"}
    return version, {f for f in flags if f in usage.stdout + usage.stderr}


def _probe_bwrap(p: dict[str, Any]) -> None:
    """Fill in the bubblewrap findings of the probe `p` (and whether a cgroup can be joined)."""
    p.update(bwrap=None, bwrap_error=None, bwrap_version=None, bwrap_features=[])
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        p["bwrap_error"] = "bubblewrap (bwrap) is not installed"
        return
    version, features = _bwrap_features(bwrap)
    p["bwrap_version"] = version
    p["bwrap_features"] = sorted(features)
    if not {"--die-with-parent", "--perms", "--unsetenv"} <= features:
        p["bwrap_error"] = f"{version or 'bwrap'} is too old (needs --perms and --unsetenv)"
        return
    if p["privileged"] and p["setpriv"] is None:
        p["bwrap_error"] = "setpriv (util-linux) is not installed: cannot drop to the sandbox uid"
        return
    candidate = {**p, "bwrap": bwrap}
    expected_uid = p["user"]["uid"] if p["privileged"] else os.geteuid()

    def attempt(without: dict[str, Any]) -> tuple[bool, str]:
        spec = RunSpec(
            [sys.executable, "-I", "-S", "-c", _BWRAP_CHECK],
            memory_mb=256,
            max_processes=16,
        )
        plan = _Plan.build({**candidate, **without}, spec)
        try:
            result = subprocess.run(
                plan.argv,
                preexec_fn=plan.preexec,
                pass_fds=plan.pass_fds,
                env=plan.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return False, str(exc)
        finally:
            plan.cleanup_sync()
        out = result.stdout.decode(errors="replace").strip()
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            return False, err[-300:] or f"exit code {result.returncode}"
        try:
            seen = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            return False, f"unexpected output: {out[-200:]!r}"
        problems = []
        if seen["uid"] != expected_uid:
            problems.append(f"runs as uid {seen['uid']}, not {expected_uid}")
        if seen["host_paths"]:
            problems.append(f"host paths visible: {seen['host_paths']}")
        if seen["ifaces"] != ["lo"]:
            problems.append(f"network interfaces: {seen['ifaces']}")
        if seen["pid"] > 3:
            problems.append("no PID namespace")
        if not seen["tmp_writable"] or seen["tmp"]:
            problems.append("/tmp is not an empty writable directory")
        if seen["userns"] and {**candidate, **without}["seccomp"] is not None:
            problems.append("the seccomp filter let a user namespace be created")
        return not problems, "; ".join(problems)

    ok, why = attempt({})
    # What the run works without, when it does not work with everything.
    for optional, error_key in (("seccomp", "seccomp_info"), ("cgroup", "cgroup_error")):
        if ok or p[optional] is None:
            continue
        ok, why_without = attempt({optional: None})
        if ok:
            p[error_key] = f"not usable with bubblewrap here: {why}"
            p[optional] = None
        why = why_without
    if ok:
        p["bwrap"] = bwrap
    else:
        p["bwrap_error"] = f"bubblewrap does not work here: {why}"


def _probe() -> dict[str, Any]:
    p: dict[str, Any] = {}
    netns_flags = 0
    if sys.platform.startswith("linux"):
        for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
            if _probe_child(lambda f=flags: unshare(f), _NET_CHECK):  # type: ignore[misc]
                netns_flags = flags
                break
    abi = landlock_abi()
    landlock_ok = False
    if abi >= 1:
        with tempfile.TemporaryDirectory(prefix="prismd-probe-") as tmp:
            plan = LandlockPlan(abi, [tmp], python_read_roots(), deny_tcp=True)
            outside = os.path.join(os.path.dirname(tmp), os.path.basename(tmp) + "-outside")
            check = (
                f"open({os.path.join(tmp, 'x')!r}, 'w').write('x')\n"
                "try:\n"
                f"    open({outside!r}, 'w')\n"
                "except PermissionError:\n"
                "    print('ok')\n"
            )
            landlock_ok = _probe_child(plan.apply, check)
            if os.path.exists(outside):  # the probe wrote outside: Landlock is not working
                os.unlink(outside)
                landlock_ok = False
    # Whether RLIMIT_NPROC binds (root, CAP_SYS_ADMIN or CAP_SYS_RESOURCE are exempt).
    nproc_check = (
        "import os\n"
        "try:\n"
        "    pid = os.fork()\n"
        "except OSError:\n"
        "    print('ok')\n"
        "else:\n"
        "    if pid == 0:\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
    )
    nproc_ok = _probe_child(lambda: set_rlimits([(resource.RLIMIT_NPROC, 1)]), nproc_check)
    layout, cgroup_why = _cgroup.detect()
    if layout is not None:
        try:  # a group can be made and limited (and removed)
            group = _cgroup.RunGroup.create(layout, 64 << 20, 8)
            group.close_fds()
            group.remove()
        except OSError as exc:
            layout, cgroup_why = None, f"creating a cgroup failed: {exc}"
    user = sandbox_user()
    program, seccomp_info = _seccomp.compile_filter()
    p.update(
        seccomp=program,
        seccomp_info=seccomp_info,
        netns_flags=netns_flags,
        landlock_abi=abi,
        landlock=landlock_ok,
        nproc_enforced=nproc_ok,
        privileged=os.geteuid() == 0,
        setpriv=shutil.which("setpriv"),
        user={"uid": user.uid, "gid": user.gid, "name": user.name},
        cgroup=layout,
        cgroup_info=cgroup_why,
        cgroup_error=None if layout is not None else cgroup_why,
    )
    _probe_bwrap(p)
    return p


def probe() -> dict[str, Any]:
    """The probe's findings (computed once per process; blocking: call it off the event loop)."""
    global _probed
    with _lock:
        if _probed is None:
            _probed = _probe()
        return _probed


def reset_probe_for_tests() -> None:
    global _probed
    with _lock:
        _probed = None


# --- what is in force ---------------------------------------------------------------------------


def untrusted_missing(p: dict[str, Any]) -> list[str]:
    """What is missing for running the code of someone who is not trusted (empty: nothing)."""
    missing = []
    if p["bwrap"] is None:
        missing.append(f"a mount/PID namespace sandbox ({p['bwrap_error']})")
    if not p["privileged"]:
        missing.append("a uid of its own (prismd is not root, so runs keep prismd's uid)")
    elif p["user"]["uid"] == 0:
        missing.append("a uid of its own (the sandbox user is root)")
    if p["cgroup"] is None:
        missing.append(f"a bound on the whole process tree ({p['cgroup_error']})")
    return missing


def isolation(settings: ToolsSettings | bool | None = None) -> dict[str, Any]:
    """What isolation `code_exec` and `shell` get on this machine (`GET /api/tools`).

    `settings`: the tools settings (`tools.code_exec.network`, `tools.shell.network`,
    `tools.shell.sandbox`); a bool is `tools.code_exec.network` alone."""
    if isinstance(settings, bool) or settings is None:
        code_network, shell_network, shell_mode = bool(settings), False, "untrusted"
    else:
        code_network = settings.code_exec.network
        shell_network, shell_mode = settings.shell.network, settings.shell.sandbox
    p = probe()
    bwrap = p["bwrap"] is not None
    missing = untrusted_missing(p)
    cgroup: _cgroup.Layout | None = p["cgroup"]
    uid = p["user"]["uid"] if bwrap and p["privileged"] else os.geteuid()
    landlock = bool(p["landlock"]) and not bwrap  # applied only without bubblewrap
    netns = (bwrap or bool(p["netns_flags"])) and not code_network
    abi = int(p["landlock_abi"])
    limits = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CORE=0"]
    if cgroup is None:
        limits.append("RLIMIT_NPROC")
    body: dict[str, Any] = {
        "mechanism": "bubblewrap" if bwrap else "rlimits+network namespace+landlock",
        "untrusted_ok": not missing,
        "untrusted_missing": missing,
        "bubblewrap": p["bwrap_version"] if bwrap else None,
        "bubblewrap_error": p["bwrap_error"],
        "mount_namespace": bwrap,
        "filesystem": (
            "own mount namespace: system directories and Python read-only, the workspace at "
            "/workspace (read-only for code_exec), an empty tmpfs /tmp; no host /run, /var, "
            "/tmp, /home, data directory or other workspaces"
            if bwrap
            else "Landlock: reads system directories, Python, the workspace; writes only the "
            "run's temporary directory"
            if landlock
            else "NOT confined (no bubblewrap, no Landlock)"
        ),
        "pid_namespace": bwrap,
        "seccomp": bwrap and p["seccomp"] is not None,
        "seccomp_filter": (
            "denies creating user namespaces, io_uring, bpf, perf_event_open, userfaultfd, the "
            "keyring, modules, kexec, mount (" + p["seccomp_info"] + ")"
            if bwrap and p["seccomp"] is not None
            else p["seccomp_info"]
        ),
        "runs_as_uid": uid,
        "runs_as_user": p["user"]["name"] if bwrap and p["privileged"] else None,
        "separate_uid": uid != os.geteuid(),
        "cgroup": (
            {"version": cgroup.version, "memory": True, "pids": True}
            if cgroup is not None
            else {"error": p["cgroup_error"]}
        ),
        "process_tree_bounded": cgroup is not None,
        "killed_on_server_death": True,  # PR_SET_PDEATHSIG (+ the PID namespace with bwrap)
        "leftover_sweep": "at server start: run cgroups and processes of servers that died",
        "network_namespace": netns,
        "network_namespace_method": (
            None
            if not netns
            else "bubblewrap --unshare-net"
            if bwrap
            else "unshare(CLONE_NEWNET)"
            if p["netns_flags"] == CLONE_NEWNET
            else "unshare(CLONE_NEWUSER|CLONE_NEWNET)"
        ),
        "network": "allowed by configuration"
        if code_network
        else ("cut (empty network namespace)" if netns else "NOT cut (no network namespace)"),
        "landlock": landlock,
        "landlock_abi": abi,
        "landlock_filesystem": (
            "writes only in the run's temporary directory; reads only system directories, "
            "Python's installation, the workspace (read-only) and that directory"
            if landlock
            else None
        ),
        "landlock_tcp_denied": landlock and abi >= 4 and not code_network,
        "landlock_scoped_signals_and_abstract_sockets": landlock and abi >= 6,
        "rlimits": limits,
        "rlimit_nproc_enforced": bool(p["nproc_enforced"]),
        "process_group_killed": True,
        "environment": "scrubbed (PATH, LANG, HOME, TMPDIR, TERM, WORKSPACE only)",
    }
    body["shell"] = {
        "sandbox": shell_mode,
        # Who gets the sandbox: callers who are not trusted always; everyone with "always".
        "sandboxed_for": "everyone" if shell_mode == "always" else "callers who are not trusted",
        "untrusted_ok": not missing,
        "network": "allowed by configuration"
        if shell_network
        else ("cut (empty network namespace)" if bwrap else "NOT cut"),
        "sandboxed": {
            "mount_namespace": bwrap,
            "workspace": "read-write at /workspace (the cwd and HOME)",
            "runs_as_uid": uid,
            "process_tree_bounded": cgroup is not None,
        },
        "host": {
            "network_namespace": False,
            "landlock": False,
            "rlimits": ["RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_CORE=0"],
            "rlimit_nproc_enforced": bool(p["nproc_enforced"]),
            "process_group_killed": True,
            "killed_on_server_death": "the shell itself (PR_SET_PDEATHSIG)",
            "environment": "scrubbed (PATH, LANG, HOME=workspace, TERM=dumb only)",
            "cwd": "the workspace",
            "runs_as_uid": os.geteuid(),
        },
        # Kept for clients of the earlier shape: the host shell's figures.
        "network_namespace": False,
        "landlock": False,
        "runs_as_uid": os.geteuid(),
    }
    return body


# --- a run --------------------------------------------------------------------------------------


class SandboxUnavailable(Exception):
    """The run needs the bubblewrap sandbox and this machine cannot provide it."""


def start_error(exc: BaseException) -> str:
    """Why a run could not start, for the model: an OSError's reason without its path (the
    server's paths stay out of tool results)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


@dataclass(slots=True)
class RunSpec:
    command: list[str]
    memory_mb: int
    max_processes: int
    workspace: Path | None = None
    workspace_writable: bool = False
    network: bool = False
    cwd: str = "run"  # "run" (the run's own empty directory) or "workspace"
    cpu_s: int | None = None
    file_bytes: int | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # put in the run's directory
    stdin_data: bytes | None = None


@dataclass(slots=True)
class RunResult:
    proc: ProcResult
    mechanism: str  # "bubblewrap" or "fallback"
    oom_kills: int = 0
    notes: list[str] = field(default_factory=list)


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
WORKSPACE_MOUNT = "/workspace"
RUN_DIR = "/tmp"


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _python_binds() -> list[str]:
    """Python's installation, without what the system directories already hold or what lies
    inside another of them."""
    roots = sorted(
        {os.path.realpath(r) for r in python_read_roots()} | set(python_read_roots()), key=len
    )
    chosen: list[str] = []
    for root in roots:
        if os.path.isdir(root) and not _inside(root, [*SYSTEM_DIRS, *chosen]):
            chosen.append(root)
    return chosen


def _bwrap_mounts(
    p: dict[str, Any], spec: RunSpec, files: list[tuple[int, str]], tmp_bytes: int
) -> list[str]:
    args = ["--proc", "/proc", "--dev", "/dev"]
    for tmpfs in ("/dev/shm", RUN_DIR):  # /dev/shm: POSIX semaphores (multiprocessing)
        if "--size" in p["bwrap_features"]:
            args += ["--size", str(tmp_bytes)]
        args += ["--perms", "1777", "--tmpfs", tmpfs]
    made = {"/", "/proc", "/dev", "/dev/shm", RUN_DIR}
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
        made.add(d)
    args += ["--perms", "0755", "--dir", "/etc"]
    made.add("/etc")
    for path in _ETC_READ:
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    for root in _python_binds():
        parts = root.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made and not _inside(parent, SYSTEM_DIRS):
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", root, root]
    if spec.workspace is not None:
        flag = "--bind" if spec.workspace_writable else "--ro-bind"
        args += [flag, str(spec.workspace), WORKSPACE_MOUNT]
    for fd, name in files:
        args += ["--perms", "0644", "--file", str(fd), f"{RUN_DIR}/{name}"]
    return args


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding `data`, read from its start (for bwrap's --file/--seccomp)."""
    fd = os.memfd_create(f"prismd-{name}", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _Plan:
    """Everything to start one run: argv, environment, the child's setup, the fds it inherits,
    its cgroup; and the cleanup afterwards."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.cwd = "/"
        self.pass_fds: tuple[int, ...] = ()
        self.group: _cgroup.RunGroup | None = None
        self.tmp: str | None = None  # the fallback's run directory on the host
        self.notes: list[str] = []
        self.limits: list[tuple[int, ...]] = []
        self.before_limits: Callable[[], None] | None = None
        self.parent = os.getpid()

    def preexec(self) -> None:
        """In the child, before exec: join the cgroup, die with the server, the fallback's
        namespaces and Landlock, then the rlimits (last: RLIMIT_AS may be below the size of the
        forked server)."""
        if self.group is not None:
            self.group.join()
        set_pdeathsig(self.parent)
        if self.before_limits is not None:
            self.before_limits()
        set_rlimits(self.limits)

    @classmethod
    def build(cls, p: dict[str, Any], spec: RunSpec, fallback_ok: bool = False) -> _Plan:
        plan = cls()
        memory = spec.memory_mb * 1024 * 1024
        layout: _cgroup.Layout | None = p["cgroup"]
        plan.limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, memory)]
        if spec.cpu_s is not None:
            # SIGXCPU at the soft limit (it ends Python), SIGKILL a second later.
            plan.limits.append((resource.RLIMIT_CPU, spec.cpu_s, spec.cpu_s + 1))
        if spec.file_bytes is not None:
            plan.limits.append((resource.RLIMIT_FSIZE, spec.file_bytes))
        if layout is None:
            plan.limits.append((resource.RLIMIT_NPROC, spec.max_processes))
        try:
            if layout is not None:
                _retry_pending_groups()
                plan.group = _cgroup.RunGroup.create(layout, memory, spec.max_processes)
            if p["bwrap"] is not None:
                plan._build_bwrap(p, spec, memory)
            elif fallback_ok:
                plan._build_fallback(p, spec)
            else:
                raise SandboxUnavailable(p["bwrap_error"])
        except BaseException:
            plan.cleanup_sync()
            raise
        return plan

    def _build_bwrap(self, p: dict[str, Any], spec: RunSpec, memory: int) -> None:
        fds = [(_memfd(name, data), name) for name, data in spec.files.items()]
        self.pass_fds = tuple(fd for fd, _ in fds)
        seccomp: list[str] = []
        if p["seccomp"] is not None:
            fd = _memfd("seccomp", p["seccomp"])
            self.pass_fds += (fd,)
            seccomp = ["--seccomp", str(fd)]
        cwd = WORKSPACE_MOUNT if spec.cwd == "workspace" else RUN_DIR
        extra = {"TMPDIR": RUN_DIR}
        if spec.workspace is not None:
            extra["WORKSPACE"] = WORKSPACE_MOUNT
        self.env = scrubbed_env(cwd, **extra, **{MARKER_ENV: _cgroup.owner_id()})
        argv = [p["bwrap"], "--unshare-ipc", "--unshare-pid", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--hostname", "sandbox"]
        if not spec.network:
            argv.append("--unshare-net")
        argv += ["--die-with-parent", "--new-session", "--unsetenv", MARKER_ENV, *seccomp]
        argv += _bwrap_mounts(p, spec, fds, memory)
        argv += ["--chdir", cwd]
        if p["privileged"]:
            user = p["user"]
            argv += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH"):
                argv += ["--cap-add", cap]
            argv += [
                p["setpriv"],
                f"--reuid={user['uid']}",
                f"--regid={user['gid']}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ]
        else:
            argv += ["--unshare-user", "--cap-drop", "ALL"]
            if "--disable-userns" in p["bwrap_features"]:
                argv.append("--disable-userns")
        self.argv = argv + spec.command

    def _build_fallback(self, p: dict[str, Any], spec: RunSpec) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"{FALLBACK_PREFIX}{_cgroup.owner_id()}-")
        for name, data in spec.files.items():
            with open(os.path.join(self.tmp, name), "wb") as f:
                f.write(data)
        workspace = str(spec.workspace) if spec.workspace is not None else None
        cwd = workspace if spec.cwd == "workspace" and workspace else self.tmp
        extra = {"TMPDIR": self.tmp}
        if workspace is not None:
            extra["WORKSPACE"] = workspace
        self.env = scrubbed_env(cwd, **extra, **{MARKER_ENV: _cgroup.owner_id()})
        self.cwd = cwd
        self.argv = list(spec.command)
        netns = p["netns_flags"] if not spec.network else 0
        landlock = None
        if p["landlock"]:
            writable = [self.tmp] + ([workspace] if workspace and spec.workspace_writable else [])
            readable = python_read_roots() + ([workspace] if workspace else [])
            landlock = LandlockPlan(
                p["landlock_abi"], writable, readable, deny_tcp=not spec.network
            )
        if not spec.network and not netns:
            self.notes.append(
                "warning: this machine cannot cut the network for this run (no network "
                "namespace); the code can reach the network"
                + (" except by TCP (Landlock)" if landlock and p["landlock_abi"] >= 4 else "")
            )
        if landlock is None:
            self.notes.append("note: no Landlock on this machine; file access is not confined")

        def setup() -> None:
            if netns:
                unshare(netns)
            if landlock is not None:
                landlock.apply()

        self.before_limits = setup

    def spawned(self) -> None:
        """The child has started (it joined the cgroup before exec): the parent's fds can go."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()
        if self.group is not None:
            self.group.close_fds()

    def cleanup_sync(self) -> None:
        """`cleanup`, blocking (a probe's run, outside the event loop)."""
        self.spawned()
        group, self.group = self.group, None
        if group is not None:
            for _ in _removal(group):
                time.sleep(REMOVE_RETRY_S)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    async def cleanup(self) -> None:
        """Kill what is left in the cgroup and remove it (processes of a killed PID namespace
        take a moment to go), and the fallback's run directory."""
        self.spawned()
        group, self.group = self.group, None
        if group is not None:
            for _ in _removal(group):
                await asyncio.sleep(REMOVE_RETRY_S)
        if self.tmp is not None:
            tmp, self.tmp = self.tmp, None
            await asyncio.to_thread(shutil.rmtree, tmp, True)


_pending_groups: list[_cgroup.RunGroup] = []  # groups that could not be removed at once
REMOVE_RETRY_S = 0.01  # between two tries to remove a run's cgroup (at most 100 tries)


def _removal(group: _cgroup.RunGroup) -> Iterator[None]:
    """Kill what is left in `group` and remove it, trying again (the caller waits
    REMOVE_RETRY_S at each yield) while killed processes are still going; a group still there
    after 100 tries is left for `_retry_pending_groups`."""
    for _ in range(100):
        group.kill()
        if group.remove():
            return
        yield
    _pending_groups.append(group)


def _retry_pending_groups() -> None:
    for group in list(_pending_groups):
        group.kill()
        if group.remove():
            _pending_groups.remove(group)


FALLBACK_PREFIX = "prismd-run-"


async def run(
    spec: RunSpec,
    *,
    timeout_s: float,
    max_output_bytes: int,
    fallback_ok: bool = False,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Run `spec.command` in the sandbox; output and status as `run_process` gives them.

    Without bubblewrap: the fallback when `fallback_ok`, else SandboxUnavailable. Exit statuses
    of bubblewrap runs above 128 are reported as the signal that ended the command (bwrap
    reports a signal n as 128 + n, as a shell does)."""
    p = _probed if _probed is not None else await asyncio.to_thread(probe)
    if spec.workspace is not None and not _workspace_ready(p, spec.workspace):
        await asyncio.to_thread(prepare_workspace, spec.workspace)
    plan = _Plan.build(p, spec, fallback_ok)
    mechanism = "bubblewrap" if p["bwrap"] is not None else "fallback"

    def started(pid: int) -> None:
        plan.spawned()
        if on_start is not None:
            on_start(pid)

    try:
        result = await run_process(
            plan.argv,
            cwd=plan.cwd,
            env=plan.env,
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
            preexec_fn=plan.preexec,
            pass_fds=plan.pass_fds,
            stdin_data=spec.stdin_data,
            on_start=started,
        )
        oom = plan.group.oom_kills() if plan.group is not None else 0
    finally:
        await plan.cleanup()
    rc = result.returncode
    if mechanism == "bubblewrap" and rc is not None and 128 < rc < 128 + 65:
        result.returncode = -(rc - 128)
    return RunResult(result, mechanism, oom, plan.notes)


# --- workspaces and leftovers -------------------------------------------------------------------


def _workspace_ready(p: dict[str, Any], workspace: Path) -> bool:
    """Whether `prepare_workspace` has nothing to do (one stat)."""
    if not p["privileged"] or p["bwrap"] is None:
        return True
    try:
        return os.stat(workspace).st_uid == p["user"]["uid"]
    except OSError:
        return False


def prepare_workspace(workspace: Path) -> None:
    """Give a workspace to the sandbox user before a run (prismd as root), so that it can read
    it, and write in it when the run may:
    every entry, walked without following a symlink, becomes the sandbox user's. Done once per
    workspace (its root is the last to change owner); afterwards the file tools keep what they
    create owned by the owner of its directory. Blocking."""
    p = probe()
    if _workspace_ready(p, workspace):
        return
    uid, gid = p["user"]["uid"], p["user"]["gid"]
    root = str(workspace)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    os.chown(root, uid, gid, follow_symlinks=False)


_swept = False


def sweep_leftovers() -> dict[str, int]:
    """Remove what servers that are no longer running left behind: their run cgroups (killing
    what is still in them), processes marked with their id (a sandbox whose parent-death signal
    was missed) and the fallback's run directories. Called once per process, at server start
    (Prismd.start, in a thread). Blocking (milliseconds)."""
    global _swept
    if _swept:
        return {}
    _swept = True
    counts = {"cgroups": 0, "processes": 0, "directories": 0}
    layout, _why = _cgroup.detect()
    if layout is not None:
        counts["cgroups"] = len(_cgroup.sweep(layout))
    prefix = f"{MARKER_ENV}=".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(prefix):
                owner = entry[len(prefix) :].decode(errors="replace")
                if not _cgroup.owner_alive(owner):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(name), signal.SIGKILL)
                        counts["processes"] += 1
                break
    with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
        for item in entries:
            if item.name.startswith(FALLBACK_PREFIX) and item.is_dir(follow_symlinks=False):
                owner = item.name[len(FALLBACK_PREFIX) :].rsplit("-", 1)[0]
                if not _cgroup.owner_alive(owner):
                    shutil.rmtree(item.path, ignore_errors=True)
                    counts["directories"] += 1
    if any(counts.values()):
        log.warning("removed what a server that died left behind: %s", counts)
    return counts
