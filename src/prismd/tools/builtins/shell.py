"""`shell`: a command run with /bin/sh in the workspace, limited and killed as a whole.

Where it runs depends on who asks (`ToolContext.trusted`) and `tools.shell.sandbox`:

- a caller who is not trusted (a non-admin user of a server with users) always gets the sandbox
  (sandbox.py): the workspace read-write at /workspace, the system read-only, a uid of its own,
  the whole process tree bounded and killed, no network unless `tools.shell.network`. When this
  machine cannot provide that isolation (`untrusted_ok` false) the call is refused;
- a trusted caller (an admin, or the open mode's one local owner) gets the host shell in the
  workspace, as prismd's user, with a scrubbed environment, rlimits and a kill of its session;
  or the sandbox too with `tools.shell.sandbox = "always"` (refused when there is none).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec
from . import sandbox
from ._proc import ProcResult, run_process, scrubbed_env, set_pdeathsig, set_rlimits


def _timeout_arg(args: dict[str, Any], cap: float) -> float:
    value = args.get("timeout_s")
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ToolError("timeout_s must be a positive number")
    return min(float(value), cap)


def _fmt_seconds(value: float) -> str:
    return f"{value:g} s"


async def refuse_untrusted(tool: str) -> None:
    """A ToolError unless this machine can isolate the code of a caller who is not trusted."""
    p = await asyncio.to_thread(sandbox.probe)
    missing = sandbox.untrusted_missing(p)
    if missing:
        raise ToolError(
            f"{tool} is not available to you on this server: it cannot be isolated from the "
            f"host here (missing: {'; '.join(missing)}). Ask an administrator."
        )


class Shell(Tool):
    spec = ToolSpec(
        name="shell",
        description=(
            "Run a shell command (/bin/sh -c) in the workspace directory and return its exit "
            "code and output (stdout and stderr interleaved; long output keeps its beginning and "
            "end). There is no terminal and no input: do not run interactive programs. The "
            "environment is minimal (PATH, LANG, HOME=workspace, TERM=dumb). Processes left "
            "running in the background are killed when the command ends; on timeout everything "
            "it started is killed."
        ),
        parameters={
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command line to run."},
                "timeout_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Seconds before the command is killed (capped by the "
                    "server's limit).",
                },
            },
            "required": ["command"],
            "additionalProperties": False,
        },
        needs_approval=True,
        host_level=True,
    )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> str:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("command must be a non-empty string")
        settings = ctx.settings.shell
        timeout = _timeout_arg(args, settings.timeout_s)
        on_start = ctx.extra.get("on_process_start")
        if ctx.trusted and settings.sandbox != "always":
            result = await self._host(command, ctx, timeout)
        else:
            if not ctx.trusted:
                await refuse_untrusted("shell")
            spec = sandbox.RunSpec(
                ["/bin/sh", "-c", command],
                memory_mb=settings.memory_mb,
                max_processes=settings.max_processes,
                workspace=ctx.workspace,
                workspace_writable=True,
                network=settings.network,
                cwd="workspace",
            )
            try:
                run = await sandbox.run(
                    spec,
                    timeout_s=timeout,
                    max_output_bytes=settings.max_output_bytes,
                    on_start=on_start,
                )
            except sandbox.SandboxUnavailable as exc:
                raise ToolError(
                    f'tools.shell.sandbox is "always" but this machine has no sandbox: {exc}'
                ) from None
            except (OSError, subprocess.SubprocessError) as exc:
                why = sandbox.start_error(exc)
                raise ToolError(f"could not start the sandboxed shell: {why}") from None
            result = run.proc
            if run.oom_kills:
                result.output = (
                    f"[memory limit ({settings.memory_mb} MB) of the whole command reached: the "
                    f"kernel killed {run.oom_kills} of its processes]\n{result.output}"
                )
        output = result.output
        if result.timed_out:
            raise ToolError(
                f"timed out after {_fmt_seconds(timeout)}; the command and every process it "
                f"started were killed\n{output}".rstrip()
            )
        return f"{result.status_line()}\n{output}".rstrip()

    @staticmethod
    async def _host(command: str, ctx: ToolContext, limit_s: float) -> ProcResult:
        settings = ctx.settings.shell
        memory = settings.memory_mb * 1024 * 1024
        limits = [
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, settings.max_processes),
            (resource.RLIMIT_AS, memory),  # last: the forked copy of the server may exceed it
        ]
        parent = os.getpid()

        def preexec() -> None:
            set_pdeathsig(parent)
            set_rlimits(limits)

        workspace = str(ctx.workspace)
        return await run_process(
            ["/bin/sh", "-c", command],
            cwd=workspace,
            env=scrubbed_env(workspace),
            timeout_s=limit_s,
            max_output_bytes=settings.max_output_bytes,
            preexec_fn=preexec,
            on_start=ctx.extra.get("on_process_start"),
        )
