"""The voice side of a connection alone (no engines, no server): a voice turn against a fake
host, the VoiceHost interface the WebSocket connection implements."""

from __future__ import annotations

import asyncio
from typing import Any

from prismd.config import VoiceSettings
from prismd.protocol import Chat
from prismd.sessions.service import Turn
from prismd.voice.pipeline import ConnectionVoice
from prismd.voice.stt import Transcript

from .waiting import until


class Host:
    """A connection whose bound session has an interrupted turn still ending."""

    def __init__(self, stopping: Turn) -> None:
        self.stopping = stopping
        self.asked = 0
        self.turns: list[str] = []
        self.sent: list[dict[str, Any]] = []

    @property
    def user_id(self) -> str:
        return "alice"

    def send(self, frame: Any) -> None:
        self.sent.append(frame)

    def turn_of(self, session_id: str | None) -> Turn | None:
        self.asked += 1
        return None if self.stopping.task is None or self.stopping.task.done() else self.stopping

    async def voice_turn(self, chat: Chat, transcribed: Any) -> None:
        self.turns.append(chat.message)

    def interrupt(self) -> None:
        pass


def test_a_voice_turn_waits_for_the_interrupted_turn_and_a_stop_meanwhile_cancels_it():
    """A new utterance that arrives while the turn it interrupted is still ending waits for
    that turn's end, then starts; a `stop` while it waits means it never starts."""

    async def utterance(stop_while_waiting: bool) -> Host:
        ending = asyncio.Event()
        stopping = Turn(id="t_old", client_message_id=None, stop_requested=True)
        stopping.task = asyncio.create_task(ending.wait())
        host = Host(stopping)
        voice = ConnectionVoice(host, None, VoiceSettings())  # type: ignore[arg-type]

        async def transcription() -> Transcript:
            return Transcript("next question", 0.9, "en", 1.2)

        turn = asyncio.create_task(voice._voice_turn(Chat(type="chat"), transcription))
        await until(lambda: host.asked, "the voice turn to look at the running turn")
        assert not turn.done() and host.turns == []  # waiting for the interrupted turn
        if stop_while_waiting:
            voice.cancel_transcription()  # what `stop` calls
        ending.set()
        await turn
        return host

    async def main() -> None:
        assert (await utterance(stop_while_waiting=False)).turns == ["next question"]
        assert (await utterance(stop_while_waiting=True)).turns == []

    asyncio.run(main())
