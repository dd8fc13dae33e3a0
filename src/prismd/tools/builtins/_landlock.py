"""Landlock (Linux 5.13+) for the fallback sandbox (sandbox.py, when bubblewrap is missing), and
unshare() of a network namespace.

The child may write only in its temporary directory and read only system directories, Python's
installation, the workspace and that directory; with ABI 4+ TCP bind/connect are denied too (a
second layer when the network is cut), with ABI 6+ signals to processes outside the sandbox and
abstract UNIX sockets are denied. Rules are computed in the parent; `LandlockPlan.apply()` runs
in the child (preexec_fn), with only syscalls and small allocations after the fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import site
import sys
from collections.abc import Sequence
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every arch.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE


def _fs_write(abi: int) -> int:
    rights = (
        FS_WRITE_FILE
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM
    )
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or is not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = _load_libc()
        abi = libc.syscall(
            SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
        )  # fmt: skip
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


# Read-only roots: the system and Python's installation. /etc is read only through the files a
# program commonly needs (not /etc/shadow and the like); /proc is left out (other processes'
# environments hold secrets), except the child's own /proc/<pid>.
_READ_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/opt")
_ETC_READ = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/pki",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/alternatives",
    "/etc/fonts",
    "/etc/matplotlibrc",
)
_DEV_RW = ("/dev/null", "/dev/zero", "/dev/full")
_DEV_READ = ("/dev/urandom", "/dev/random")


def python_read_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = os.path.realpath(sys.executable)
    roots.add(os.path.dirname(os.path.dirname(exe)))
    with contextlib.suppress(AttributeError):
        roots.update(site.getsitepackages())
    return sorted(r for r in roots if r and r != "/")


class LandlockPlan:
    """Rules computed in the parent; `apply()` runs in the child (preexec_fn), with only
    syscalls and small allocations after the fork."""

    def __init__(
        self,
        abi: int,
        writable: Sequence[str],
        readable: Sequence[str],
        deny_tcp: bool,
    ) -> None:
        self.abi = abi
        write = _fs_write(abi)
        self.handled_fs = write | FS_READ
        self.deny_tcp = deny_tcp and abi >= 4
        self.scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
        rules: list[tuple[str, int]] = []
        for path in writable:
            rules.append((path, write | FS_READ))
        for path in readable:
            rules.append((path, FS_READ))
        for path in _READ_ROOTS + _ETC_READ + _DEV_READ:
            rules.append((path, FS_READ))
        for path in _DEV_RW:
            rules.append((path, FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)))
        self.rules = [(p, a) for p, a in rules if os.path.exists(p)]
        self.attr_size = 8 if abi < 4 else (16 if abi < 6 else 24)
        self.attr = _RulesetAttr(
            self.handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if self.deny_tcp else 0, self.scoped
        )
        self.libc = _load_libc()

    def apply(self) -> None:
        libc = self.libc
        ruleset = libc.syscall(
            SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(self.attr),
            ctypes.c_size_t(self.attr_size), ctypes.c_uint32(0),
        )  # fmt: skip
        if ruleset < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
        try:
            for path, access in self.rules:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    if not os.path.isdir(path):
                        access &= FS_FILE_ONLY
                    beneath = _PathBeneathAttr(access & self.handled_fs, fd)
                    rc = libc.syscall(
                        SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                        ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(beneath),
                        ctypes.c_uint32(0),
                    )  # fmt: skip
                    if rc < 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
                finally:
                    os.close(fd)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
            rc = libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
            if rc < 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
        finally:
            os.close(ruleset)


def unshare(flags: int) -> None:
    libc = _load_libc()
    if libc.unshare(ctypes.c_int(flags)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare failed: {os.strerror(errno)}")
