"""One user cannot block voice for the others (issue 11, items 12 and 13), against a real server
with users, the real engines, real HTTP and WebSockets.

bob pushes each bound in turn; carol's voice turn, chat and login stay prompt meanwhile. What
is asserted is order and progress (carol's transcript comes before bob's queued work is done;
bob's queued jobs are dropped, not run), never a duration.
"""

from __future__ import annotations

import base64
import socket
import threading
import uuid
from typing import Any

import httpx
import pytest

from .conftest import PrismdServer, of_type, openai_env
from .test_auth import PASSWORDS, add_user, bearer, make_token, ws_client
from .voice_fixtures import HAVE_ESPEAK, chunks, encode, espeak_wav, wer
from .waiting import wait_for

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")

MB = 1_000_000
BOUNDS = f"""
[voice]
preload = true
max_user_transcriptions = 3
max_user_queued_s = 200
max_user_audio_bytes = {4 * MB}
max_buffered_audio_bytes = {6 * MB}
"""
QUESTION = "What is the capital of France?"
PARAGRAPH = (
    "Please remind me to call my mother tomorrow at noon. How many kilometers is it from "
    "Berlin to Munich? Turn off the lights in the kitchen and lock the front door. The weather "
    "today is sunny with a light breeze. Set a timer for twenty minutes. Who wrote the novel "
    "about the white whale? Translate this sentence into Spanish, please. Write a short poem "
    "about the ocean at night."
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, fake_openai):
    """alice (admin), bob and carol, each with a token; voice bounds set low."""
    home = tmp_path_factory.mktemp("voice-users")
    for name in ("alice", "bob", "carol"):
        add_user(home, name)
    tokens = {name: make_token(home, name) for name in ("alice", "bob", "carol")}
    server = PrismdServer(home, openai_env(fake_openai), BOUNDS).start()
    server.tokens = tokens  # type: ignore[attr-defined]
    wait_status(server, lambda s: s["stt"]["loaded"] and s["tts"]["loaded"] and s["vad"]["loaded"])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _default_answers(fake_openai):
    """Turns get the fake's default answer, whatever other modules scripted."""
    fake_openai.reset()


@pytest.fixture(scope="module")
def question() -> bytes:
    return encode(espeak_wav(QUESTION, rate=48_000), "webm", "libopus")


@pytest.fixture(scope="module")
def paragraph() -> bytes:
    """About 25 s of speech (eight sentences), as a browser would record it."""
    return encode(espeak_wav(PARAGRAPH, rate=48_000), "webm", "libopus")


@pytest.fixture(scope="module")
def long_speech() -> bytes:
    """About 75 s of speech: over 15 segments, seconds of work for the speech-to-text thread."""
    return encode(espeak_wav(" ".join([PARAGRAPH] * 3), rate=48_000), "webm", "libopus")


def status(srv: PrismdServer) -> dict[str, Any]:
    with bearer(srv.url, srv.tokens["alice"]) as c:  # type: ignore[attr-defined]
        body: dict[str, Any] = c.get("/api/voice/status").json()
    return body


def wait_status(srv: PrismdServer, condition: Any, what: str = "status") -> dict[str, Any]:
    """Poll /api/voice/status until `condition(status)`; its last value."""
    seen: list[Any] = [None]

    def now() -> dict[str, Any] | None:
        current = seen[0] = status(srv)
        return current if condition(current) else None

    return wait_for(now, what, 120, detail=lambda: seen[0])


def connect(srv: PrismdServer, user: str) -> Any:
    return ws_client(f"{srv.ws_url}?token={srv.tokens[user]}")  # type: ignore[attr-defined]


def record(c: Any, audio: bytes, pieces: int = 4) -> None:
    for piece in chunks(audio, pieces):
        c.send(type="audio_chunk", data=piece, format="webm")


def voice_turn(srv: PrismdServer, user: str, audio: bytes) -> dict[str, Any]:
    """A whole push-to-talk turn; its `transcribed` event."""
    with connect(srv, user) as c:
        record(c, audio)
        c.send(type="audio_end")
        frames = c.until_turn_end(timeout=120)
    assert frames[-1]["type"] == "context_usage", frames[-1]
    return of_type(frames, "transcribed")[0]


def chat_and_login(srv: PrismdServer, user: str) -> None:
    with connect(srv, user) as c:
        frames = c.turn(message="hello", timeout=60)
    assert of_type(frames, "done"), frames
    r = httpx.post(
        f"{srv.url}/api/auth/login",
        json={"username": user, "password": PASSWORDS[user]},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def transcribe(srv: PrismdServer, user: str, audio: bytes) -> httpx.Response:
    with bearer(srv.url, srv.tokens[user]) as c:  # type: ignore[attr-defined]
        return c.post("/api/voice/transcribe", files={"audio": ("speech.webm", audio)}, timeout=300)


class Log:
    """What happened, in the order the test saw it (from several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[str] = []

    def add(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def index(self, event: str) -> int:
        with self._lock:
            return self.events.index(event)


# ---------------------------------------------------------------- fair queueing


def test_a_second_users_turn_goes_before_the_first_users_queued_clips(srv, question):
    """bob queues three 50-s clips (all his requests); carol's voice turn is transcribed
    before bob's last clip, and her chat and login answer while bob's clips are still queued.
    bob's fourth request is refused at once (voice.max_user_transcriptions)."""
    log, replies = Log(), {}
    text = " ".join([PARAGRAPH] * 2)
    clip = encode(espeak_wav(text, rate=48_000), "webm", "libopus")

    def bob(i: int) -> None:
        replies[i] = transcribe(srv, "bob", clip)
        log.add(f"bob {i}")

    before = status(srv)["work"]["stt"]["done"]
    threads = [threading.Thread(target=bob, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    # All three are in: each is cut into segments, queued for the speech-to-text thread.
    wait_status(srv, lambda s: s["work"]["requests"] == 3 and s["work"]["stt"]["queued"] >= 10)
    fourth = transcribe(srv, "bob", question)
    assert fourth.status_code == 429 and fourth.json()["code"] == "rate_limited"
    assert "voice.max_user_transcriptions" in fourth.json()["error"]

    heard = voice_turn(srv, "carol", question)
    log.add("carol")
    chat_and_login(srv, "carol")
    still = status(srv)["work"]
    for t in threads:
        t.join(300)
    assert wer(QUESTION, heard["text"]) <= 0.34, heard
    # carol's turn, chat and login were done while bob's clips were still being transcribed.
    assert still["stt"]["queued"] > 0 and still["requests"] >= 1, still
    bob_before_carol = [e for e in log.events[: log.index("carol")] if e.startswith("bob")]
    assert len(bob_before_carol) < 3, log.events
    for reply in replies.values():
        assert reply.status_code == 200 and wer(text, reply.json()["text"]) < 0.3, reply.text
    after = status(srv)["work"]["stt"]
    assert after["done"] - before >= 3 * 5  # each clip went as several jobs
    wait_status(srv, lambda s: s["work"]["requests"] == 0)


def test_audio_over_the_users_queued_seconds_is_refused(srv, question):
    """A clip with more audio than voice.max_user_queued_s (200 s) is refused before any of
    it is transcribed; carol meanwhile, and bob's own next clip, are served."""
    long = encode(espeak_wav(" ".join([PARAGRAPH] * 9), rate=48_000), "webm", "libopus")
    before = status(srv)["work"]["stt"]["done"]
    refused = transcribe(srv, "bob", long)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert "voice.max_user_queued_s" in refused.json()["error"]
    assert status(srv)["work"]["stt"]["done"] == before  # nothing of it was transcribed
    assert wer(QUESTION, voice_turn(srv, "carol", question)["text"]) <= 0.34
    chat_and_login(srv, "carol")
    assert transcribe(srv, "bob", question).status_code == 200


# ---------------------------------------------------------------- recordings held in memory


def test_recordings_in_progress_are_bounded_per_user(srv, question):
    """Three recordings in progress (voice.max_user_transcriptions) hold bob's slots: his
    fourth is refused with rate_limited; carol records and talks as usual."""
    conns = [connect(srv, "bob") for _ in range(4)]
    try:
        for c in conns[:3]:
            record(c, question, 1)
        wait_status(srv, lambda s: s["work"]["requests"] == 3)
        record(conns[3], question, 1)
        err = conns[3].recv(timeout=30)
        assert err["code"] == "rate_limited" and "voice.max_user_transcriptions" in err["error"]
        assert wer(QUESTION, voice_turn(srv, "carol", question)["text"]) <= 0.34
        chat_and_login(srv, "carol")
        conns[3].send(type="audio_end")
        end = conns[3].recv(timeout=30)
        assert end["code"] == "rate_limited" and "discarded" in end["error"]
        conns[0].send(type="audio_end")  # a recording in progress still works
        assert of_type(conns[0].until_turn_end(timeout=120), "transcribed")
    finally:
        for c in conns:
            c.close()
    wait_status(srv, lambda s: s["work"]["requests"] == 0 and s["work"]["bufferedAudioBytes"] == 0)


def test_recorded_audio_is_bounded_per_user_and_in_total(srv, question):
    """bob holds 3.6 MB of recordings (4 MB per user): 0.9 MB more is refused; alice holds
    1.8 MB: carol's recording would pass the 6-MB total and is refused with a message that
    says so, while her chat and login work. When bob disconnects his bytes are freed and
    carol's voice turn goes through."""
    silence = base64.b64encode(bytes(900_000)).decode()  # 28 s of 16-kHz PCM each

    def hold(c: Any, n: int) -> None:
        for _ in range(n):
            c.send(type="audio_chunk", data=silence, format="pcm16", sampleRate=16_000)

    bob, bob2, alice = connect(srv, "bob"), connect(srv, "bob"), connect(srv, "alice")
    try:
        hold(bob, 4)
        wait_status(srv, lambda s: s["work"]["bufferedAudioBytes"] == 3_600_000)
        hold(bob2, 1)
        err = bob2.recv(timeout=30)
        assert err["code"] == "rate_limited" and "voice.max_user_audio_bytes" in err["error"]
        assert status(srv)["work"]["bufferedAudioBytes"] == 3_600_000
        hold(alice, 2)
        wait_status(srv, lambda s: s["work"]["bufferedAudioBytes"] == 5_400_000)
        with connect(srv, "carol") as carol:
            hold(carol, 1)
            err = carol.recv(timeout=30)
            assert err["code"] == "rate_limited"
            assert "voice.max_buffered_audio_bytes" in err["error"] and "MB" in err["error"]
            carol.send(type="audio_end")
            assert carol.recv(timeout=30)["code"] == "rate_limited"
        chat_and_login(srv, "carol")
        bob.close()  # bob goes: what he held is freed at once
        wait_status(srv, lambda s: s["work"]["bufferedAudioBytes"] == 1_800_000)
        assert wer(QUESTION, voice_turn(srv, "carol", question)["text"]) <= 0.34
    finally:
        for c in (bob, bob2, alice):
            c.close()
    wait_status(srv, lambda s: s["work"]["bufferedAudioBytes"] == 0)


# ---------------------------------------------------------------- cancellation


def queued_work(srv: PrismdServer) -> dict[str, Any]:
    """Wait until bob's long recording has jobs queued; the stt figures then."""
    stt: dict[str, Any] = wait_status(srv, lambda s: s["work"]["stt"]["queued"] >= 8)["work"]["stt"]
    return stt


def dropped(srv: PrismdServer, queued: dict[str, Any]) -> None:
    """Most of the jobs queued then were dropped, not run (the one running may finish)."""
    after = wait_status(srv, lambda s: s["work"]["stt"]["queued"] == 0)["work"]["stt"]
    assert after["cancelled"] - queued["cancelled"] >= queued["queued"] // 2, (queued, after)
    assert after["done"] - queued["done"] <= queued["queued"] // 2, (queued, after)


def test_a_recording_whose_connection_closes_is_dropped(srv, question, long_speech):
    """bob records 75 s and disconnects before audio_end: his queued segments are dropped,
    not transcribed; carol is served."""
    with connect(srv, "bob") as c:
        record(c, long_speech, 1)
        queued = queued_work(srv)
    dropped(srv, queued)
    assert wer(QUESTION, voice_turn(srv, "carol", question)["text"]) <= 0.34
    wait_status(srv, lambda s: s["work"]["requests"] == 0)


def test_stop_while_recording_drops_the_recording(srv, long_speech):
    with connect(srv, "bob") as c:
        record(c, long_speech, 8)
        queued = queued_work(srv)
        c.send(type="stop")
        assert c.recv(timeout=30) == {"type": "stopped", "turnRunning": False}
        dropped(srv, queued)
        record(c, long_speech[-5000:], 1)  # the rest of that recording is ignored
        c.send(type="audio_end")
        err = c.recv(timeout=30)
        assert err["code"] == "transcription_failed" and "stop" in err["error"], err
        c.send(type="ping")
        assert c.recv(timeout=30)["type"] == "pong"
    wait_status(srv, lambda s: s["work"]["requests"] == 0)


def test_a_rest_transcription_whose_client_disconnects_is_dropped(srv, long_speech):
    long = long_speech
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.webm"\r\n'
            f"Content-Type: audio/webm\r\n\r\n"
        ).encode()
        + long
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /api/voice/transcribe HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
        f"Authorization: Bearer {srv.tokens['bob']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body)
        queued = queued_work(srv)
    dropped(srv, queued)
    wait_status(srv, lambda s: s["work"]["requests"] == 0)
