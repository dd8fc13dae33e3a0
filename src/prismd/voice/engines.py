"""The voice engines of one server: loaded lazily, once, and run in a dedicated executor.

Loading a model and every transcription or synthesis happen in the voice executor's threads
(CTranslate2 and onnxruntime release the GIL while they compute), so the event loop keeps
serving every other session at full speed. Nothing heavy is imported until first use.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import SttUnavailable, TranscriptionFailed, TtsUnavailable, VoiceError

if TYPE_CHECKING:
    import numpy as np

    from ..config import VoiceSettings
    from ..protocol import AudioEvent, ServerEvent
    from .speaker import SpokenReply
    from .stt import SpeechToText, Transcript
    from .tts import Speech, TextToSpeech
    from .vad import SileroVad

log = logging.getLogger("prismd.voice")
T = TypeVar("T")


class _Engine(Protocol):
    name: str


E = TypeVar("E", bound=_Engine)


class _Lazy:
    """A component built once on first use; a failure is remembered (configuration errors do
    not fix themselves) and re-raised with the same message."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: VoiceError | None = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> Any:
        if self._value is not None:
            return self._value
        with self._lock:
            if self._value is None:
                if self._error is not None:
                    raise self._error
                try:
                    self._value = self._build()
                except VoiceError as exc:
                    self._error = exc
                    raise
        return self._value


class VoiceEngines:
    def __init__(self, settings: VoiceSettings) -> None:
        self.settings = settings
        # STT and TTS in separate threads so a long transcription does not hold up the next
        # sentence of a spoken reply; VAD has its own so hands-free frames never wait.
        self._stt_pool = ThreadPoolExecutor(1, thread_name_prefix="prismd-stt")
        self._tts_pool = ThreadPoolExecutor(1, thread_name_prefix="prismd-tts")
        self._vad_pool = ThreadPoolExecutor(1, thread_name_prefix="prismd-vad")
        self._stt = _Lazy(self._build_stt)
        self._tts = _Lazy(self._build_tts)
        self._vad = _Lazy(self._build_vad)

    # ------------------------------------------------------------ building (in a pool thread)

    def _build_stt(self) -> SpeechToText:
        from . import stt

        return self._build("speech-to-text", SttUnavailable, stt.create, self.settings.stt)

    def _build_tts(self) -> TextToSpeech:
        from . import tts

        return self._build("text-to-speech", TtsUnavailable, tts.create, self.settings.tts)

    def _build(
        self,
        what: str,
        unavailable: type[SttUnavailable | TtsUnavailable],
        create: Callable[[Any], E],
        settings: Any,
    ) -> E:
        if not self.settings.enabled:
            raise unavailable(f"{what.capitalize()} is disabled on this server (voice.enabled)")
        started = time.monotonic()
        try:
            engine = create(settings)
        except VoiceError as exc:
            raise unavailable(exc.message) from None
        log.info("%s %s loaded in %.1f s", what, engine.name, time.monotonic() - started)
        return engine

    def _build_vad(self) -> SileroVad:
        from .vad import SileroVad

        try:
            return SileroVad()
        except VoiceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise VoiceError(f"Cannot load the voice activity detector: {exc}") from None

    def _warm_stt(self) -> None:
        """The first transcription of a process is slow (allocations, caches): do it now."""
        import numpy as np

        try:
            self._stt.get().transcribe(np.zeros(16_000, dtype=np.float32), None)
        except VoiceError:
            pass

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def preload(self) -> None:
        """Load every engine now (voice.preload), logging what is unavailable."""
        for lazy, pool in ((self._stt, self._stt_pool), (self._tts, self._tts_pool)):
            try:
                await self._run(pool, lazy.get)
            except VoiceError as exc:
                log.warning("voice: %s", exc.message)
        if self._stt.loaded and self.settings.stt.engine == "whisper":
            await self._run(self._stt_pool, self._warm_stt)
        if self._tts.loaded and self.settings.tts.engine == "piper":
            await self._run(self._tts_pool, self._synthesize, "Ready.", None)
        try:
            await self._run(self._vad_pool, self._vad.get)
        except VoiceError as exc:
            log.warning("voice: %s", exc.message)

    # ------------------------------------------------------------ speech to text

    async def transcribe(
        self,
        data: bytes | None,
        fmt: str | None = None,
        sample_rate: int | None = None,
        language: str | None = None,
        samples: np.ndarray | None = None,
        checked: bool = False,
    ) -> Transcript:
        """Audio bytes (or already decoded 16 kHz samples) → a checked transcript.
        `checked`: the samples are an utterance the VAD already heard as speech."""
        return await self._run(
            self._stt_pool, self._transcribe, data, fmt, sample_rate, language, samples, checked
        )

    def _transcribe(
        self,
        data: bytes | None,
        fmt: str | None,
        sample_rate: int | None,
        language: str | None,
        samples: np.ndarray | None,
        checked: bool,
    ) -> Transcript:
        from .decode import decode
        from .stt import check_transcript

        # Bad audio is refused before any model is loaded; audio over the limit while it is
        # decoded (a small compressed file can decode to gigabytes).
        limit = self.settings.max_audio_seconds
        if samples is None:
            samples = decode(data or b"", fmt, sample_rate, max_samples=limit * 16_000)
        seconds = samples.size / 16_000
        if seconds > limit:
            raise TranscriptionFailed(f"The audio is {seconds:.0f} s long; the limit is {limit} s")
        if seconds < 0.1:
            raise TranscriptionFailed("The audio is too short to hold speech")
        if not checked:
            vad: SileroVad = self._vad.get()
            if not vad.has_speech(
                samples, self.settings.min_speech_ms, self.settings.vad_threshold
            ):
                raise TranscriptionFailed("No speech was detected in the audio (silence or noise)")
        engine: SpeechToText = self._stt.get()
        return check_transcript(engine.transcribe(samples, language))

    # ------------------------------------------------------------ text to speech

    async def synthesize(self, text: str, voice: str | None = None) -> Speech:
        return await self._run(self._tts_pool, self._synthesize, text, voice)

    def _synthesize(self, text: str, voice: str | None) -> Speech:
        engine: TextToSpeech = self._tts.get()
        return engine.synthesize(text, voice)

    async def synthesize_as(self, text: str, voice: str | None, fmt: str) -> tuple[bytes, str]:
        """Speech encoded as `fmt` (wav, pcm16, mp3, ogg) → (bytes, content type)."""
        return await self._run(self._tts_pool, self._synthesize_as, text, voice, fmt)

    def _synthesize_as(self, text: str, voice: str | None, fmt: str) -> tuple[bytes, str]:
        from .decode import encode

        speech = self._synthesize(text, voice)
        return encode(speech.pcm16, speech.sample_rate, fmt)

    async def voices(self) -> list[dict[str, Any]]:
        engine: TextToSpeech = await self._run(self._tts_pool, self._tts.get)
        return engine.voices()

    # ------------------------------------------------------------ voice activity

    async def vad(self) -> SileroVad:
        vad: SileroVad = await self._run(self._vad_pool, self._vad.get)
        return vad

    async def in_vad_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(self._vad_pool, fn, *args)

    def reply_speaker(
        self,
        publish: Callable[[ServerEvent], None],
        voice: str | None,
        stopped: Callable[[], bool],
    ) -> SpokenReply:
        """The runner's hook for spoken replies (see speaker.py)."""
        from .speaker import SpokenReply

        return SpokenReply(self, publish, voice, stopped)

    def status(self) -> dict[str, Any]:
        return {
            "stt": {"engine": self.settings.stt.engine, "loaded": self._stt.loaded},
            "tts": {"engine": self.settings.tts.engine, "loaded": self._tts.loaded},
            "vad": {"loaded": self._vad.loaded},
            "autoSpeak": self.settings.auto_speak,
        }

    def close(self) -> None:
        for pool in (self._stt_pool, self._tts_pool, self._vad_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def audio_frame(speech: Speech, text: str, index: int | None = None) -> AudioEvent:
    """An `audio` frame: the speech as base64 WAV (`index`: a spoken reply's sentence)."""
    from .decode import to_wav

    frame: AudioEvent = {
        "type": "audio",
        "data": base64.b64encode(to_wav(speech.pcm16, speech.sample_rate)).decode("ascii"),
        "format": "wav",
        "sampleRate": speech.sample_rate,
        "durationMs": speech.duration_ms,
    }
    if index is not None:
        frame["index"] = index
    frame["text"] = text
    return frame
