"""Round trip of the sandboxed tools: `code_exec` (`print(1)`) and `shell` (`echo 1`), called
directly (no server, no model) on a temporary workspace, as a trusted and an untrusted caller.

    .venv/bin/python bench/sandbox_startup.py [--runs 40]

Prints the median and the minimum of each, and what isolation was in force. Timings depend on
the machine's load: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from prismd.config import ToolsSettings
from prismd.tools.base import Tool, ToolContext
from prismd.tools.builtins import CodeExec, Shell, isolation


async def measure(tool: Tool, args: dict[str, str], ctx: ToolContext, runs: int) -> str:
    await tool.run(args, ctx)  # the first run probes the machine
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await tool.run(args, ctx)
        times.append((time.perf_counter() - started) * 1000)
    return f"median {statistics.median(times):.1f} ms, min {min(times):.1f} ms"


async def main(runs: int, workspace: Path) -> None:
    iso = isolation()
    print(f"mechanism: {iso['mechanism']}, untrusted_ok: {iso['untrusted_ok']}")
    for trusted in (True, False):
        ctx = ToolContext("s", "a", workspace, workspace, ToolsSettings(), trusted=trusted)
        who = "trusted" if trusted else "untrusted"
        if not trusted and not iso["untrusted_ok"]:
            print(f"{who}: refused here ({'; '.join(iso['untrusted_missing'])})")
            continue
        code = await measure(CodeExec(), {"code": "print(1)"}, ctx, runs)
        shell = await measure(Shell(), {"command": "echo 1"}, ctx, runs)
        where = "host" if trusted else "sandbox"
        print(f"{who}: code_exec {code}; shell ({where}) {shell}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    space = Path(tempfile.mkdtemp(prefix="prismd-bench-")).resolve()
    space.chmod(0o755)
    asyncio.run(main(parser.parse_args().runs, space))
