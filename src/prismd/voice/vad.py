"""Voice activity detection with Silero's ONNX model, run by onnxruntime (no torch).

The `silero-vad` wheel bundles the model; its Python package imports torch, so only the file is
used: its path is found without importing the package. One model serves every stream: the
recurrent state lives in each `VadStream`.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VoiceError

if TYPE_CHECKING:
    import numpy as np

WINDOW = 512  # samples per model step at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees
WINDOW_MS = 32


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise VoiceError("The silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.exists():
        raise VoiceError(f"Silero VAD model not found at {path}")
    return path


class SileroVad:
    def __init__(self, path: Path | None = None) -> None:
        import numpy as np
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(path or bundled_model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(16_000, dtype=np.int64)

    def stream(self) -> VadStream:
        return VadStream(self)

    def step(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        out, new_state = self._session.run(
            None, {"input": window.reshape(1, -1), "state": state, "sr": self._sr}
        )
        return float(out.reshape(-1)[0]), new_state

    def speech_ms(self, samples: np.ndarray, threshold: float = 0.5) -> int:
        """Milliseconds of `samples` (16 kHz) that the model hears as speech."""
        return sum(WINDOW_MS for p in self.stream().probabilities(samples) if p >= threshold)

    def has_speech(self, samples: np.ndarray, least_ms: int, threshold: float = 0.5) -> bool:
        """Whether `samples` hold at least `least_ms` of speech; stops as soon as they do."""
        stream, heard = self.stream(), 0
        step = WINDOW * 16  # about half a second at a time
        for start in range(0, samples.size, step):
            probs = stream.probabilities(samples[start : start + step])
            heard += sum(WINDOW_MS for p in probs if p >= threshold)
            if heard >= least_ms:
                return True
        return False


class VadStream:
    """Speech probabilities of a continuous 16 kHz stream, one per 32 ms window."""

    def __init__(self, model: SileroVad) -> None:
        import numpy as np

        self.model = model
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def probabilities(self, samples: np.ndarray) -> list[float]:
        import numpy as np

        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        probs = []
        usable = data.size - data.size % WINDOW
        for start in range(0, usable, WINDOW):
            window = data[start : start + WINDOW]
            p, self._state = self.model.step(np.concatenate([self._context, window]), self._state)
            self._context = window[-CONTEXT:]
            probs.append(p)
        self._pending = data[usable:]
        return probs


@dataclass
class EndpointConfig:
    threshold: float = 0.5
    silence_ms: int = 500  # silence that ends an utterance
    min_speech_ms: int = 250  # speech shorter than this is a click or a cough
    preroll_ms: int = 300  # audio kept from before the speech started
    max_utterance_ms: int = 30_000
    # Silence after which the speech so far is offered for speculative transcription (0: off).
    pause_ms: int = 0
    # (length, silence) in ms: once an utterance is `length` long, a silence of `silence`
    # (shorter than `silence_ms`) ends it too: push-to-talk cuts long speech into segments at
    # the pauses between phrases, taking shorter pauses the longer the segment.
    splits: tuple[tuple[int, int], ...] = ()
    # Speech too short to stand alone (under `min_speech_ms`) is not dropped but kept for the
    # next utterance (or returned by `flush`): in push-to-talk every word the user said counts.
    keep_short: bool = False


@dataclass
class Endpointer:
    """Cuts a PCM stream into utterances. `feed` returns events: ("speech", None) once an
    utterance has `min_speech_ms` of speech (the moment to interrupt a spoken reply),
    ("pause", samples) after `pause_ms` of silence (the utterance may be over: transcribe it
    speculatively), ("resume", None) if speech comes back after a pause, and
    ("utterance", samples) when `silence_ms` of silence ends it (or less once it is long: `splits`).
    `heard_ms` counts the speech heard so far; `spans` gets where each utterance returned lies
    in the stream, (start, end) in samples, in order (for the caller to take; speech kept with
    `keep_short` is part of the next utterance, without the silence between)."""

    vad: VadStream
    config: EndpointConfig = field(default_factory=EndpointConfig)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _preroll: deque[Any] = field(default_factory=deque)
    _speech: list[Any] = field(default_factory=list)
    _in_speech: bool = False
    _announced: bool = False
    _paused: bool = False
    _speech_ms: int = 0
    _silence_ms: int = 0
    _total_ms: int = 0
    _carry: list[Any] = field(default_factory=list)  # short speech kept (keep_short)
    _carry_ms: int = 0
    _pos: int = 0  # samples of the windows seen so far
    _start: int = 0  # where `_speech` (or `_carry`) begins
    heard_ms: int = 0
    spans: list[tuple[int, int]] = field(default_factory=list)

    def feed(self, samples: np.ndarray) -> list[tuple[str, Any]]:
        with self._lock:  # frames of one stream are processed in order, one at a time
            return self._feed(samples)

    def _feed(self, samples: np.ndarray) -> list[tuple[str, Any]]:
        import numpy as np

        cfg = self.config
        events: list[tuple[str, Any]] = []
        data = np.concatenate([self.vad._pending, samples.astype(np.float32, copy=False)])
        probs = self.vad.probabilities(samples)
        # The windows the probabilities belong to.
        windows = [data[i * WINDOW : (i + 1) * WINDOW] for i in range(len(probs))]
        preroll_windows = max(1, cfg.preroll_ms // WINDOW_MS)
        for p, window in zip(probs, windows, strict=True):
            self._pos += WINDOW
            if not self._in_speech:
                self._preroll.append(window)
                while len(self._preroll) > preroll_windows:
                    self._preroll.popleft()
                if p >= cfg.threshold:
                    self._in_speech = True
                    if not self._carry:
                        self._start = self._pos - WINDOW * len(self._preroll)
                    self._speech = [*self._carry, *self._preroll]
                    self._preroll.clear()
                    self._speech_ms = self._carry_ms + WINDOW_MS
                    self._silence_ms = 0
                    self._total_ms = WINDOW_MS * (len(self._carry) + 1)
                    self._carry, self._carry_ms = [], 0
                    self.heard_ms += WINDOW_MS
                continue
            self._speech.append(window)
            self._total_ms += WINDOW_MS
            if p >= cfg.threshold - 0.15:
                if p >= cfg.threshold:
                    self._speech_ms += WINDOW_MS
                    self.heard_ms += WINDOW_MS
                self._silence_ms = 0
                if self._paused:
                    self._paused = False
                    events.append(("resume", None))
            else:
                self._silence_ms += WINDOW_MS
            if not self._announced and self._speech_ms >= cfg.min_speech_ms:
                self._announced = True
                events.append(("speech", None))
            if (
                0 < cfg.pause_ms <= self._silence_ms < cfg.silence_ms
                and self._announced
                and not self._paused
            ):
                self._paused = True
                events.append(("pause", np.concatenate(self._speech)))
            split = any(
                self._total_ms >= length and self._silence_ms >= silence
                for length, silence in cfg.splits
            )
            if (
                split
                or self._silence_ms >= cfg.silence_ms
                or self._total_ms >= cfg.max_utterance_ms
            ):
                utterance = self._end()
                if utterance is not None:
                    events.append(("utterance", utterance))
        return events

    def flush(self) -> np.ndarray | None:
        """End the stream: the utterance in progress, if it had enough speech (with
        `keep_short`, any speech)."""
        with self._lock:
            return self._end(final=True)

    def _end(self, final: bool = False) -> np.ndarray | None:
        import numpy as np

        speech_ms = self._speech_ms
        speech, self._speech = self._speech, []
        self._in_speech = self._announced = self._paused = False
        self._speech_ms = self._silence_ms = self._total_ms = 0
        if self.config.keep_short:
            if not speech:  # between utterances: what was kept is all there is
                speech, speech_ms = self._carry, self._carry_ms
                self._carry, self._carry_ms = [], 0
            if speech_ms < self.config.min_speech_ms and not final:
                self._carry, self._carry_ms = speech, speech_ms  # `_start` stays
                return None
            if not speech or not speech_ms:
                return None
        elif speech_ms < self.config.min_speech_ms or not speech:
            return None
        self.spans.append((self._start, self._pos))
        return np.concatenate(speech)


class Segmenter:
    """Cuts a stream into contiguous segments at its pauses, for transcription a segment at a
    time (push-to-talk while it arrives, long uploads): every sample is in exactly one segment
    (a cut falls inside a pause, after the silence that made it), so a stream without a cut is
    one segment, the whole of it. An `Endpointer` (with `keep_short`) finds the cuts.

    `feed` and `flush` return events: ("segment", (start, samples, cut)) in order (`cut`: it
    ended at a pause, not at the end of the stream), ("pause", samples): the open segment so
    far may be the last one (the speaker paused), ("resume", None): it was not; and from
    `flush`, ("tail", (start, samples)): what followed the last cut held no speech (it
    belongs to the last segment)."""

    def __init__(self, vad: VadStream, config: EndpointConfig) -> None:
        import numpy as np

        self.endpointer = Endpointer(vad, config)
        self._held: list[Any] = []  # samples since the last cut
        self._start = 0  # where they begin in the stream
        self._empty = np.zeros(0, dtype=np.float32)

    @property
    def heard_ms(self) -> int:
        return self.endpointer.heard_ms

    def feed(self, samples: np.ndarray) -> list[tuple[str, Any]]:
        if samples.size:
            self._held.append(samples)
        endpointer = self.endpointer
        found = endpointer.feed(samples) if samples.size else []
        out: list[tuple[str, Any]] = []
        pause = False
        for kind, _ in found:
            if kind == "utterance":
                pause = False  # it ended in this very pass: no need to guess
                end = endpointer.spans.pop(0)[1]
                out.append(("segment", (self._start, self._take(end), True)))
            elif kind == "pause":
                pause = True
            elif kind == "resume":
                if pause:
                    pause = False
                else:
                    out.append(("resume", None))
        if pause:  # the utterance still open paused (since then: silence)
            out.append(("pause", self._peek(endpointer._pos)))
        return out

    def flush(self) -> list[tuple[str, Any]]:
        """The end of the stream: the rest is the last segment, if it holds speech."""
        rest = self.endpointer.flush()
        self.endpointer.spans.clear()
        held = self._all()
        self._held = []
        if not held.size:
            return []
        if rest is None:
            return [("tail", (self._start, held))]
        return [("segment", (self._start, held, False))]

    def _all(self) -> np.ndarray:
        import numpy as np

        if len(self._held) > 1:
            self._held = [np.concatenate(self._held)]
        return self._held[0] if self._held else self._empty

    def _peek(self, end: int) -> np.ndarray:
        return self._all()[: max(0, end - self._start)]

    def _take(self, end: int) -> np.ndarray:
        held = self._all()
        cut = max(0, end - self._start)
        segment, rest = held[:cut], held[cut:]
        self._held = [rest] if rest.size else []
        self._start += cut
        return segment
