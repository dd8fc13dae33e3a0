"""`code_exec`: Python code run in a separate, limited process without network access.

The child runs `python -I -B main.py` in a fresh temporary directory (deleted afterwards), with:
RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC and RLIMIT_CORE=0; a wall-clock timeout; its
own session and process group, killed as a whole; a scrubbed environment; a new empty network
namespace and Landlock rules where the machine allows them (see sandbox.py and `isolation()`).
An uncaught exception is not a tool error: its traceback is in the output, with exit code 1
(as `shell` reports a failing command). A limit that stops the code is a tool error.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec
from . import sandbox
from ._proc import run_process, scrubbed_env, set_rlimits
from .shell import _fmt_seconds, _timeout_arg

MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE: no file written larger than this
MAX_PROCESSES = 64
MAX_CODE_CHARS = 200_000


class CodeExec(Tool):
    spec = ToolSpec(
        name="code_exec",
        description=(
            "Run a Python 3 program in a sandboxed process and return its exit code and output "
            "(stdout and stderr interleaved; print what you want to see). Each run starts fresh "
            "in an empty temporary directory that is deleted afterwards; nothing persists "
            "between runs. There is no network access and no input. The standard library and "
            "the server's installed packages are available. An uncaught exception shows its "
            "traceback in the output with exit code 1. CPU time, memory and wall time are "
            "limited."
        ),
        parameters={
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "The Python source to run."},
                "timeout_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Wall-clock seconds before the run is killed (capped by the "
                    "server's limit).",
                },
            },
            "required": ["code"],
            "additionalProperties": False,
        },
    )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        code = args.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError("code must be a non-empty string")
        if len(code) > MAX_CODE_CHARS:
            raise ToolError(f"code is longer than {MAX_CODE_CHARS} characters")
        settings = ctx.settings.code_exec
        timeout = _timeout_arg(args, settings.timeout_s)
        iso = await asyncio.to_thread(sandbox.isolation, settings.network)
        probe = sandbox.probe()
        notes: list[str] = []
        if not settings.network and not iso["network_namespace"]:
            notes.append(
                "warning: this machine cannot cut the network for code_exec (no network "
                "namespace); the code can reach the network"
                + (" except by TCP (Landlock)" if iso["landlock_tcp_denied"] else "")
            )
        if not iso["landlock"]:
            notes.append("note: no Landlock on this machine; file access is not confined")

        tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="prismd-code-")
        try:
            main = os.path.join(tmp, "main.py")
            await asyncio.to_thread(_write_text, main, code)
            landlock = (
                sandbox.LandlockPlan(
                    probe["landlock_abi"],
                    writable=[tmp],
                    readable=[*sandbox.python_read_roots(), str(ctx.workspace)],
                    deny_tcp=not settings.network,
                )
                if iso["landlock"]
                else None
            )
            netns_flags = probe["netns_flags"] if iso["network_namespace"] else 0
            limits = [
                (resource.RLIMIT_CORE, 0),
                (resource.RLIMIT_NPROC, MAX_PROCESSES),
                (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
                # SIGXCPU at the soft limit (it ends Python), SIGKILL a second later.
                (resource.RLIMIT_CPU, settings.cpu_s, settings.cpu_s + 1),
                (resource.RLIMIT_AS, settings.memory_mb * 1024 * 1024),
            ]

            def preexec() -> None:
                if netns_flags:
                    sandbox.unshare(netns_flags)
                if landlock is not None:
                    landlock.apply()
                set_rlimits(limits)  # last: RLIMIT_AS may be below the forked server's size

            try:
                result = await run_process(
                    [sys.executable, "-I", "-B", main],
                    cwd=tmp,
                    env=scrubbed_env(tmp, TMPDIR=tmp),
                    timeout_s=timeout,
                    max_output_bytes=settings.max_output_bytes,
                    preexec_fn=preexec,
                    on_start=ctx.extra.get("on_process_start"),
                )
            except (OSError, subprocess.SubprocessError) as exc:  # e.g. preexec_fn failed
                raise ToolError(f"could not start the sandboxed process: {exc}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

        output = result.output
        header = "\n".join(notes)
        if result.timed_out:
            raise ToolError(_join(f"time limit: killed after {_fmt_seconds(timeout)}", output))
        rc = result.returncode
        if rc == -signal.SIGXCPU:
            raise ToolError(_join(f"CPU time limit ({settings.cpu_s} s) exceeded", output))
        tail = output[-2000:]
        if rc != 0 and "MemoryError" in tail:
            raise ToolError(
                _join(f"memory limit ({settings.memory_mb} MB) reached (MemoryError)", output)
            )
        return _join(header, f"{result.status_line()}\n{output}".rstrip())


def _join(first: str, rest: str) -> str:
    return f"{first}\n{rest}".strip() if first else rest


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
