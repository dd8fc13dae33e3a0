"""`/api/voice/*`: transcription, synthesis and the list of voices over REST.

The same engines as the WebSocket's voice messages (`core.voice`), loaded on first use, with
the same per-user bounds; a request whose client disconnects is cancelled (its queued work
is dropped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ..core import Prismd
from ..protocol import ErrorCode
from ..voice.errors import VoiceError
from ..voice.scheduler import Ticket

router = APIRouter(prefix="/api/voice", tags=["voice"])
T = TypeVar("T")

_STATUS = {
    ErrorCode.TRANSCRIPTION_FAILED: 422,
    ErrorCode.STT_UNAVAILABLE: 503,
    ErrorCode.TTS_UNAVAILABLE: 503,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.RATE_LIMITED: 429,
}


class ClientGone(Exception):
    """The HTTP client disconnected before the answer."""


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body was read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, ticket: Ticket, work: Awaitable[T]) -> T:
    """`work`, cancelled with its ticket's queued jobs if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            ticket.cancel()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone
        return task.result()
    finally:
        gone.cancel()
        if not task.done():  # this handler itself was cancelled
            ticket.cancel()
            task.cancel()


def _error(code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code.value}, status_code=_STATUS.get(code, 500))


def _core(request: Request) -> Prismd:
    core: Prismd = request.app.state.prismd
    return core


class SynthesizeIn(BaseModel):
    text: Annotated[str, Field(min_length=1, max_length=10_000)]
    voice: str | None = None
    format: Literal["wav", "pcm16", "mp3", "ogg", "opus"] = "mp3"  # CortexPrism's default


@router.post("/transcribe", summary="Speech to text")
async def transcribe(
    request: Request,
    audio: Annotated[UploadFile, File(description="WAV, Ogg/Opus, WebM/Opus or MP3")],
    language: Annotated[str | None, Form(max_length=16)] = None,
    format: Annotated[str | None, Form(description='"pcm16" for raw PCM')] = None,
    sampleRate: Annotated[int | None, Form(ge=4000, le=192_000)] = None,  # noqa: N803
) -> Any:
    core = _core(request)
    limit = core.settings.voice.max_audio_bytes
    try:
        # Before the upload is read into memory: a user over the bounds costs nothing more.
        ticket = core.voice.ticket(request.state.user.id, "transcription")
    except VoiceError as exc:
        return _error(exc.code, exc.message)
    try:
        data = await audio.read(limit + 1)
        if len(data) > limit:
            message = f"The audio exceeds the limit of {limit} bytes"
            return _error(ErrorCode.PAYLOAD_TOO_LARGE, message)
        work = core.voice.transcribe(ticket, data, format, sampleRate, language)
        del data
        transcript = await _unless_gone(request, ticket, work)
    except VoiceError as exc:
        return _error(exc.code, exc.message)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    finally:
        ticket.close()
    return transcript.as_dict()


@router.post("/synthesize", summary="Text to speech", response_class=Response)
async def synthesize(request: Request, body: SynthesizeIn) -> Response:
    core = _core(request)
    try:
        ticket = core.voice.ticket(request.state.user.id, "synthesis", "tts")
    except VoiceError as exc:
        return _error(exc.code, exc.message)
    try:
        work = core.voice.synthesize_as(ticket, body.text, body.voice, body.format)
        data, content_type = await _unless_gone(request, ticket, work)
    except VoiceError as exc:
        return _error(exc.code, exc.message)
    except ClientGone:
        return Response(status_code=499)
    finally:
        ticket.close()
    return Response(data, media_type=content_type)


@router.get("/voices", summary="The voices text-to-speech can use")
async def voices(request: Request) -> Any:
    core = _core(request)
    try:
        listed = await core.voice.voices()
    except VoiceError as exc:
        return _error(exc.code, exc.message)
    return {"engine": core.settings.voice.tts.engine, "default": "default", "voices": listed}


# OpenAI's voice names: a client may ask for them (voice.tts.voice_map, else the default voice).
OPENAI_VOICES = ["alloy", "echo", "fable", "onyx", "nova", "shimmer"]


@router.get("/providers", summary="The speech engines prismd can use (CortexPrism's shape)")
async def providers(request: Request) -> Any:
    voice = _core(request).settings.voice
    return {
        "sttProviders": ["whisper", "openai"],
        "ttsProviders": ["piper", "openai"],
        "openaiVoices": OPENAI_VOICES,
        "elevenLabsVoices": [],
        "sttEngine": voice.stt.engine,
        "ttsEngine": voice.tts.engine,
    }


@router.get("/status", summary="Which voice engines are configured and loaded")
async def status(request: Request) -> Any:
    return _core(request).voice.status()
