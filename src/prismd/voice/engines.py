"""The voice engines of one server: loaded lazily, once, and run in their own threads.

Loading a model and every transcription, synthesis, decoding and VAD pass happen in the
threads of three `FairExecutor`s (CTranslate2 and onnxruntime release the GIL while they
compute), so the event loop keeps serving every other session at full speed; each thread is
shared fairly between users, and every request holds a `Ticket` within the user's bounds
(scheduler.py). Nothing heavy is imported until first use.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .decode import SAMPLE_RATE, pad
from .errors import SttUnavailable, TranscriptionFailed, TtsUnavailable, VoiceError, no_speech
from .scheduler import FairExecutor, SpeechLimits, Ticket
from .stt import Transcript, check_transcript

if TYPE_CHECKING:
    import numpy as np

    from ..config import VoiceSettings
    from ..protocol import ServerEvent
    from .recording import Recording
    from .speaker import SpokenReply
    from .stt import SpeechToText
    from .tts import Speech, TextToSpeech
    from .vad import EndpointConfig, Segmenter, SileroVad

log = logging.getLogger("prismd.voice")
T = TypeVar("T")
RATE = SAMPLE_RATE
WHOLE_S = 28  # audio up to this long is transcribed in one Whisper window
MAX_SEGMENT_S = 25  # longer audio is cut into segments of at most this
# Push-to-talk segments: (length, pause) in ms, see `segment_config`.
SPLITS = ((3500, 128), (6000, 96))
SERVER_KEY = "prismd"  # the server's own work (loading, warming up)


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
        # sentence of a spoken reply; decoding and VAD (the stream work) have their own so
        # hands-free frames and arriving recordings never wait for a transcription. Each is
        # shared fairly between users (scheduler.py).
        self.stt_pool = FairExecutor("stt")
        self.tts_pool = FairExecutor("tts")
        self.stream_pool = FairExecutor("vad")
        self.limits = SpeechLimits(self.stt_pool, settings)
        self._stt = _Lazy(self._build_stt)
        self._tts = _Lazy(self._build_tts)
        self._vad = _Lazy(self._build_vad)
        self._replies = itertools.count()

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

    async def preload(self) -> None:
        """Load every engine now (voice.preload), logging what is unavailable."""
        for lazy, pool in ((self._stt, self.stt_pool), (self._tts, self.tts_pool)):
            try:
                await pool.run(SERVER_KEY, lazy.get)
            except VoiceError as exc:
                log.warning("voice: %s", exc.message)
        if self._stt.loaded and self.settings.stt.engine == "whisper":
            await self.stt_pool.run(SERVER_KEY, self._warm_stt)
        if self._tts.loaded and self.settings.tts.engine == "piper":
            await self.tts_pool.run(SERVER_KEY, self._synthesize, "Ready.", None)
        try:
            await self.stream_pool.run(SERVER_KEY, self._vad.get)
        except VoiceError as exc:
            log.warning("voice: %s", exc.message)

    # ------------------------------------------------------------ speech to text

    def ticket(self, user: str, what: str, kind: str = "stt") -> Ticket:
        """A request of `user` for speech work (rate_limited past the user's bounds)."""
        return self.limits.open(user, what, kind)

    @property
    def incremental(self) -> bool:
        """Whether push-to-talk recordings are transcribed while they arrive."""
        return self.settings.incremental and self.settings.stt.engine == "whisper"

    def recording(self, ticket: Ticket, fmt: str | None, sample_rate: int | None) -> Recording:
        from .recording import Recording

        return Recording(self, ticket, fmt, sample_rate)

    async def transcribe(
        self,
        ticket: Ticket,
        data: bytes,
        fmt: str | None = None,
        sample_rate: int | None = None,
        language: str | None = None,
    ) -> Transcript:
        """Audio bytes → a checked transcript (REST, and recordings not transcribed as they
        arrived). Bad audio is refused before any model is loaded. The bytes count against
        the user's and the server's recorded-audio budgets until they are decoded."""
        self.limits.hold(ticket, len(data))
        try:
            samples = await ticket.run(self.stream_pool, self._decode, data, fmt, sample_rate)
        finally:
            self.limits.drop_audio(ticket)
        return await self.transcribe_samples(ticket, samples, language)

    def _decode(self, data: bytes, fmt: str | None, sample_rate: int | None) -> np.ndarray:
        from .decode import decode

        # Audio over the limit is refused while it is decoded (a small compressed file can
        # decode to gigabytes).
        samples = decode(data, fmt, sample_rate, max_samples=self.settings.max_audio_seconds * RATE)
        self.check_length(samples.size)
        return samples

    def check_length(self, size: int) -> None:
        seconds, limit = size / RATE, self.settings.max_audio_seconds
        if seconds > limit:
            raise TranscriptionFailed(f"The audio is {seconds:.0f} s long; the limit is {limit} s")
        if seconds < 0.1:
            raise TranscriptionFailed("The audio is too short to hold speech")

    async def transcribe_samples(
        self,
        ticket: Ticket,
        samples: np.ndarray,
        language: str | None = None,
        checked: bool = False,
    ) -> Transcript:
        """16 kHz samples → a checked transcript. `checked`: an utterance the VAD already heard
        as speech. Audio longer than one Whisper window is cut into segments at its pauses, one
        job each, so that other users' speech is served between them."""
        if not checked or samples.size > WHOLE_S * RATE:
            parts = await ticket.run(self.stream_pool, self._cut, samples, checked)
        else:
            parts = [(0, samples)]
        self.limits.check_queue(ticket, sum(part.size for _, part in parts) / RATE)
        futures = [
            (start, self.submit_segment(ticket, part, language, False)) for start, part in parts
        ]
        try:
            done = [(start / RATE, await future) for start, future in futures]
        finally:
            for _, future in futures:
                future.cancel()  # left after a failure
        return check_transcript(Transcript.join(done, samples.size / RATE))

    def _cut(self, samples: np.ndarray, checked: bool) -> list[tuple[int, np.ndarray]]:
        """(start, samples) of each segment to transcribe; refuses audio without speech."""
        vad: SileroVad = self._vad.get()
        settings = self.settings
        if samples.size <= WHOLE_S * RATE or self.settings.stt.engine != "whisper":
            if not checked and not vad.has_speech(
                samples, settings.min_speech_ms, settings.vad_threshold
            ):
                raise no_speech()
            return [(0, samples)]
        import numpy as np

        segmenter = self.segmenter()
        found = segmenter.feed(samples) + segmenter.flush()
        if segmenter.heard_ms < settings.min_speech_ms:
            raise no_speech()
        segments = [value for kind, value in found if kind == "segment"]
        if segments and found[-1][0] == "tail":  # silence after the last cut goes with it
            start, part, _ = segments[-1]
            segments[-1] = (start, np.concatenate([part, found[-1][1][1]]), False)
        return [(start, pad(part) if cut else part) for start, part, cut in segments]

    def segmenter(self) -> Segmenter:
        """A fresh segmenter (see `segment_config`); loads the VAD: call it in a worker."""
        from .vad import Segmenter

        vad: SileroVad = self._vad.get()
        return Segmenter(vad.stream(), self.segment_config())

    def segment_config(self) -> EndpointConfig:
        """Where push-to-talk recordings (and long uploads) are cut into segments: at a pause
        of 500 ms; of 128 ms once the segment is 3.5 s long, of 96 ms once it is 6 s long
        (the gaps between sentences, then between phrases); at the latest after 25 s (a
        Whisper window is 30 s). A segment ends after the pause that cut it, and 0.3 s of
        silence is added to it. A pause of 160 ms in a shorter segment starts its
        transcription speculatively (the recording may end there).

        Chosen on 20 sentences and 16 requests of 2-6 of them, each spoken by espeak-ng at
        two speeds and by Piper (108 recordings): against whole recordings, the word error
        rate is the same on sentences (0.114 against 0.112: one word) and lower on requests
        (0.109 against 0.124: a long window makes Whisper tiny stop early). Cutting shorter
        segments at shorter pauses cuts sentences at their commas, which costs accuracy."""
        from .vad import EndpointConfig

        return EndpointConfig(
            threshold=self.settings.vad_threshold,
            silence_ms=500,
            min_speech_ms=self.settings.min_speech_ms,
            max_utterance_ms=MAX_SEGMENT_S * 1000,
            pause_ms=160,
            splits=SPLITS,
            keep_short=True,
        )

    def submit_segment(
        self, ticket: Ticket, samples: np.ndarray, language: str | None, check: bool = True
    ) -> asyncio.Future[Transcript]:
        """Queue one segment's transcription (rate_limited past the user's queued seconds,
        unless the caller checked)."""
        seconds = samples.size / RATE
        if check:
            self.limits.check_queue(ticket, seconds)
        return ticket.submit(self.stt_pool, self._transcribe, samples, language, cost=seconds)

    def _transcribe(self, samples: np.ndarray, language: str | None) -> Transcript:
        engine: SpeechToText = self._stt.get()
        return engine.transcribe(samples, language)

    # ------------------------------------------------------------ text to speech

    async def synthesize(self, text: str, voice: str | None, key: str) -> Speech:
        """`key`: whose request (a user, or a spoken reply), for fair sharing."""
        return await self.tts_pool.run(key, self._synthesize, text, voice, cost=len(text) / 100)

    def _synthesize(self, text: str, voice: str | None) -> Speech:
        engine: TextToSpeech = self._tts.get()
        return engine.synthesize(text, voice)

    async def synthesize_as(
        self, ticket: Ticket, text: str, voice: str | None, fmt: str
    ) -> tuple[bytes, str]:
        """Speech encoded as `fmt` (wav, pcm16, mp3, ogg) → (bytes, content type). A long
        text is synthesised a few sentences per job, so other users' speech goes between."""
        from .decode import encode
        from .sentences import pieces

        parts = [
            ticket.submit(self.tts_pool, self._synthesize, piece, voice, cost=len(piece) / 100)
            for piece in pieces(text)
        ]
        speech = [await part for part in parts]
        pcm = b"".join(s.pcm16 for s in speech)
        return await ticket.run(self.stream_pool, encode, pcm, speech[0].sample_rate, fmt)

    async def voices(self) -> list[dict[str, Any]]:
        engine: TextToSpeech = await self.tts_pool.run(SERVER_KEY, self._tts.get)
        return engine.voices()

    # ------------------------------------------------------------ voice activity

    async def vad(self) -> SileroVad:
        vad: SileroVad = await self.stream_pool.run(SERVER_KEY, self._vad.get)
        return vad

    def reply_speaker(
        self,
        publish: Callable[[ServerEvent], None],
        voice: str | None,
        stopped: Callable[[], bool],
    ) -> SpokenReply:
        """The runner's hook for spoken replies (see speaker.py). Each reply is its own key
        in the fair share of the TTS thread (at most one sentence of it is queued at once)."""
        from .speaker import SpokenReply

        key = f"reply-{next(self._replies)}"
        return SpokenReply(self, publish, voice, stopped, key)

    def status(self) -> dict[str, Any]:
        return {
            "stt": {"engine": self.settings.stt.engine, "loaded": self._stt.loaded},
            "tts": {"engine": self.settings.tts.engine, "loaded": self._tts.loaded},
            "vad": {"loaded": self._vad.loaded},
            "autoSpeak": self.settings.auto_speak,
            "work": {
                "stt": self.stt_pool.status(),
                "tts": self.tts_pool.status(),
                "stream": self.stream_pool.status(),
                **self.limits.status(),
            },
        }

    def close(self) -> None:
        for pool in (self.stt_pool, self.tts_pool, self.stream_pool):
            pool.close()
