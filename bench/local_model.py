"""Local model benchmark: prismd streaming from its own llama.cpp runtime, against the same
runtime asked directly.

Before them, one turn of the built-in agent (whose system prompt carries the text tool
protocol's instructions) measures the first answer a new user waits for.

Starts a prismd (fresh temporary PRISMD_HOME, no key, no Ollama) whose default provider is
`local` with the bundled SmolLM2-135M, waits for the model, then runs `turns` pairs of turns:
the same request once through prismd (over /ws, a new session each time, an agent without
tools so that prismd sends exactly the request below) and once straight to the runtime through
the `openai` client (streaming, usage included). Who goes first alternates, so both see the
same prompt cache. Temperature 0: both produce the same tokens.

Per turn: time to first token (from the send), tokens/s (completion tokens over the time from
the first token to the end), and the turn's duration; prismd's overhead is the median of the
paired differences. Also: the model's load time as prismd reports it, and memory.

    .venv/bin/python bench/local_model.py [--turns 10] [--max-tokens 64] [--threads N]
                                          [--wait-quiet S] [--json FILE]

`measure()` is importable (bench/load.py --local). Every wait is bounded; prismd (and with it
the runtime) is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from websockets.asyncio.client import connect

from prismd.providers.local import default_threads

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant."
PROMPTS = [
    "Tell me about the sea.",
    "Describe a forest in spring.",
    "Write a short story about a lighthouse.",
    "Explain how bread is made.",
    "Describe a busy train station.",
]
perf = time.perf_counter


@dataclass
class Turn:
    first_s: float  # send -> first token
    total_s: float  # send -> end of the answer
    tokens: int  # completion tokens
    prompt_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        generating = self.total_s - self.first_s
        return (self.tokens - 1) / generating if self.tokens > 1 and generating > 0 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(max_tokens: int, threads: int) -> str:
    return f"""
[providers.local]
max_output_tokens = {max_tokens}
threads = {threads}

[[agents]]
id = "bench"
name = "Bench"
system_prompt = "{SYSTEM}"
tools = []
temperature = 0
"""


class Server:
    """`prismd serve` on a free port with its own home; stopped by pid."""

    def __init__(self, home: Path, config: str) -> None:
        (home / "config.toml").write_text(config)
        self.port = _free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "ANTHROPIC_", "PRISMD_", "OLLAMA_"))
        }
        env.update(PRISMD_HOME=str(home), OLLAMA_BASE_URL="http://127.0.0.1:9")
        self.log = (home / "server.log").open("wb")
        self.started = perf()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prismd", "serve", "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, limit_s: float = 120.0) -> tuple[dict[str, Any], float]:
        """The runtime's status once the model is loaded, and the time since the start."""
        async with httpx.AsyncClient() as http, asyncio.timeout(limit_s):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("prismd exited; see its server.log")
                try:
                    model = (await http.get(self.url + "/api/health")).json().get("model") or {}
                    status = model.get("runtime") or {}
                    if status.get("state") == "ready":
                        return status, perf() - self.started
                    if status.get("state") == "failed":
                        raise RuntimeError(f"the model did not load: {status.get('error')}")
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _prismd_turn(url: str, message: str, limit_s: float, agent: str = "bench") -> Turn:
    async with connect(url, max_size=None) as ws, asyncio.timeout(limit_s):
        await ws.recv()  # connected
        sent = perf()
        await ws.send(json.dumps({"type": "chat", "message": message, "agentId": agent}))
        first = None
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "chunk" and first is None:
                first = perf()
            elif frame["type"] == "done":
                end = perf()
                return Turn(
                    (first or end) - sent, end - sent, frame["tokensOut"], frame["tokensIn"]
                )
            elif frame["type"] == "error":
                raise RuntimeError(f"prismd: {frame['code']}: {frame['error']}")


async def _direct_turn(
    client: openai.AsyncOpenAI, model: str, message: str, max_tokens: int, limit_s: float
) -> Turn:
    """The request prismd makes for the same chat, through the same SDK."""
    async with asyncio.timeout(limit_s):
        sent = perf()
        first = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": message},
            ],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"repeat_penalty": 1.1, "cache_prompt": True},
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = perf()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        end = perf()
        return Turn((first or end) - sent, end - sent, tokens)


def wait_for_load_below(limit: float, patience_s: float) -> bool:
    """Wait (at most `patience_s`) for a 1-minute load average under `limit`: on a shared
    machine, other work changes these figures many times over."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= limit:
        if time.monotonic() >= deadline:
            print(f"load average still {os.getloadavg()[0]:.2f}; going on", file=sys.stderr)
            return False
        time.sleep(5)
    return True


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(turns: list[Turn]) -> dict[str, float]:
    return {
        "first_token_ms": round(_median([t.first_s for t in turns]) * 1000, 1),
        "tokens_per_s": round(_median([t.tokens_per_s for t in turns]), 1),
        "turn_ms": round(_median([t.total_s for t in turns]) * 1000, 1),
        "completion_tokens": _median([float(t.tokens) for t in turns]),
    }


async def measure(
    turns: int = 10,
    max_tokens: int = 64,
    threads: int = 0,
    warmup: int = 1,
    limit_s: float = 300.0,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="prismd-bench-local-") as tmp:
        server = Server(Path(tmp), _config(max_tokens, threads))
        try:
            async with asyncio.timeout(limit_s):
                result = await _measure(server, turns, max_tokens, warmup)
        finally:
            server.stop()
    result["threads"] = threads or default_threads()
    return result


async def _measure(server: Server, turns: int, max_tokens: int, warmup: int) -> dict[str, Any]:
    status, ready_s = await server.ready()
    runtime = psutil.Process(status["pid"])
    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{status['port']}/v1", api_key="none")
    via: list[Turn] = []
    direct: list[Turn] = []
    # The built-in agent's first answer: the text tool protocol's instructions come first.
    assistant = await _prismd_turn(ws_url, PROMPTS[0], 300, agent="assistant")
    try:
        for i in range(warmup + turns):
            message = PROMPTS[i % len(PROMPTS)]
            pair: dict[str, Turn] = {}
            order = ("prismd", "direct") if i % 2 else ("direct", "prismd")
            for who in order:
                if who == "prismd":
                    pair[who] = await _prismd_turn(ws_url, message, 120)
                else:
                    pair[who] = await _direct_turn(
                        client, status["model"], message, max_tokens, 120
                    )
            if i >= warmup:
                via.append(pair["prismd"])
                direct.append(pair["direct"])
    finally:
        await client.close()
    server_proc = psutil.Process(server.proc.pid)
    return {
        "model": status["model"],
        "max_tokens": max_tokens,
        "turns": turns,
        "ready_after_start_s": round(ready_s, 2),
        "direct": _summary(direct),
        "prismd": _summary(via),
        "overhead_ms": {
            "first_token": round(
                _median([p.first_s - d.first_s for p, d in zip(via, direct, strict=True)]) * 1000,
                1,
            ),
            "turn": round(
                _median([p.total_s - d.total_s for p, d in zip(via, direct, strict=True)]) * 1000,
                1,
            ),
        },
        "same_tokens": all(p.tokens == d.tokens for p, d in zip(via, direct, strict=True)),
        "assistant_first_turn": {
            "prompt_tokens": assistant.prompt_tokens,
            "first_token_ms": round(assistant.first_s * 1000),
        },
        "rss_mb": {
            "runtime": round(runtime.memory_info().rss / 2**20),
            "prismd": round(server_proc.memory_info().rss / 2**20),
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, threads {result['threads']}, max_tokens "
        f"{result['max_tokens']}, {result['turns']} turns; load average {result['loadavg']}",
        f"model ready {result['ready_after_start_s']} s after prismd started; RSS runtime "
        f"{result['rss_mb']['runtime']} MB, prismd {result['rss_mb']['prismd']} MB",
        f"{'':8} {'first token ms':>15} {'tokens/s':>9} {'turn ms':>9} {'tokens':>7}",
    ]
    for who in ("direct", "prismd"):
        s = result[who]
        lines.append(
            f"{who:8} {s['first_token_ms']:>15} {s['tokens_per_s']:>9} {s['turn_ms']:>9} "
            f"{s['completion_tokens']:>7}"
        )
    a = result["assistant_first_turn"]
    lines.append(
        f"built-in agent's first answer (tool instructions): {a['prompt_tokens']} prompt tokens, "
        f"first token after {a['first_token_ms']} ms"
    )
    o = result["overhead_ms"]
    lines.append(
        f"prismd overhead (median of paired differences): first token {o['first_token']} ms, "
        f"turn {o['turn']} ms; same tokens: {result['same_tokens']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="0: prismd's default")
    parser.add_argument("--limit-s", type=float, default=300.0, help="give up after this long")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S s for a 1-minute load average under 1.0",
    )
    args = parser.parse_args()
    if args.wait_quiet:
        wait_for_load_below(1.0, args.wait_quiet)
    result = asyncio.run(measure(args.turns, args.max_tokens, args.threads, limit_s=args.limit_s))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
