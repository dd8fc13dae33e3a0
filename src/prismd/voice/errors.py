"""Typed voice failures; each maps to one protocol error code."""

from __future__ import annotations

from ..protocol import ErrorCode


class VoiceError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
