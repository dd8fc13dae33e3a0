"""A push-to-talk recording, transcribed while it arrives.

The `audio_chunk`s of a recording come in while the user speaks (a browser's MediaRecorder
sends one every 250 ms). Each pass decodes what has arrived (`decode.StreamDecoder`), feeds the
new samples to a `vad.Segmenter` (cut points as in `VoiceEngines.segment_config`) and queues
the transcription of every segment a pause has closed, at once; a pause that may end the
recording starts the open segment's transcription speculatively (dropped if the user speaks
on). At `audio_end` only the rest is decoded and only the last segment (if it was not ready)
is transcribed; the segments' transcripts are joined in order. Segments are contiguous: a
recording without a pause long enough to cut it is transcribed exactly as a whole one.

A recording that cannot be followed as it arrives (a container that cannot be read from its
beginning alone, a remote engine, a `language` other than the one its segments were
transcribed in) is transcribed whole at `audio_end`, as an upload is.

Passes run in the stream thread and transcriptions in the speech-to-text thread, under the
recording's `Ticket`: both are shared fairly with other users and dropped when it is
cancelled (`stop`, the connection closing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .decode import SAMPLE_RATE as RATE
from .decode import StreamDecoder, pad
from .errors import AudioDecodeError, Cancelled, RecordingTooLarge, VoiceError, no_speech
from .stt import Transcript, check_transcript

if TYPE_CHECKING:
    import numpy as np

    from .engines import VoiceEngines
    from .scheduler import Ticket
    from .vad import Segmenter

log = logging.getLogger("prismd.voice")
POLL_SHARE = 32  # a container is re-read when 1/32 of its bytes are new (PCM: every chunk)


class Recording:
    def __init__(
        self, engines: VoiceEngines, ticket: Ticket, fmt: str | None, sample_rate: int | None
    ) -> None:
        self.engines = engines
        self.ticket = ticket
        self.fmt, self.sample_rate = fmt, sample_rate
        settings = engines.settings
        self.decoder = StreamDecoder(fmt, sample_rate, settings.max_audio_seconds * RATE)
        self.language = settings.stt.language  # the language the segments are transcribed in
        self.segmenter: Segmenter | None = None
        self.parts: list[tuple[int, asyncio.Future[Transcript]]] = []  # (start, transcript)
        # The transcription started at a pause (samples, job), and the last cut segment's.
        self._speculative: tuple[np.ndarray, asyncio.Future[Transcript]] | None = None
        self._last: tuple[np.ndarray, asyncio.Future[Transcript]] | None = None
        self.error: BaseException | None = None
        self.whole = not engines.incremental  # transcribed whole at audio_end
        self._polled = 0  # bytes that had arrived when the latest pass began
        self._wake = asyncio.Event()
        self._ended = False
        self._pump = None if self.whole else asyncio.create_task(self._run(), name="recording")

    @property
    def size(self) -> int:
        return self.decoder.size

    def add(self, data: bytes) -> None:
        """A chunk arrived. Raises RecordingTooLarge or SpeechBusy: the recording is over."""
        limit = self.engines.settings.max_audio_bytes
        if self.decoder.size + len(data) > limit:
            raise RecordingTooLarge(
                f"The recording exceeds the limit of {limit} bytes: it was discarded"
            )
        self.engines.limits.hold(self.ticket, len(data))
        self.decoder.feed(data)
        new = self.decoder.size - self._polled
        if not self.whole and (self.decoder.kind == "pcm" or new * POLL_SHARE >= self.size):
            self._wake.set()

    # ------------------------------------------------------------ while it arrives

    async def _run(self) -> None:
        """Passes over what has arrived, one at a time, until the final one."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            final = self._ended
            self._polled = self.decoder.size
            try:
                events = await self.ticket.run(self.engines.stream_pool, self._advance, final)
                for kind, value in events:
                    self._on(kind, value)
            except AudioDecodeError as exc:
                # Not decodable as it arrives: the whole recording gets the final word.
                log.info("recording not decodable as it arrives (%s): whole at audio_end", exc)
                self._go_whole()
                return
            except Exception as exc:  # noqa: BLE001 - reported at audio_end
                self.error = exc
                self._drop_parts()
                return
            if final:
                return

    def _advance(self, final: bool) -> list[tuple[str, Any]]:
        """One pass, in the stream thread: decode what is new, cut it into segments."""
        engines = self.engines
        if self.segmenter is None:
            self.segmenter = engines.segmenter()
        segmenter = self.segmenter
        events = segmenter.feed(self.decoder.decode(final))
        if final:
            engines.check_length(self.decoder.samples)
            events += segmenter.flush()
            if segmenter.heard_ms < engines.settings.min_speech_ms:
                raise no_speech()
        return events

    def _on(self, kind: str, value: Any) -> None:
        if kind == "pause":  # the recording may end here: transcribe what it has so far
            self._discard_speculative()
            self._speculative = (value, self._submit(value))
        elif kind == "resume":  # it did not: that transcript is of half a segment
            self._discard_speculative()
        elif kind == "segment":
            start, samples, cut = value
            guess, self._speculative = self._speculative, None
            # After a pause the segment only grew by silence: the guess is it, for a cut
            # segment, and for the last one unless the guess has not started yet (then the
            # last segment is transcribed to the end, as a whole recording would be).
            if guess is not None and (cut or not self._withdraw(guess[1])):
                future = guess[1]
            else:
                future = self._submit(pad(samples) if cut else samples)
            self.parts.append((start, future))
            self._last = (samples, future) if cut else None
        elif kind == "tail" and self._last is not None:
            # Only silence after the last cut: if that segment's transcription has not
            # started, it is transcribed to the end of the recording instead.
            samples, future = self._last
            if self._withdraw(future):
                import numpy as np

                start = self.parts[-1][0]
                self.parts[-1] = (start, self._submit(np.concatenate([samples, value[1]])))

    def _withdraw(self, future: asyncio.Future[Transcript]) -> bool:
        return self.engines.stt_pool.withdraw(future)

    def _submit(self, samples: np.ndarray) -> asyncio.Future[Transcript]:
        return self.engines.submit_segment(self.ticket, samples, self.language)

    def _discard_speculative(self) -> None:
        stale, self._speculative = self._speculative, None
        if stale is not None:
            stale[1].cancel()

    def _drop_parts(self) -> None:
        self._discard_speculative()
        for _, future in self.parts:
            future.cancel()
        self.parts = []

    def _go_whole(self) -> None:
        self._drop_parts()
        self.whole = True

    # ------------------------------------------------------------ audio_end

    async def finish(self, language: str | None = None) -> Transcript:
        """`audio_end`: the transcript of the whole recording."""
        try:
            if self.error is None and self._pump is not None:
                self._ended = True
                self._wake.set()
                await self._pump
            if self.error is not None:
                raise self.error
            if language and language != self.language and not self.whole:
                self._go_whole()  # its segments were transcribed in another language
            if self.whole:
                data = b"".join(self.decoder.chunks)
                self._release_audio()
                return await self.engines.transcribe(
                    self.ticket, data, self.fmt, self.sample_rate, language
                )
            self._release_audio()
            done = [(start / RATE, await future) for start, future in self.parts]
            return check_transcript(Transcript.join(done, self.decoder.samples / RATE))
        finally:
            self.ticket.cancel()  # whatever is left (nothing, unless this was cancelled)
            self._release_audio()

    def cancel(self) -> None:
        """The requester went (`stop`, the connection closed): nothing more is done."""
        if self.error is None:
            self.error = Cancelled("The recording was cancelled")
        self.ticket.cancel()
        if self._pump is not None:
            self._pump.cancel()
        self._release_audio()

    def fail(self, error: VoiceError) -> None:
        """A bound was passed while it arrived: the rest is ignored, `audio_end` says why."""
        self.error = error
        self.cancel()

    def _release_audio(self) -> None:
        # Rebound, not cleared: a pass still running in the stream thread keeps its view.
        self.decoder.chunks = []
        self.engines.limits.drop_audio(self.ticket)

    @property
    def failed(self) -> bool:
        return self.error is not None
