"""Voice latency benchmark: a 3 s spoken question (and a 12 s request), on this machine's CPU.

Starts a fake OpenAI-compatible model (zero delay) and its own prismd (fresh temporary
PRISMD_HOME, `voice.preload = true`) on 127.0.0.1, and measures over /ws:

- push-to-talk: the recording as WebM/Opus chunks sent at the pace a browser's MediaRecorder
  sends them (`start(250)`: one chunk at the end of every 250 ms of speech), then `audio_end`
  right after the last one; times from `audio_end` → `transcribed`, → the first `audio` event
  (spoken reply), → `done`, and the transcript's word error rate;
- hands-free: 16 kHz PCM16 frames sent in real time (20 ms each) with `voice_stream`; from the
  last frame holding speech → `transcribed` and → the first `audio`. This includes the silence
  the VAD waits for before it ends the utterance (`voice.silence_ms`, 500 ms by default).

    .venv/bin/python bench/voice.py [--runs 10] [--wait-quiet S] [--config TOML]
                                    [--baseline SRC] [--out bench/voice_results.json]

`--config` adds lines to the server's `[voice]` section (e.g. `incremental = false` to
transcribe recordings whole at `audio_end`). `--baseline SRC` also starts a prismd from another
source tree (e.g. `git archive <commit> | tar -x -C /tmp/base`, then `/tmp/base/src`) and
alternates the runs between the two, so that both see the same load on a shared machine.
Needs espeak-ng (the speech is spoken by it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from prismd.testing.fake_models import FakeModelServer, Reply  # noqa: E402
from tests.conftest import Client, PrismdServer, openai_env  # noqa: E402
from tests.voice_fixtures import chunks, decode, encode, espeak_wav, pcm16, wer  # noqa: E402

QUESTION = "What is the capital of France, and what is it famous for?"
LONG = (
    "Please remind me to call my mother tomorrow at noon. How many kilometers is it from "
    "Berlin to Munich? Turn off the lights in the kitchen and lock the front door. The weather "
    "today is sunny with a light breeze."
)
SLICE_S = 0.25  # MediaRecorder.start(250)
ANSWER = ["Paris is the capital ", "of France. ", "It is famous for the Eiffel Tower ", "and art."]
perf = time.perf_counter


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "median": round(statistics.median(ms), 1),
        "p90": round(ms[min(len(ms) - 1, int(len(ms) * 0.9))], 1),
        "min": round(ms[0], 1),
        "max": round(ms[-1], 1),
    }


def push_to_talk(c: Client, webm: bytes, seconds: float, text: str) -> dict[str, float]:
    """One recording at a browser's pace; the times after `audio_end`, and the WER."""
    pieces = chunks(webm, math.ceil(seconds / SLICE_S))
    start = perf()
    for i, piece in enumerate(pieces):
        delay = start + (i + 1) * SLICE_S - perf()  # a slice is sent when it ends
        if delay > 0:
            time.sleep(delay)
        c.send(type="audio_chunk", data=piece, format="webm", session=True)
    c.send(type="audio_end", session=True, speak=True)
    t0 = perf()
    marks: dict[str, float] = {}
    while True:
        frame = c.recv(timeout=60)
        kind = frame["type"]
        if kind == "error":
            raise RuntimeError(frame)
        if kind in ("transcribed", "audio", "done") and kind not in marks:
            marks[kind] = perf() - t0
        if kind == "transcribed":
            marks["wer"] = wer(text, frame["text"])
        if kind == "context_usage":
            return marks


def hands_free(c: Client, pcm: bytes) -> dict[str, float]:
    frame = 640  # 20 ms at 16 kHz
    silence = b"\x00\x00" * 16_000
    start = perf()
    sent = 0
    marks: dict[str, float] = {}
    last_speech = 0.0

    def pace(n: int) -> None:
        due = start + n * 0.02
        delay = due - perf()
        if delay > 0:
            time.sleep(delay)

    for data in (silence[: len(silence) // 2], pcm):
        for i in range(0, len(data), frame):
            pace(sent)
            c.send_raw(data[i : i + frame])
            sent += 1
    last_speech = perf()
    # Silence in real time until the reply is heard.
    i = 0
    while "audio" not in marks:
        pace(sent)
        c.send_raw(silence[i % len(silence) : i % len(silence) + frame])
        i += frame
        sent += 1
        try:
            while True:
                f = c.recv(timeout=0.001)
                if f["type"] == "error":
                    raise RuntimeError(f)
                if f["type"] in ("transcribed", "audio") and f["type"] not in marks:
                    marks[f["type"]] = perf() - last_speech
        except TimeoutError:
            pass
    c.until("context_usage", timeout=60)
    return marks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "voice_results.json")
    ap.add_argument(
        "--wait-quiet", type=float, default=0, help="first wait up to S s for load < 1.0"
    )
    ap.add_argument("--config", default="", help="more lines for the [voice] section")
    ap.add_argument("--baseline", type=Path, help="also measure prismd from this source tree")
    args = ap.parse_args()
    waited = perf()
    while os.getloadavg()[0] >= 1.0 and perf() - waited < args.wait_quiet:
        time.sleep(5)
    load_before = os.getloadavg()[0]

    recordings = {}
    for name, text in (("question", QUESTION), ("long", LONG)):
        wav = espeak_wav(text, rate=48_000, speed=175)
        samples, rate = decode(wav)
        recordings[name] = (text, encode(wav, "webm", "libopus"), len(samples) / rate)
    seconds = recordings["question"][2]
    pcm = pcm16(espeak_wav(QUESTION, rate=48_000, speed=175), 16_000)
    # Hands-free latency counts from the end of speech: drop espeak's trailing silence.
    voiced = np.flatnonzero(np.abs(np.frombuffer(pcm, dtype="<i2")) > 600)
    pcm = pcm[: 2 * (int(voiced[-1]) + 1)]
    for name, (_, data, length) in recordings.items():
        print(f"{name}: {length:.2f} s of espeak-ng speech ({len(data)} bytes WebM/Opus)")

    servers = {"": ROOT / "src"}
    if args.baseline is not None:
        servers["baseline"] = args.baseline.resolve()
    ptt: dict[str, dict[str, list[dict[str, float]]]] = {
        label: {name: [] for name in recordings} for label in servers
    }
    hf: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
    with FakeModelServer("openai") as fake, tempfile.TemporaryDirectory() as home:
        fake.script(Reply(text=ANSWER))
        config = f"[voice]\npreload = true\n{args.config}\n"
        started: dict[str, PrismdServer] = {}
        try:
            for label, src in servers.items():
                (Path(home) / (label or "main")).mkdir()
                env = {**openai_env(fake), "PYTHONPATH": str(src)}
                srv = started[label] = PrismdServer(Path(home) / (label or "main"), env, config)
                srv.start()
                loading = perf()
                while perf() - loading < 120:
                    st = srv.get("/api/voice/status").json()
                    if st["stt"]["loaded"] and st["tts"]["loaded"] and st["vad"]["loaded"]:
                        break
                    time.sleep(0.1)
                print(f"{label or 'server'}: engines loaded in {perf() - loading:.1f} s")
            clients = {label: srv.client() for label, srv in started.items()}
            labels = list(started)
            for i in range(args.runs + 2):
                for label in labels[i % 2 :] + labels[: i % 2]:  # alternate which goes first
                    for name, (text, data, length) in recordings.items():
                        marks = push_to_talk(clients[label], data, length, text)
                        if i >= 2:  # two warm-up runs
                            ptt[label][name].append(marks)
            for c in clients.values():
                c.send(type="voice_stream", action="start", format="pcm16", sampleRate=16_000)
                c.until("voice_stream")
            for i in range(max(3, args.runs // 2) + 1):
                for label in labels:
                    marks = hands_free(clients[label], pcm)
                    if i >= 1:
                        hf[label].append(marks)
            for c in clients.values():
                c.close()
        finally:
            for srv in started.values():
                srv.stop()

    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": args.config,
        "loadBefore": round(load_before, 2),
        "loadAfter": round(os.getloadavg()[0], 2),
        "utteranceS": round(seconds, 2),
        "runs": args.runs,
    }
    for label in servers:
        into = result.setdefault(label, {}) if label else result
        if label:
            into["source"] = str(servers[label])
        for name, runs in ptt[label].items():
            key = "pushToTalk" if name == "question" else f"pushToTalk{name.capitalize()}"
            into[key] = {
                "utteranceS": round(recordings[name][2], 2),
                "audioEndToTranscribedMs": summary([m["transcribed"] for m in runs]),
                "audioEndToFirstAudioMs": summary([m["audio"] for m in runs]),
                "audioEndToDoneMs": summary([m["done"] for m in runs]),
                "wordErrorRate": round(statistics.mean(m["wer"] for m in runs), 3),
            }
        into["handsFree"] = {
            "endOfSpeechToTranscribedMs": summary([m["transcribed"] for m in hf[label]]),
            "endOfSpeechToFirstAudioMs": summary([m["audio"] for m in hf[label]]),
        }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
