"""Voice over the WebSocket and REST, against the real engines (faster-whisper tiny.en,
Piper, Silero VAD) loaded once by one prismd for the whole module.

Speech is made here: espeak-ng (Debian) and Piper itself (through /api/voice/synthesize).
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import httpx
import pytest

from prismd.testing.fake_models import Reply

from .conftest import PrismdServer, of_type, openai_env, text_of
from .voice_fixtures import (
    HAVE_ESPEAK,
    SENTENCES,
    chunks,
    encode,
    espeak_wav,
    hello_wav,
    noise_wav,
    pcm16,
    silence_wav,
    wer,
)
from .waiting import wait_for

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")

FIXTURES = Path(__file__).parent / "fixtures"
VOICE_CONFIG = """
[voice]
preload = true
"""
QUESTION = "What is the capital of France?"
ANSWER = [
    "Paris is the capital ",
    "of France. ",
    "It is known ",
    "for the Eiffel Tower. ",
    "Ask me more!",
]


@pytest.fixture(scope="module")
def voice_server(tmp_path_factory, fake_openai):
    srv = PrismdServer(tmp_path_factory.mktemp("voice"), openai_env(fake_openai), VOICE_CONFIG)
    srv.start()
    # Wait for the preloaded engines (the first request would load them anyway).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = srv.get("/api/voice/status").json()
        if status["stt"]["loaded"] and status["tts"]["loaded"] and status["vad"]["loaded"]:
            break
        time.sleep(0.2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def question_wav() -> bytes:
    return espeak_wav(QUESTION, rate=48_000)


def piper_wav(server: PrismdServer, text: str) -> bytes:
    body = {"text": text, "format": "wav"}  # the default is mp3, as in CortexPrism
    r = httpx.post(f"{server.url}/api/voice/synthesize", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
    return r.content


def send_recording(c, data: bytes, pieces: int = 1, **end) -> None:
    for piece in chunks(data, pieces):
        c.send(type="audio_chunk", data=piece, format="webm", session=True)
    c.send(type="audio_end", session=True, **end)


# ---------------------------------------------------------------- accuracy


def test_transcription_word_error_rate_is_bounded(voice_server):
    """espeak-ng's robotic voice and Piper's natural one, through REST transcribe."""
    errors = {}
    for source in ("espeak", "piper"):
        total = 0.0
        for text in SENTENCES:
            wav = espeak_wav(text) if source == "espeak" else piper_wav(voice_server, text)
            r = httpx.post(
                f"{voice_server.url}/api/voice/transcribe",
                files={"audio": ("speech.wav", wav, "audio/wav")},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) >= {"text", "confidence", "language", "segments"}
            total += wer(text, body["text"])
        errors[source] = total / len(SENTENCES)
    assert errors["piper"] <= 0.15, errors
    assert errors["espeak"] <= 0.35, errors


# ---------------------------------------------------------------- voice turns


def test_push_to_talk_is_transcribed_while_the_recording_arrives(voice_server, fake_openai):
    """A recording of several sentences: its first segments are transcribed before audio_end
    (the speech-to-text thread's count of finished jobs grows while the chunks still come)."""
    fake_openai.script(Reply(text=["Noted."]))
    text = " ".join(SENTENCES[1:4])
    pcm = pcm16(espeak_wav(text), 16_000)
    cut = len(pcm) * 3 // 4 // 2 * 2
    before = voice_server.get("/api/voice/status").json()["work"]["stt"]["done"]
    with voice_server.client() as c:
        for piece in chunks(pcm[:cut], 12):
            c.send(type="audio_chunk", data=piece, format="pcm16", sampleRate=16_000)
        wait_for(
            lambda: voice_server.get("/api/voice/status").json()["work"]["stt"]["done"] > before,
            "a segment transcribed before audio_end",
            60,
        )
        for piece in chunks(pcm[cut:], 4):
            c.send(type="audio_chunk", data=piece, format="pcm16", sampleRate=16_000)
        c.send(type="audio_end")
        frames = c.until_turn_end(timeout=60)
    transcribed = of_type(frames, "transcribed")[0]
    assert wer(text, transcribed["text"]) <= 0.2, transcribed
    assert abs(transcribed["durationMs"] - len(pcm) / 32) < 100


def test_voice_turn_end_to_end_webm_in_chunks(voice_server, fake_openai, question_wav):
    """MediaRecorder-style WebM/Opus in several chunks → transcribed → an ordinary turn with
    spoken sentences, all before done; stored and replayable."""
    fake_openai.script(Reply(text=ANSWER, delay_s=0.05))
    webm = encode(question_wav, "webm", "libopus")
    with voice_server.client() as c:
        send_recording(c, webm, pieces=5, speak=True)
        frames = c.until_turn_end(timeout=60)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "session"
    transcribed = of_type(frames, "transcribed")[0]
    assert wer(QUESTION, transcribed["text"]) <= 0.34, transcribed
    assert 0 < transcribed["confidence"] <= 1
    assert kinds.index("transcribed") < kinds.index("start") < kinds.index("chunk")
    start = of_type(frames, "start")[0]
    assert transcribed["turnId"] == start["turnId"] and transcribed["seq"] == start["seq"] - 1
    audio = of_type(frames, "audio")
    assert [a["index"] for a in audio] == list(range(len(audio))) and len(audio) >= 3
    assert all(a["format"] == "wav" and a["turnId"] == start["turnId"] for a in audio)
    assert base64.b64decode(audio[0]["data"])[:4] == b"RIFF"
    assert audio[0]["text"] == "Paris is the capital of France."
    assert kinds.index("audio") < kinds.index("done")
    assert max(i for i, k in enumerate(kinds) if k == "audio") < kinds.index("done")
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The model saw the transcript as the user message, and the turn is in the history.
    assert fake_openai.requests[-1]["messages"][-1]["content"] == transcribed["text"]
    sid = start["sessionId"]
    msgs = voice_server.get(f"/api/sessions/{sid}/messages").json()
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] == transcribed["text"]
    # A reload replays the voice turn, audio included.
    with voice_server.client() as r:
        r.send(type="resume", sessionId=sid, lastSeq=transcribed["seq"] - 1)
        assert r.recv()["type"] == "session"
        replay = r.until("context_usage")
    assert [f["seq"] for f in replay] == seqs
    assert len(of_type(replay, "audio")) == len(audio)


def test_first_spoken_sentence_arrives_long_before_done(voice_server, fake_openai):
    """A slow answer: the first `audio` comes while the text is still streaming."""
    pieces = ["One short sentence. ", "And ", "then ", "a ", "few ", "more ", "words."]
    fake_openai.script(Reply(text=pieces, delay_s=0.4))
    with voice_server.client() as c:
        c.send(type="chat", message="talk", speak=True)
        frames, stamps = [], []
        while True:
            frames.append(c.recv(timeout=30))
            stamps.append(time.monotonic())
            if frames[-1]["type"] == "context_usage":
                break
    kinds = [f["type"] for f in frames]
    first_audio, done = kinds.index("audio"), kinds.index("done")
    assert stamps[done] - stamps[first_audio] > 1.0, kinds
    assert of_type(frames, "audio")[0]["text"] == "One short sentence."


def test_stop_during_a_voice_turn(voice_server, fake_openai, question_wav):
    fake_openai.script(Reply(text=[f"Sentence {i}. " for i in range(60)], delay_s=0.05))
    with voice_server.client() as c:
        send_recording(c, question_wav, pieces=2, speak=True)
        head = c.until("audio", timeout=60)
        c.send(type="stop")
        rest = c.until("context_usage", timeout=30)
    frames = head + rest
    done = of_type(frames, "done")[0]
    assert done["stopReason"] == "stopped"
    kinds = [f["type"] for f in frames]
    assert "stopped" in kinds
    assert max(i for i, k in enumerate(kinds) if k == "audio") < kinds.index("done")
    assert len(text_of(frames)) < len("".join(f"Sentence {i}. " for i in range(60)))
    assert fake_openai.wait_aborted(1)


def test_raw_pcm16_recording_with_its_sample_rate(voice_server, fake_openai):
    fake_openai.script(Reply(text=["Paris."]))
    pcm = pcm16(espeak_wav(QUESTION), 24_000)
    with voice_server.client() as c:
        for piece in chunks(pcm, 3):
            c.send(type="audio_chunk", data=piece, format="pcm16", sampleRate=24_000)
        c.send(type="audio_end")
        frames = c.until_turn_end(timeout=60)
    assert wer(QUESTION, of_type(frames, "transcribed")[0]["text"]) <= 0.34
    assert of_type(frames, "done")[0]["finalContent"] == "Paris."


def test_a_second_recording_waits_for_the_first(voice_server, fake_openai, question_wav):
    fake_openai.script(Reply(text=["Paris."]))
    with voice_server.client() as c:
        send_recording(c, question_wav)
        send_recording(c, question_wav)  # while the first is being transcribed
        frames = c.until_turn_end(timeout=60)
        if frames[-1]["type"] == "error":  # the refusal came first
            refused = frames[-1]
            frames = c.until_turn_end(timeout=60)
        else:
            refused = c.recv(timeout=30)
    assert refused["code"] == "turn_in_progress" and "seq" not in refused
    assert of_type(frames, "done")[0]["finalContent"] == "Paris."


def test_silence_and_garbage_are_rejected_without_a_turn(voice_server, fake_openai):
    cases = [
        (silence_wav(2.0), "No speech"),
        (noise_wav(2.0), "No speech"),
        (b"\x00\x01garbage that is not audio" * 50, "Unrecognised audio"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt broken header", "Could not decode"),
    ]
    requests_before = len(fake_openai.requests)
    with voice_server.client() as c:
        for data, reason in cases:
            c.send(type="audio_chunk", data=base64.b64encode(data).decode())
            c.send(type="audio_end")
            frame = c.recv(timeout=30)
            assert frame["type"] == "error" and frame["code"] == "transcription_failed", frame
            assert reason in frame["error"] and "seq" not in frame
        c.send(type="audio_end")  # nothing recorded
        frame = c.recv()
        assert frame["code"] == "transcription_failed" and "No audio" in frame["error"]
        c.send(type="audio_chunk", data="%%% not base64")
        assert c.recv()["code"] == "invalid_message"
        c.send(type="ping")
        assert c.recv()["type"] == "pong"
    assert len(fake_openai.requests) == requests_before


def test_recording_over_the_size_limit(voice_server):
    big = base64.b64encode(b"\x00" * (4 * 1024 * 1024)).decode()
    with voice_server.client() as c:
        codes = []
        for _ in range(8):  # 32 MB > the 25 MB default
            c.send(type="audio_chunk", data=big)
        c.send(type="audio_end")
        while True:
            frame = c.recv(timeout=30)
            codes.append(frame["code"])
            if len(codes) == 2:
                break
    assert codes == ["payload_too_large", "payload_too_large"]


def test_event_loop_keeps_streaming_while_another_session_transcribes(voice_server, fake_openai):
    """A long recording is transcribed while another session streams: the other session's
    chunks keep arriving at their pace (no gap near the transcription time)."""
    long_speech = espeak_wav(" ".join(SENTENCES[:4]))
    fake_openai.script(Reply(text=[f"t{i} " for i in range(60)], delay_s=0.02), match="stream")
    gaps: list[float] = []
    streaming = threading.Event()

    def stream() -> None:
        with voice_server.client() as s:
            s.send(type="chat", message="stream")
            last = None
            while True:
                f = s.recv(timeout=30)
                now = time.monotonic()
                if f["type"] == "chunk":
                    streaming.set()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                if f["type"] == "context_usage":
                    return

    with voice_server.client() as c:
        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(30), "the other session did not start streaming"
        for _ in range(3):
            c.send(type="audio_chunk", data=base64.b64encode(long_speech).decode())
            c.send(type="audio_end")
            c.until("transcribed", "error", timeout=60)
            c.until("context_usage", "error", timeout=60)
        t.join(60)
    assert len(gaps) >= 50
    assert max(gaps) < 0.25, max(gaps)


# ---------------------------------------------------------------- hands-free


def test_hands_free_pcm_stream_ends_utterance_with_vad_and_speaks(voice_server, fake_openai):
    fake_openai.script(Reply(text=ANSWER))
    pcm = pcm16(espeak_wav(QUESTION), 16_000)
    silence = b"\x00\x00" * 16_000  # 1 s
    with voice_server.client() as c:
        c.send(type="voice_stream", action="start", format="pcm16", sampleRate=16_000)
        assert c.recv()["action"] == "started"
        frame = 640  # 20 ms
        for i in range(0, len(silence) // 2, frame):
            c.send_raw(silence[i : i + frame])
        c.send(type="audio_end")  # ends the utterance now, but nobody spoke yet
        assert c.recv(timeout=30)["code"] == "transcription_failed"
        c.send_raw(b"\x00" * 300_000)  # one frame of over 2.7 s
        assert c.recv(timeout=30)["code"] == "payload_too_large"
        for i in range(0, len(pcm), frame):
            c.send_raw(pcm[i : i + frame])
        for i in range(0, len(silence), frame):
            c.send_raw(silence[i : i + frame])
        frames = c.until_turn_end(timeout=60)
        c.send(type="voice_stream", action="stop")
        assert c.until("voice_stream")[-1]["action"] == "stopped"
        # Binary frames are refused again once the stream stopped.
        c.send_raw(b"\x00\x00" * 10)
        assert c.recv()["code"] == "invalid_message"
    transcribed = of_type(frames, "transcribed")[0]
    assert wer(QUESTION, transcribed["text"]) <= 0.34, transcribed
    assert of_type(frames, "audio") and of_type(frames, "done")


def test_hands_free_speech_interrupts_the_spoken_reply(voice_server, fake_openai):
    fake_openai.script(Reply(text=[f"Sentence number {i}. " for i in range(80)], delay_s=0.05))
    pcm = pcm16(espeak_wav(QUESTION), 48_000)
    frame = 1920  # 20 ms at 48 kHz
    silence = b"\x00\x00" * 48_000
    with voice_server.client() as c:
        c.send(type="voice_stream", action="start", format="pcm16", sampleRate=48_000)
        c.recv()
        for data in (pcm, silence):
            for i in range(0, len(data), frame):
                c.send_raw(data[i : i + frame])
        c.until("audio", timeout=60)  # the reply is being spoken
        for i in range(0, len(pcm), frame):  # the user talks over it (base64 this time)
            c.send(type="audio_chunk", data=base64.b64encode(pcm[i : i + frame]).decode())
        rest = c.until("context_usage", timeout=30)
    assert "stopped" in [f["type"] for f in rest]
    assert of_type(rest, "done")[0]["stopReason"] == "stopped"
    # The answer kept is what the user heard; what had streamed beyond it stays on record.
    sid = rest[-1]["sessionId"]
    answer = voice_server.get(f"/api/sessions/{sid}/messages").json()[-1]
    assert answer["status"] == "stopped"
    spoken = answer["meta"]["spoken"]
    assert spoken.startswith("Sentence number 0.") and answer["content"] == spoken
    streamed = answer["meta"]["streamed"]
    assert streamed.startswith(spoken) and len(spoken) < len(streamed)


# ---------------------------------------------------------------- speak and REST


def test_speak_returns_audio(voice_server):
    with voice_server.client() as c:
        c.send(type="speak", text="Hello from prismd.")
        frame = c.recv(timeout=30)
        assert frame["type"] == "audio" and frame["format"] == "wav" and "seq" not in frame
        assert base64.b64decode(frame["data"])[:4] == b"RIFF" and frame["durationMs"] > 300
        c.send(type="speak", text="   ")
        assert c.recv()["code"] == "empty_message"
        c.send(type="speak", text="Hi", voice="no-such-voice")
        bad = c.recv(timeout=30)
        assert bad["code"] == "tts_unavailable" and "no-such-voice" in bad["error"]
        c.send(type="speak", text="Hi", voice="alloy")  # OpenAI voice names map to a voice
        assert c.recv(timeout=30)["type"] == "audio"
        for i in range(6):  # at most 4 at once per connection
            c.send(type="speak", text=f"Number {i}.")
        replies = [c.recv(timeout=30) for _ in range(6)]
        kinds = sorted(f["type"] if f["type"] == "audio" else f["code"] for f in replies)
        assert kinds == ["audio"] * 4 + ["rate_limited"] * 2


def test_rest_transcribe_synthesize_voices(voice_server, question_wav):
    url = voice_server.url
    for name, data in [
        ("q.webm", encode(question_wav, "webm", "libopus")),
        ("q.ogg", encode(question_wav, "ogg", "libopus")),
        ("q.mp3", encode(question_wav, "mp3", "libmp3lame", 24_000)),
    ]:
        r = httpx.post(
            f"{url}/api/voice/transcribe",
            files={"audio": (name, data)},
            data={"language": "en"},
            timeout=30,
        )
        assert r.status_code == 200, (name, r.text)
        assert wer(QUESTION, r.json()["text"]) <= 0.34, (name, r.json())
        assert r.json()["language"] == "en" and r.json()["segments"]
    r = httpx.post(f"{url}/api/voice/transcribe", files={"audio": ("s.wav", silence_wav(1))})
    assert r.status_code == 422 and r.json()["code"] == "transcription_failed"
    for fmt, ctype, magic in [
        ("wav", "audio/wav", b"RIFF"),
        ("mp3", "audio/mpeg", None),
        ("ogg", "audio/ogg", b"OggS"),
    ]:
        r = httpx.post(
            f"{url}/api/voice/synthesize", json={"text": "Good morning.", "format": fmt}, timeout=30
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), r.text
        if magic:
            assert r.content[:4] == magic
    r = httpx.post(f"{url}/api/voice/synthesize", json={"text": ""})
    assert r.status_code == 422
    voices = voice_server.get("/api/voice/voices").json()
    assert voices["engine"] == "piper" and any(v["id"] == "default" for v in voices["voices"])


def test_browser_fixture_is_speech(voice_server):
    """tests/fixtures/hello.wav (the web app's fake microphone) is 48 kHz speech."""
    path = hello_wav(FIXTURES / "hello.wav")
    r = httpx.post(
        f"{voice_server.url}/api/voice/transcribe",
        files={"audio": ("hello.wav", path.read_bytes())},
        timeout=30,
    )
    assert wer(QUESTION, r.json()["text"]) <= 0.34
