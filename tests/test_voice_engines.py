"""The alternative engines (OpenAI-compatible speech endpoints, against a real HTTP fake),
engines that cannot load, and voice's lazy imports."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import wave
from io import BytesIO

import httpx
import pytest

from prismd.testing.fake_models import Reply
from prismd.testing.fake_voice import FakeVoiceServer

from .conftest import of_type, openai_env
from .voice_fixtures import HAVE_ESPEAK, espeak_wav

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def fake_voice():
    with FakeVoiceServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def speech() -> bytes:
    return espeak_wav("Turn off the lights in the kitchen.")


def openai_voice_config(fake: FakeVoiceServer) -> str:
    return f"""
[voice.stt]
engine = "openai"
base_url = "{fake.url}"
api_key = "stt-key"
openai_model = "whisper-large-v3"

[voice.tts]
engine = "openai"
base_url = "{fake.url}"
api_key = "tts-key"
openai_model = "tts-1-hd"
voice_map = {{ narrator = "onyx" }}
"""


def test_openai_compatible_engines(make_server, fake_openai, fake_voice, speech):
    fake_voice.reset()
    srv = make_server(openai_env(fake_openai), openai_voice_config(fake_voice))
    r = httpx.post(
        f"{srv.url}/api/voice/transcribe",
        files={"audio": ("a.wav", speech)},
        data={"language": "en"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == fake_voice.transcript
    sent = fake_voice.requests[-1]
    assert sent["fields"]["model"] == "whisper-large-v3" and sent["fields"]["language"] == "en"
    assert sent["audio"][:4] == b"RIFF" and sent["auth"] == "Bearer stt-key"

    fake_openai.script(Reply(text=["Done. ", "The lights are off."]))
    fake_voice.transcript = "turn off the lights"
    with srv.client() as c:
        c.send(type="audio_chunk", data=base64.b64encode(speech).decode())
        c.send(type="audio_end", speak=True, voice="narrator")
        frames = c.until_turn_end(timeout=30)
        assert of_type(frames, "transcribed")[0]["text"] == "turn off the lights"
        audio = of_type(frames, "audio")
        assert [a["index"] for a in audio] == [0, 1] and audio[0]["sampleRate"] == 24_000
        with wave.open(BytesIO(base64.b64decode(audio[0]["data"]))) as w:
            assert w.getframerate() == 24_000 and w.getnframes() == 12_000
        speech_calls = [q["json"] for q in fake_voice.requests if "json" in q]
        assert [q["input"] for q in speech_calls] == ["Done.", "The lights are off."]
        assert {q["voice"] for q in speech_calls} == {"onyx"}
        assert {q["model"] for q in speech_calls} == {"tts-1-hd"}
        assert {q["response_format"] for q in speech_calls} == {"pcm"}

        c.send(type="speak", text="Hi", voice="alloy")
        assert c.recv(timeout=30)["type"] == "audio"
        assert fake_voice.requests[-1]["json"]["voice"] == "alloy"

        fake_voice.status = 500
        c.send(type="speak", text="Hi")
        assert c.recv(timeout=30)["code"] == "tts_unavailable"
        c.send(type="audio_chunk", data=base64.b64encode(speech).decode())
        c.send(type="audio_end")
        assert c.recv(timeout=30)["code"] == "stt_unavailable"
    assert srv.get("/api/voice/voices").json()["engine"] == "openai"


def test_engines_that_cannot_load_answer_unavailable(make_server, fake_openai, speech, tmp_path):
    config = f"""
[voice.stt]
model = "{tmp_path}/no-such-model"

[voice.tts]
voice = "{tmp_path}/no-such-voice.onnx"
"""
    srv = make_server(openai_env(fake_openai), config)
    with srv.client() as c:
        c.send(type="audio_chunk", data=base64.b64encode(speech).decode())
        c.send(type="audio_end")
        err = c.recv(timeout=30)
        assert err["code"] == "stt_unavailable" and "no-such-model" in err["error"]
        c.send(type="speak", text="Hello")
        err = c.recv(timeout=30)
        assert err["code"] == "tts_unavailable" and "no-such-voice" in err["error"]
        # Spoken replies: the answer still arrives as text, with a speech_error event.
        fake_openai.script(Reply(text=["Fine. ", "Thanks."]))
        frames = c.turn(message="hi", speak=True)
        assert of_type(frames, "speech_error")[0]["code"] == "tts_unavailable"
        assert of_type(frames, "done")[0]["finalContent"] == "Fine. Thanks."
        c.send(type="ping")
        assert c.recv()["type"] == "pong"
    r = httpx.post(f"{srv.url}/api/voice/synthesize", json={"text": "Hello"}, timeout=30)
    assert r.status_code == 503 and r.json()["code"] == "tts_unavailable"


def test_voice_libraries_are_imported_only_when_used(tmp_path):
    """An idle server pays nothing for voice: building the app imports none of the heavy
    libraries (their memory would show in every server's idle RSS)."""
    code = f"""
import json, sys
from prismd.config import load_settings
from prismd.server.app import create_app
create_app(load_settings(env={{"PRISMD_HOME": {str(tmp_path)!r}}}), probe_ollama=False)
heavy = ["numpy", "av", "onnxruntime", "faster_whisper", "ctranslate2", "piper", "torch"]
print(json.dumps([m for m in heavy if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
