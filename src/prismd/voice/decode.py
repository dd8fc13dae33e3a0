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
SEGMENT_PAD_S = 0.3  # silence added after a segment: Whisper hears its last word better
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
    stream = StreamDecoder(fmt, sample_rate, max_samples)
    stream.feed(data)
    return stream.decode(final=True)


class StreamDecoder:
    """A recording that arrives in pieces → 16 kHz mono float32, decoded as it arrives.

    `feed` (on the event loop) appends bytes; `decode` (in a worker thread, one call at a time)
    returns the samples that the bytes fed so far add, and with `final` the rest. Containers
    are recognised from their first bytes (a client's `format` is trusted only for raw PCM).
    """

    def __init__(
        self, fmt: str | None = None, sample_rate: int | None = None, max_samples: int | None = None
    ) -> None:
        self.fmt = fmt.lower() if fmt else None
        self.rate = sample_rate or SAMPLE_RATE
        self.max_samples = max_samples
        self.chunks: list[bytes] = []
        self.size = 0  # bytes fed
        self.samples = 0  # 16 kHz samples returned so far
        self.kind: str | None = None  # the container, or "pcm"
        self._used = 0  # PCM: chunks converted so far
        self._odd = b""
        self._pcm_in = 0  # PCM: samples at the client's rate so far
        self._container: ContainerDecoder | None = None
        self._resampler: Any = None

    def feed(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def decode(self, final: bool = False) -> np.ndarray:
        import numpy as np

        count = len(self.chunks)  # chunks fed meanwhile wait for the next call
        if self.kind is None and not self._recognise(count, final):
            return np.zeros(0, dtype=np.float32)
        if self.kind == "pcm":
            out = self._pcm(count, final)
        else:
            assert self._container is not None
            data = b"".join(self.chunks[:count])
            pieces = self._container.decode(io.BytesIO(data), final)
            out = (
                np.concatenate(pieces).astype(np.float32, copy=False)
                if pieces
                else np.zeros(0, dtype=np.float32)
            )
            if final and not self.samples and not out.size:
                raise AudioDecodeError(f"The {self.kind} audio holds no samples")
        self.samples += out.size
        return out

    def _recognise(self, count: int, final: bool) -> bool:
        head = b"".join(self.chunks[:count])[:12]
        if len(head) < 12 and not final:
            return False
        if not head:
            raise AudioDecodeError("No audio was received")
        container = sniff(head)
        if container is None and self.fmt in PCM_FORMATS:
            self.kind = "pcm"
        elif container is None:
            raise AudioDecodeError(
                "Unrecognised audio: expected WAV, Ogg, WebM, MP3 (detected from the bytes) or "
                '`format: "pcm16"` with `sampleRate`'
            )
        else:
            self.kind = container
            self._container = ContainerDecoder(container, self.max_samples)
        return True

    def _pcm(self, count: int, final: bool) -> np.ndarray:
        """Raw PCM16, converted a piece at a time: an odd byte waits for the next piece; rates
        that are a multiple of 16 kHz are box-filtered a whole step at a time, other rates go
        through FFmpeg's resampler, which keeps its state between pieces."""
        data = self._odd + b"".join(self.chunks[self._used : count])
        self._used = count
        rate = self.rate
        step = rate // SAMPLE_RATE if rate % SAMPLE_RATE == 0 else 0
        usable = len(data) - len(data) % 2
        if step and not final:
            usable -= usable % (2 * step)
        data, self._odd = data[:usable], b"" if final else data[usable:]
        self._pcm_in += len(data) // 2
        if self.max_samples is not None and self._pcm_in * SAMPLE_RATE / rate > self.max_samples:
            raise too_long(self.max_samples, self._pcm_in / rate)  # before any resampling
        if step:
            return pcm16_to_float(data, rate)
        return self._swr(data, final)

    def _swr(self, data: bytes, final: bool) -> np.ndarray:
        import av
        import numpy as np

        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frames = []
        if data:
            frame = av.AudioFrame.from_ndarray(
                np.frombuffer(data, dtype="<i2").reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = self.rate
            frames += self._resampler.resample(frame)
        if final:
            frames += self._resampler.resample(None)
        pieces = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


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


class ContainerDecoder:
    """The audio of one container → 16 kHz mono float32, in one pass or while its bytes arrive.

    `decode(source, final)` reads the container from its start each time (`source`: a file
    object over the bytes so far); the packets it decoded in earlier passes are skipped, and
    the same codec context and resampler go on, so the samples of many passes are those of one
    pass over the whole. Before `final`, the last packet is held back (the bytes so far may end
    inside it) and a container whose header has not arrived yet gives nothing.
    """

    def __init__(self, container: str, max_samples: int | None) -> None:
        self.container = container
        self.max_samples = max_samples
        self.packets = 0  # packets decoded so far
        self._last: tuple[int | None, int] | None = None  # (pts, size) of the last decoded
        self._box: Any = None  # the first pass's container: its codec context decodes all
        self._codec: Any = None
        self._resampler: Any = None
        # The length decoded so far, in samples at 16 kHz, counted from each frame's own rate
        # before it is resampled (a frame at a tiny rate would resample to a huge one).
        self.length = 0.0

    def decode(self, source: Any, final: bool) -> list[np.ndarray]:
        import av

        container = self.container
        pieces: list[np.ndarray] = []
        try:
            box = av.open(source, mode="r", format=DEMUXERS[container])
        except (av.error.FFmpegError, ValueError, IndexError) as exc:
            if not final:
                return pieces  # the header may not have arrived yet
            self.close()
            raise AudioDecodeError(f"Could not decode the {container} audio: {exc}") from None
        try:
            if self._box is None:
                if not box.streams.audio:
                    if not final:
                        box.close()
                        return pieces
                    raise AudioDecodeError(f"The {container} data holds no audio stream")
                self._box, self._codec = box, box.streams.audio[0].codec_context
                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            stream = box.streams.audio[0] if box.streams.audio else None
            if stream is not None:
                self._decode_packets(box, stream, final, pieces)
            if final:
                for out in self._resampler.resample(None):
                    pieces.append(out.to_ndarray().reshape(-1))
        except VoiceError:
            self.close()
            raise
        except (av.error.FFmpegError, ValueError, IndexError) as exc:
            self.close()
            raise AudioDecodeError(f"Could not decode the {container} audio: {exc}") from None
        finally:
            if box is not self._box:
                box.close()
            if final:
                self.close()
        return pieces

    def _decode_packets(self, box: Any, stream: Any, final: bool, pieces: list[Any]) -> None:
        import av

        seen = 0
        held: Any = None  # before `final`, the newest packet waits for the next one
        try:
            for packet in box.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                seen += 1
                if seen < self.packets:
                    continue
                if seen == self.packets:
                    if self._last != (packet.pts, packet.size):
                        raise AudioDecodeError(
                            f"The {self.container} stream changed under its decoder"
                        )
                    continue
                if held is not None:
                    self._decode_packet(held, pieces)
                held = packet
        except av.error.InvalidDataError:
            # A recording cut mid-packet (the last MediaRecorder chunk may be): keep what
            # decoded; with nothing decoded it is an error (see `decode`).
            pass
        if held is not None and final:
            self._decode_packet(held, pieces)
        if final:
            try:
                for frame in self._codec.decode(None):
                    self._resample(frame, pieces)
            except av.error.InvalidDataError:
                pass

    def _decode_packet(self, packet: Any, pieces: list[Any]) -> None:
        import av

        self.packets += 1
        self._last = (packet.pts, packet.size)
        try:
            frames = self._codec.decode(packet)
        except av.error.InvalidDataError:
            return  # one damaged packet: the rest may decode
        for frame in frames:
            self._resample(frame, pieces)

    def _resample(self, frame: Any, pieces: list[Any]) -> None:
        if not frame.sample_rate:
            raise AudioDecodeError(f"The {self.container} audio has no sample rate")
        self.length += frame.samples * SAMPLE_RATE / frame.sample_rate
        if self.max_samples is not None and self.length > self.max_samples + 1:
            raise too_long(self.max_samples)
        for out in self._resampler.resample(frame):
            pieces.append(out.to_ndarray().reshape(-1))

    def close(self) -> None:
        box, self._box = self._box, None
        if box is not None:
            box.close()


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


def pad(segment: np.ndarray) -> np.ndarray:
    """A segment cut at a pause, with `SEGMENT_PAD_S` of silence after it."""
    import numpy as np

    return np.concatenate([segment, np.zeros(int(SEGMENT_PAD_S * SAMPLE_RATE), dtype=np.float32)])
