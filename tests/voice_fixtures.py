"""Speech fixtures made on the spot: espeak-ng (Debian) and Piper (through the server under
test), re-encoded with PyAV into the formats clients send; and word error rate."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import av
import numpy as np

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
# The sentences whose word error rate the tests bound.
SENTENCES = [
    "What is the capital of France?",
    "Please remind me to call my mother tomorrow at noon.",
    "How many kilometers is it from Berlin to Munich?",
    "Turn off the lights in the kitchen and lock the front door.",
    "The weather today is sunny with a light breeze.",
]


def espeak_wav(text: str, rate: int | None = None, speed: int = 160) -> bytes:
    """espeak-ng saying `text`, as WAV (its native 22.05 kHz, or resampled to `rate`)."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", str(speed), "--stdout", text],
        capture_output=True,
        check=True,
    ).stdout
    if rate is None:
        return wav
    samples, native = decode(wav)
    return to_wav(resample(samples, native, rate), rate)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container → (int16 mono samples, sample rate)."""
    with av.open(io.BytesIO(data)) as box:
        stream = box.streams.audio[0]
        rate = stream.rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        pieces = [
            out.to_ndarray().reshape(-1)
            for frame in box.decode(stream)
            for out in resampler.resample(frame)
        ]
    return np.concatenate(pieces).astype(np.int16), rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    n = int(len(samples) * target / rate)
    x = np.linspace(0, len(samples) - 1, n)
    return np.interp(x, np.arange(len(samples)), samples.astype(np.float32)).astype(np.int16)


def to_wav(samples: np.ndarray, rate: int) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def pcm16(wav: bytes, rate: int = 16_000) -> bytes:
    samples, native = decode(wav)
    return resample(samples, native, rate).astype("<i2").tobytes()


def encode(wav: bytes, container: str, codec: str, rate: int = 48_000) -> bytes:
    """Re-encode speech the way a client would send it (WebM/Opus like MediaRecorder,
    Ogg/Opus, MP3)."""
    samples, native = decode(wav)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as box:
        stream: Any = box.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = native
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(out):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return buf.getvalue()


def chunks(data: bytes, n: int) -> list[str]:
    """`data` cut into n base64 pieces (only the first holds the container header)."""
    size = -(-len(data) // n)
    return [base64.b64encode(data[i : i + size]).decode() for i in range(0, len(data), size)]


def silence_wav(seconds: float, rate: int = 16_000) -> bytes:
    return to_wav(np.zeros(int(seconds * rate), dtype=np.int16), rate)


def noise_wav(seconds: float, rate: int = 16_000, level: float = 0.3) -> bytes:
    rng = np.random.default_rng(7)
    return to_wav(
        (rng.standard_normal(int(seconds * rate)) * level * 32767).clip(-32767, 32767), rate
    )


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(1, len(ref))


def hello_wav(path: Path) -> Path:
    """The browser test's fake microphone: espeak-ng at 48 kHz mono 16-bit."""
    if not path.exists():
        path.write_bytes(espeak_wav("What is the capital of France?", rate=48_000))
    return path
