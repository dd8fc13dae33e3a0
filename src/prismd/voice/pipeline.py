"""The voice side of one WebSocket connection: recordings, voice turns, `speak`, and
hands-free streaming.

A voice turn is an ordinary turn: the recording is transcribed off the event loop (while it
arrives: recording.py), then the text goes through the connection's `chat` path with a
`transcribed` event published first (a session event with the turn's id), so it is stored,
stoppable, one per session, and replayed by `resume`. In hands-free mode the server cuts the
PCM stream into utterances with VAD; an utterance that starts while the session's reply is
being spoken stops that turn (barge-in). Every request holds a `Ticket` of the user's (the
per-user bounds), cancelled when `stop` comes or the connection closes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol import (
    AudioChunk,
    AudioEnd,
    Chat,
    ErrorCode,
    ProtocolError,
    Speak,
    VoiceStream,
    error_frame,
)
from .errors import Cancelled, RecordingTooLarge, VoiceError

if TYPE_CHECKING:
    import numpy as np

    from ..config import VoiceSettings
    from ..protocol import ServerEvent, TranscribedEvent
    from ..sessions.service import Turn
    from .engines import VoiceEngines
    from .recording import Recording
    from .scheduler import Ticket
    from .stt import Transcript
    from .vad import Endpointer

log = logging.getLogger("prismd.voice")
MAX_SPEAK_CHARS = 10_000
MAX_PENDING_SPEAK = 4  # `speak` requests of one connection being synthesised at once
MAX_STREAM_FRAME = 256 * 1024  # bytes of PCM in one hands-free frame (2.7 s at 48 kHz)
STOPPING_WAIT_S = 3.0  # how long a new utterance waits for an interrupted turn to end


class VoiceHost(Protocol):
    """What the voice side needs of the connection it serves (server/ws.py's Connection):
    voice starts and interrupts turns through these, never through the socket's own code."""

    @property
    def user_id(self) -> str:
        """Whose speech work this is (fair sharing and bounds are per user)."""
        ...

    def send(self, frame: ServerEvent) -> None:
        """A frame to this connection alone."""
        ...

    def turn_of(self, session_id: str | None) -> Turn | None:
        """The running turn of the bound session, if `session_id` names it (or is None)."""
        ...

    async def voice_turn(self, chat: Chat, transcribed: TranscribedEvent) -> None:
        """Run `chat` as this connection's next turn, its `transcribed` event first; raises
        ProtocolError as a `chat` would be refused."""
        ...

    def interrupt(self) -> None:
        """Barge-in: stop the bound session's turn, keeping what was spoken of its answer."""
        ...


class ConnectionVoice:
    def __init__(self, host: VoiceHost, engines: VoiceEngines, settings: VoiceSettings) -> None:
        self.host = host
        self.engines = engines
        self.settings = settings
        self.recording: Recording | None = None
        # The recording in progress was refused (too large, over a bound, `stop`): its chunks
        # are ignored and its `audio_end` answers with this.
        self.refused: VoiceError | None = None
        self.transcribing: asyncio.Task[None] | None = None
        self.stops = 0  # `stop`s so far: a voice turn that sees one after it began never starts
        self.tasks: set[asyncio.Task[None]] = set()
        self.stream: HandsFree | None = None
        self.speaking: set[asyncio.Task[None]] = set()

    @property
    def streaming(self) -> bool:
        return self.stream is not None

    @property
    def user(self) -> str:
        return self.host.user_id

    def ticket(self, what: str, kind: str = "stt") -> Ticket:
        try:
            ticket: Ticket = self.engines.ticket(self.user, what, kind)
        except VoiceError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        return ticket

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _error(self, code: ErrorCode, message: str, **extra: Any) -> None:
        self.host.send(error_frame(code, message, **extra))

    def _require(self, code: ErrorCode) -> None:
        if not self.settings.enabled:
            what = "Speech-to-text" if code is ErrorCode.STT_UNAVAILABLE else "Text-to-speech"
            raise ProtocolError(code, f"{what} is disabled on this server (voice.enabled)")

    # ------------------------------------------------------------ recording

    async def chunk(self, msg: AudioChunk) -> None:
        self._require(ErrorCode.STT_UNAVAILABLE)
        try:
            data = base64.b64decode(msg.data, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                "Invalid `audio_chunk` message: data: not valid base64",
                {"field": "data", "reason": "not valid base64"},
            ) from None
        if self.stream is not None:
            await self.stream.feed(data)
            return
        if self.refused is not None or not data:
            return  # the recording was already refused; wait for its audio_end
        try:
            if self.recording is None:
                self.recording = self.engines.recording(
                    self.engines.ticket(self.user, "recording"), msg.format, msg.sampleRate
                )
            self.recording.add(data)
        except VoiceError as exc:
            self._refuse(exc)
            raise ProtocolError(exc.code, exc.message) from None

    def _refuse(self, error: VoiceError) -> None:
        """The recording in progress is discarded; its `audio_end` will say why."""
        recording, self.recording = self.recording, None
        if recording is not None:
            recording.fail(error)
        self.refused = error

    async def end(self, msg: AudioEnd) -> None:
        self._require(ErrorCode.STT_UNAVAILABLE)
        if self.stream is not None:
            # Hands-free: the client says the utterance is over (push-to-talk within a stream).
            if not await self.stream.end_utterance():
                raise ProtocolError(
                    ErrorCode.TRANSCRIPTION_FAILED, "No speech was heard before audio_end"
                )
            return
        refused, self.refused = self.refused, None
        if isinstance(refused, RecordingTooLarge):
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                "The recording exceeded the size limit and was discarded: nothing to transcribe",
            )
        if refused is not None:
            raise ProtocolError(
                refused.code, f"The recording was discarded: nothing to transcribe. {refused}"
            )
        recording, self.recording = self.recording, None
        if recording is None:
            raise ProtocolError(
                ErrorCode.TRANSCRIPTION_FAILED, "No audio was received before audio_end"
            )
        try:
            self._check_turn_free(msg.sessionId)
            if self.transcribing is not None and not self.transcribing.done():
                raise ProtocolError(
                    ErrorCode.TURN_IN_PROGRESS,
                    "A recording is already being transcribed — wait for its turn to start",
                )
        except ProtocolError:
            recording.cancel()
            raise
        chat = Chat(
            type="chat",
            sessionId=msg.sessionId,
            agentId=msg.agentId,
            model=msg.model,
            speak=msg.speak,
            voice=msg.voice,
        )
        language = msg.language
        task = self._spawn(self._voice_turn(chat, lambda: recording.finish(language)), "voice turn")
        # However the task ends (even cancelled before it began), the recording's work goes.
        task.add_done_callback(lambda _: recording.cancel())
        self.transcribing = task

    def _check_turn_free(self, session_id: str | None) -> None:
        if self.host.turn_of(session_id) is not None:
            raise ProtocolError(
                ErrorCode.TURN_IN_PROGRESS, "A turn is already in progress — wait for it to finish"
            )

    async def _voice_turn(
        self, chat: Chat, transcription: Callable[[], Awaitable[Transcript]]
    ) -> None:
        stops = self.stops
        try:
            transcript = await transcription()
        except Cancelled:
            return  # `stop` before the turn began
        except VoiceError as exc:
            self._error(exc.code, exc.message)
            return
        except asyncio.CancelledError:
            return  # `stop` before the turn began
        except Exception:  # noqa: BLE001
            log.exception("transcription failed")
            self._error(ErrorCode.INTERNAL, "Internal error during transcription")
            return
        if asyncio.current_task() is self.transcribing:
            self.transcribing = None
        chat.message = transcript.text
        event: TranscribedEvent = {
            "type": "transcribed",
            "text": transcript.text,
            "confidence": round(transcript.confidence, 3),
            "language": transcript.language,
            "durationMs": round(transcript.duration_s * 1000),
        }
        await self._wait_for_stopping_turn(chat.sessionId)
        if self.stops != stops:
            return  # `stop` came while it waited for the interrupted turn to end
        try:
            await self.host.voice_turn(chat, event)
        except ProtocolError as exc:
            self._error(exc.code, exc.message, details=exc.details)
        except Exception:  # noqa: BLE001
            log.exception("voice turn failed")
            self._error(ErrorCode.INTERNAL, "Internal server error")

    async def _wait_for_stopping_turn(self, session_id: str | None) -> None:
        """An interrupted turn (barge-in) ends within milliseconds: its task's end is awaited
        (at most STOPPING_WAIT_S) so that the new utterance's turn is not refused."""
        turn = self.host.turn_of(session_id)
        if turn is not None and turn.stop_requested and turn.task is not None:
            await asyncio.wait({turn.task}, timeout=STOPPING_WAIT_S)

    def cancel_transcription(self) -> None:
        """`stop`: a recording in progress is discarded, and a voice turn not begun yet never
        begins."""
        self.stops += 1
        if self.recording is not None:
            self._refuse(Cancelled("`stop` came while recording"))
        task, self.transcribing = self.transcribing, None
        if task is not None and not task.done():
            task.cancel()

    # ------------------------------------------------------------ speak

    async def speak(self, msg: Speak) -> None:
        self._require(ErrorCode.TTS_UNAVAILABLE)
        text = msg.text.strip()
        if not text:
            raise ProtocolError(ErrorCode.EMPTY_MESSAGE, "Nothing to speak: `text` is empty")
        if len(text) > MAX_SPEAK_CHARS:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`speak` text of {len(text)} characters exceeds {MAX_SPEAK_CHARS}",
            )
        self.speaking = {t for t in self.speaking if not t.done()}
        if len(self.speaking) >= MAX_PENDING_SPEAK:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"{MAX_PENDING_SPEAK} `speak` requests are already being synthesised; "
                "wait for their audio",
            )
        ticket = self.ticket("speak", "tts")
        task = self._spawn(self._speak(text, msg.voice), "speak")
        task.add_done_callback(lambda _: ticket.close())
        self.speaking.add(task)

    async def _speak(self, text: str, voice: str | None) -> None:
        try:
            speech = await self.engines.synthesize(text, voice, self.user)
        except VoiceError as exc:
            self._error(exc.code, exc.message)
            return
        self.host.send(speech.frame(text))

    # ------------------------------------------------------------ hands-free

    async def voice_stream(self, msg: VoiceStream) -> None:
        if msg.action == "stop":
            stream, self.stream = self.stream, None
            if stream is not None:
                await stream.close()
            self.host.send({"type": "voice_stream", "action": "stopped", "active": False})
            return
        self._require(ErrorCode.STT_UNAVAILABLE)
        try:
            vad = await self.engines.vad()
        except VoiceError as exc:
            raise ProtocolError(ErrorCode.STT_UNAVAILABLE, exc.message) from None
        if self.stream is not None:
            await self.stream.close(flush=False)
            self.stream = None
        settings = self.settings
        from .vad import EndpointConfig, Endpointer

        silence_ms = msg.silenceMs or settings.silence_ms
        config = EndpointConfig(
            threshold=settings.vad_threshold,
            silence_ms=silence_ms,
            min_speech_ms=settings.min_speech_ms,
            # Transcribe speculatively halfway through the silence that ends an utterance:
            # if the user does not speak again, the transcript is (almost) ready when it ends.
            pause_ms=max(160, silence_ms // 2) if settings.speculative else 0,
        )
        ticket = self.ticket("hands-free stream")
        self.stream = HandsFree(self, msg, Endpointer(vad.stream(), config), ticket)
        self.host.send(
            {
                "type": "voice_stream",
                "action": "started",
                "active": True,
                "format": "pcm16",
                "sampleRate": msg.sampleRate,
                "silenceMs": config.silence_ms,
            }
        )

    async def binary(self, data: bytes) -> None:
        if self.stream is not None:
            await self.stream.feed(data)

    def _check_frame(self, size: int) -> None:
        if size > MAX_STREAM_FRAME:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"A hands-free frame of {size} bytes exceeds {MAX_STREAM_FRAME} bytes: send "
                "PCM in frames of 20-100 ms",
            )

    async def close(self) -> None:
        """The connection closed: every request of it is cancelled."""
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close(flush=False)
        if self.recording is not None:
            self._refuse(Cancelled("The connection closed"))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class HandsFree:
    """One hands-free stream: PCM16 frames → VAD endpointing → voice turns."""

    def __init__(
        self, owner: ConnectionVoice, msg: VoiceStream, endpointer: Endpointer, ticket: Ticket
    ) -> None:
        self.owner = owner
        self.msg = msg
        self.endpointer = endpointer
        self.ticket = ticket
        self.rate = msg.sampleRate
        self._odd = b""
        self._speculative: asyncio.Future[Transcript] | None = None

    async def feed(self, data: bytes) -> None:
        from .decode import pcm16_to_float

        self.owner._check_frame(len(data))
        data = self._odd + data
        cut = len(data) - len(data) % 2
        data, self._odd = data[:cut], data[cut:]
        if not data:
            return
        samples = pcm16_to_float(data, self.rate)
        engines = self.owner.engines
        events = await self.ticket.run(engines.stream_pool, self.endpointer.feed, samples)
        self.endpointer.spans.clear()  # where utterances lie: not needed here
        for kind, value in events:
            if kind == "speech":
                self._barge_in()
            elif kind == "pause":
                self._discard_speculative()
                self._speculative = asyncio.ensure_future(self._transcribe(value))
            elif kind == "resume":
                self._discard_speculative()
            elif kind == "utterance":
                pending, self._speculative = self._speculative, None
                self._utterance(value, pending)

    async def _transcribe(self, samples: np.ndarray) -> Transcript:
        engines = self.owner.engines
        transcript: Transcript = await engines.transcribe_samples(
            self.ticket, samples, checked=True
        )
        return transcript

    def _discard_speculative(self) -> None:
        """The user spoke again: that transcript is of half an utterance."""
        stale, self._speculative = self._speculative, None
        if stale is not None:
            stale.cancel()
            stale.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _barge_in(self) -> None:
        """The user speaks while the session's turn runs: stop it; the answer kept is the part
        that was spoken (meta.streamed holds what had streamed)."""
        self.owner.host.interrupt()

    def _utterance(
        self, samples: np.ndarray, pending: asyncio.Future[Transcript] | None = None
    ) -> None:
        msg = self.msg
        chat = Chat(
            type="chat",
            sessionId=msg.sessionId,
            agentId=msg.agentId,
            model=msg.model,
            speak=msg.speak,
            voice=msg.voice,
        )
        owner = self.owner
        transcription = (
            (lambda: pending) if pending is not None else lambda: self._transcribe(samples)
        )
        owner.transcribing = owner._spawn(owner._voice_turn(chat, transcription), "voice turn")

    async def end_utterance(self) -> bool:
        """End the utterance in progress now; False if there was none."""
        self._discard_speculative()
        rest = await self.ticket.run(self.owner.engines.stream_pool, self.endpointer.flush)
        self.endpointer.spans.clear()
        if rest is None:
            return False
        self._utterance(rest)
        return True

    async def close(self, flush: bool = True) -> None:
        """`flush`: the utterance in progress is still transcribed (its slot is freed now);
        else everything queued for this stream is dropped."""
        self._discard_speculative()
        if flush:
            try:
                await self.end_utterance()
            finally:
                self.ticket.close()
        else:
            self.ticket.cancel()
