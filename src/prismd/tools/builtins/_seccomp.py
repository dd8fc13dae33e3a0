"""A seccomp filter for the bubblewrap sandbox, compiled once with libseccomp (through ctypes)
and handed to bwrap (`--seccomp FD`), which installs it right before the command starts.

Everything is allowed except what a sandboxed run has no use for and what kernel exploits
favour: creating user namespaces (`unshare`/`clone` with CLONE_NEWUSER; `clone3`, whose flags a
filter cannot read, answers ENOSYS so that the C library falls back to `clone`), io_uring,
bpf, perf_event_open, userfaultfd, the kernel keyring, module loading, kexec, mount and the new
mount API, handle-based opens. Denied calls fail with EPERM (ENOSYS for `clone3`); system calls
of another ABI (32-bit calls on x86_64) kill the process (libseccomp's default). Without
libseccomp (`libseccomp2`, a dependency of systemd and util-linux on Debian) there is no filter,
and `isolation()` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
CLONE_NEWUSER = 0x10000000


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


DENIED = (
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
)


def compile_filter() -> tuple[bytes | None, str]:
    """The filter as a BPF program for bwrap, or None and why there is none."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None, "libseccomp is not installed"
    try:
        lib: Any = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return None, f"libseccomp cannot be loaded: {exc}"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return None, "seccomp_init failed"
    try:

        def rule(syscall: str, action: int, *cmps: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr < 0:  # not a system call of this architecture
                return
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add({syscall}) failed")

        eperm = _errno_action(errno.EPERM)
        for syscall in DENIED:
            rule(syscall, eperm)
        new_user = _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
        rule("unshare", eperm, new_user)
        rule("clone", eperm, new_user)  # flags are the first argument on x86_64 and arm64
        rule("clone3", _errno_action(errno.ENOSYS))
        fd = os.memfd_create("prismd-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, "seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            program = b""
            while chunk := os.read(fd, 65536):
                program += chunk
        finally:
            os.close(fd)
    except OSError as exc:
        return None, str(exc)
    finally:
        lib.seccomp_release(ctx)
    return program, f"{len(program) // 8} BPF instructions"
