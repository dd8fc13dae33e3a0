"""Spoken replies: the answer is spoken sentence by sentence while it streams.

The turn runner feeds every clean text piece of the answer to a `SpokenReply`; complete
sentences are synthesised one after the other (in the TTS thread) and published as `audio`
session events with the sentence `index`, so they carry `seq`/`turnId` and are replayed by
`resume` like every other event. The runner awaits `finish` before `done`, so every `audio`
event of a turn precedes its `done`. A `stop` drops the sentences not yet spoken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .errors import VoiceError
from .sentences import SentenceSplitter

if TYPE_CHECKING:
    from ..protocol import ServerEvent
    from .tts import Speech


class Synthesizer(Protocol):
    """What a spoken reply needs of the speech engines (engines.py's VoiceEngines)."""

    async def synthesize(self, text: str, voice: str | None, key: str) -> Speech: ...


log = logging.getLogger("prismd.voice")


class SpokenReply:
    def __init__(
        self,
        engines: Synthesizer,
        publish: Callable[[ServerEvent], None],
        voice: str | None,
        stopped: Callable[[], bool],
        key: str,
    ) -> None:
        self.engines = engines
        self.key = key  # its share of the TTS thread
        self.publish = publish
        self.voice = voice
        self.stopped = stopped
        self.splitter = SentenceSplitter()
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self.spoken: list[str] = []  # sentences published as audio, in order
        self._worker = asyncio.create_task(self._work(), name="spoken reply")

    def feed(self, text: str) -> None:
        for sentence in self.splitter.feed(text):
            self.sentences.put_nowait(sentence)

    async def finish(self, stopped: bool) -> None:
        """Speak what is left (or, after a stop, drop it); returns when all audio is out."""
        if stopped or self.stopped():
            await self.cancel()
            return
        for sentence in self.splitter.flush():
            self.sentences.put_nowait(sentence)
        self.sentences.put_nowait(None)
        await self._worker

    async def cancel(self) -> None:
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        index = 0
        while True:
            sentence = await self.sentences.get()
            if sentence is None or self.stopped():
                return
            try:
                speech = await self.engines.synthesize(sentence, self.voice, self.key)
            except VoiceError as exc:
                # Not an `error` (that would end the turn for clients): the answer goes on as
                # text, and clients learn why it is not spoken.
                self.publish({"type": "speech_error", "code": exc.code.value, "error": exc.message})
                return
            if self.stopped():
                return
            self.publish(speech.frame(sentence, index))
            self.spoken.append(sentence)
            index += 1
