"""Typed voice failures; each maps to one protocol error code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol import ErrorCode, PrismdError

if TYPE_CHECKING:
    import openai


class VoiceError(PrismdError):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)


class AudioDecodeError(VoiceError):
    """The bytes are not audio we can decode (or hold no samples)."""

    code = ErrorCode.TRANSCRIPTION_FAILED


class TranscriptionFailed(VoiceError):
    """Audio decoded, but there is nothing to transcribe (silence, noise, no words)."""

    code = ErrorCode.TRANSCRIPTION_FAILED


class SttUnavailable(VoiceError):
    code = ErrorCode.STT_UNAVAILABLE


class TtsUnavailable(VoiceError):
    code = ErrorCode.TTS_UNAVAILABLE


class SynthesisFailed(VoiceError):
    code = ErrorCode.TTS_UNAVAILABLE


class SpeechBusy(VoiceError):
    """A per-user or server bound was reached: this request is refused, nothing else."""

    code = ErrorCode.RATE_LIMITED


class RecordingTooLarge(VoiceError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Cancelled(VoiceError):
    """The request was cancelled (its connection closed, `stop`, or the HTTP client left)."""

    code = ErrorCode.TRANSCRIPTION_FAILED


def openai_client(
    settings: Any, unavailable: type[SttUnavailable | TtsUnavailable], section: str
) -> openai.OpenAI:
    """The SDK client of an OpenAI-compatible speech endpoint (`voice.stt` / `voice.tts`)."""
    import openai

    if not settings.base_url:
        raise unavailable(f"{section}.engine is 'openai' but {section}.base_url is not set")
    return openai.OpenAI(
        base_url=settings.base_url,
        api_key=settings.api_key or "none",
        timeout=settings.timeout_s,
        max_retries=1,
    )


def no_speech() -> TranscriptionFailed:
    return TranscriptionFailed("No speech was detected in the audio (silence or noise)")
