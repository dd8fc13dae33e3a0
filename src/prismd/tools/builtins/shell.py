"""`shell`: a command run with /bin/sh in the workspace, limited and killed as a whole."""

from __future__ import annotations

import resource
from typing import Any

from ..base import Tool, ToolContext, ToolError, ToolSpec
from ._proc import run_process, scrubbed_env, set_rlimits


def _timeout_arg(args: dict[str, Any], cap: float) -> float:
    value = args.get("timeout_s")
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ToolError("timeout_s must be a positive number")
    return min(float(value), cap)


def _fmt_seconds(value: float) -> str:
    return f"{value:g} s"


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
        memory = settings.memory_mb * 1024 * 1024
        limits = [
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, settings.max_processes),
            (resource.RLIMIT_AS, memory),  # last: the forked copy of the server may exceed it
        ]
        workspace = str(ctx.workspace)
        result = await run_process(
            ["/bin/sh", "-c", command],
            cwd=workspace,
            env=scrubbed_env(workspace),
            timeout_s=timeout,
            max_output_bytes=settings.max_output_bytes,
            preexec_fn=lambda: set_rlimits(limits),
            on_start=ctx.extra.get("on_process_start"),
        )
        output = result.output
        if result.timed_out:
            raise ToolError(
                f"timed out after {_fmt_seconds(timeout)}; the command and every process it "
                f"started were killed\n{output}".rstrip()
            )
        return f"{result.status_line()}\n{output}".rstrip()
