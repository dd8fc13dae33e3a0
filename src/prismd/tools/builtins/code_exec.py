"""`code_exec`: Python code run in the sandbox (sandbox.py), for every caller.

The program is `/tmp/main.py` in the run's own empty directory (a tmpfs, gone afterwards), run
with `python -I -B`; the workspace is readable at /workspace. Limits: CPU time, memory (the whole
process tree where a cgroup is available, and each process's address space), file size, process
count, a wall-clock timeout; everything it started is killed when it ends, times out, is stopped
or the server dies. Without bubblewrap (see `isolation()`) it runs in the fallback sandbox, and
only for trusted callers.

An uncaught exception is not a tool error: its traceback is in the output, with exit code 1
(as `shell` reports a failing command). A limit that stops the code is a tool error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec
from . import sandbox
from .shell import _fmt_seconds, _timeout_arg, refuse_untrusted

MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE: no file written larger than this
MAX_PROCESSES = 64
MAX_CODE_CHARS = 200_000


class CodeExec(Tool):
    spec = ToolSpec(
        name="code_exec",
        description=(
            "Run a Python 3 program in a sandboxed process and return its exit code and output "
            "(stdout and stderr interleaved; print what you want to see). Each run starts fresh "
            "in an empty temporary directory (the current directory) that is deleted "
            "afterwards; nothing persists between runs. The workspace's files can be read, not "
            "written, under /workspace (its path is also in $WORKSPACE). There is no network "
            "access and no input. The standard library and the server's installed packages are "
            "available. An uncaught exception shows its traceback in the output with exit code "
            "1. CPU time, memory and wall time are limited."
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
        if not ctx.trusted:
            await refuse_untrusted("code_exec")
        spec = sandbox.RunSpec(
            [sys.executable, "-I", "-B", "main.py"],
            memory_mb=settings.memory_mb,
            max_processes=MAX_PROCESSES,
            workspace=ctx.workspace,
            network=settings.network,
            cpu_s=settings.cpu_s,
            file_bytes=MAX_FILE_BYTES,
            files={"main.py": code.encode("utf-8", "surrogatepass")},
        )
        try:
            run = await sandbox.run(
                spec,
                timeout_s=timeout,
                max_output_bytes=settings.max_output_bytes,
                fallback_ok=ctx.trusted,
                on_start=ctx.extra.get("on_process_start"),
            )
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. the child's setup failed
            why = sandbox.start_error(exc)
            raise ToolError(f"could not start the sandboxed process: {why}") from None
        result = run.proc
        output = result.output
        header = "\n".join(run.notes)
        if result.timed_out:
            raise ToolError(_join(f"time limit: killed after {_fmt_seconds(timeout)}", output))
        rc = result.returncode
        if rc == -signal.SIGXCPU:
            raise ToolError(_join(f"CPU time limit ({settings.cpu_s} s) exceeded", output))
        memory = f"memory limit ({settings.memory_mb} MB)"
        if rc != 0 and "MemoryError" in output[-2000:]:
            raise ToolError(_join(f"{memory} reached (MemoryError)", output))
        if run.oom_kills and rc == -signal.SIGKILL:
            raise ToolError(_join(f"{memory} of the whole run reached: killed", output))
        if run.oom_kills:
            header = _join(
                header,
                f"note: {memory} of the whole run reached: the kernel killed "
                f"{run.oom_kills} of its processes",
            )
        return _join(header, f"{result.status_line()}\n{output}".rstrip())


def _join(first: str, rest: str) -> str:
    return f"{first}\n{rest}".strip() if first else rest
