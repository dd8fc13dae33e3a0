"""Audio bytes → 16 kHz mono float32 samples.

Containers are recognised from their first bytes (a client's `format` is trusted only for raw
PCM): WAV `RIFF`, Ogg `OggS`, WebM/Matroska `1A45DFA3`, MP3 `ID3` or a frame sync. Containers
are decoded with PyAV (FFmpeg) opened with the demuxer of the detected container only (FFmpeg
never probes other formats); a browser's MediaRecorder WebM arrives in chunks of which only
the first holds the header, so the chunks are decoded as one concatenated stream.

A small compressed file can decode to gigabytes (an hour of silence is a few hundred KB of
FLAC or Opus), so `max_samples` (the duration limit at 16 kHz) is enforced while decoding: a
recording longer than that is refused before more than the limit is held.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from .errors import AudioDecodeError, TranscriptionFailed, VoiceError

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16_000
PCM_FORMATS = ("pcm16", "pcm", "s16le", "raw")
# The FFmpeg demuxer for each container `sniff` recognises.
DEMUXERS = {
    "wav": "wav",
    "ogg": "ogg",
    "webm": "matroska",
    "mp3": "mp3",
    "flac": "flac",
    "mp4": "mov",
}


def sniff(data: bytes) -> str | None:
    """The container of `data` from its magic bytes, or None."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"fLaC":
        return "flac"
    if head[4:8] == b"ftyp":
        return "mp4"
    return None


def decode(
    data: bytes,
    fmt: str | None = None,
    sample_rate: int | None = None,
    max_samples: int | None = None,
) -> np.ndarray:
    """Decode a whole recording; raises AudioDecodeError with a reason a user can act on, or
    TranscriptionFailed as soon as it is longer than `max_samples` (at 16 kHz)."""
    if not data:
        raise AudioDecodeError("No audio was received")
    container = sniff(data)
    if container is None and fmt is not None and fmt.lower() in PCM_FORMATS:
        return pcm16_to_float(data, sample_rate or SAMPLE_RATE, max_samples)
    if container is None:
        raise AudioDecodeError(
            "Unrecognised audio: expected WAV, Ogg, WebM, MP3 (detected from the bytes) or "
            '`format: "pcm16"` with `sampleRate`'
        )
    return _decode_container(data, container, max_samples)


def too_long(max_samples: int, seconds: float | None = None) -> TranscriptionFailed:
    """The error for audio over the duration limit (`seconds`: its length, when known)."""
    limit = f"{max_samples / SAMPLE_RATE:g}"
    if seconds is None:
        return TranscriptionFailed(f"The audio is longer than {limit} s; the limit is {limit} s")
    return TranscriptionFailed(f"The audio is {seconds:.0f} s long; the limit is {limit} s")


def pcm16_to_float(data: bytes, sample_rate: int, max_samples: int | None = None) -> np.ndarray:
    import numpy as np

    if len(data) % 2:
        data = data[:-1]
    seconds = len(data) / 2 / sample_rate
    if max_samples is not None and seconds * SAMPLE_RATE > max_samples:
        raise too_long(max_samples, seconds)  # before any copy or resampling
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return resample(samples, sample_rate, SAMPLE_RATE)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 resampling: box-filter then decimate for integer ratios (48k, 32k → 16k),
    linear interpolation otherwise. Good enough for speech recognition."""
    import numpy as np

    if rate == target or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    if rate > target and rate % target == 0:
        step = rate // target
        usable = samples[: samples.size - samples.size % step]
        return usable.reshape(-1, step).mean(axis=1).astype(np.float32)
    n = int(round(samples.size * target / rate))
    x = np.linspace(0, samples.size - 1, n)
    return np.interp(x, np.arange(samples.size), samples).astype(np.float32)


def _decode_container(data: bytes, container: str, max_samples: int | None) -> np.ndarray:
    import av
    import numpy as np

    pieces: list[np.ndarray] = []
    # The length decoded so far, in samples at 16 kHz, counted from each frame's own rate
    # before it is resampled (a frame at a tiny rate would resample to a huge one).
    length = 0.0
    try:
        with av.open(io.BytesIO(data), mode="r", format=DEMUXERS[container]) as box:
            if not box.streams.audio:
                raise AudioDecodeError(f"The {container} data holds no audio stream")
            stream = box.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            try:
                for frame in box.decode(stream):
                    if not frame.sample_rate:
                        raise AudioDecodeError(f"The {container} audio has no sample rate")
                    length += frame.samples * SAMPLE_RATE / frame.sample_rate
                    if max_samples is not None and length > max_samples + 1:
                        raise too_long(max_samples)
                    for out in resampler.resample(frame):
                        pieces.append(out.to_ndarray().reshape(-1))
            except av.error.InvalidDataError:
                # A recording cut mid-packet (the last MediaRecorder chunk may be): keep what
                # decoded; with nothing decoded it is an error below.
                pass
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except VoiceError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise AudioDecodeError(f"Could not decode the {container} audio: {exc}") from None
    if not pieces:
        raise AudioDecodeError(f"The {container} audio holds no samples")
    return np.concatenate(pieces).astype(np.float32, copy=False)


def to_wav(samples_int16: bytes, sample_rate: int) -> bytes:
    """16-bit mono PCM in a WAV container."""
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples_int16)
    return buf.getvalue()


def encode(samples_int16: bytes, sample_rate: int, fmt: str) -> tuple[bytes, str]:
    """Synthesised speech in `fmt` (wav, pcm16, mp3, ogg) → (bytes, content type)."""
    if fmt == "wav":
        return to_wav(samples_int16, sample_rate), "audio/wav"
    if fmt == "pcm16":
        return samples_int16, f"audio/L16; rate={sample_rate}; channels=1"
    if fmt not in ("mp3", "ogg", "opus"):
        raise ValueError(f"unsupported audio format {fmt!r} (use wav, pcm16, mp3 or ogg)")
    import av
    import numpy as np

    codec, container, rate, ctype = {
        "mp3": ("libmp3lame", "mp3", sample_rate, "audio/mpeg"),
        "ogg": ("libopus", "ogg", 48_000, "audio/ogg"),
        "opus": ("libopus", "ogg", 48_000, "audio/ogg"),
    }[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as box:
        stream: Any = box.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(samples_int16, dtype="<i2").reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = sample_rate
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(out):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return buf.getvalue(), ctype
