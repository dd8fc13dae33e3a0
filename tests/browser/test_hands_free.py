"""Hands-free voice in a real browser: Chromium's fake capture device plays a recorded question
(tests/fixtures/hello.wav) followed by silence, over and over, as a person who keeps asking.
The app streams echo-cancelled 16 kHz PCM16 as binary frames (`voice_stream`), the server cuts
utterances with its VAD and answers aloud; the next time the question comes, it talks over
the (long) spoken answer and the server stops it (barge-in)."""

from __future__ import annotations

import io
import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from prismd.testing.fake_models import FakeModelServer, Reply
from tests.conftest import PrismdServer

from .conftest import CHROMIUM, SPEECH_WAV, Console, chromium_args
from .test_web_app import open_app

# After each question: the server's VAD needs 0.5 s of it to end an utterance; the rest leaves
# the answer's first sentences (transcription, then speech synthesis, on a loaded machine)
# several seconds to be spoken before the question comes again.
SILENCE_S = 6.0


def question_then_silence(path: Path) -> Path:
    """hello.wav followed by SILENCE_S of silence, same format (48 kHz mono 16-bit)."""
    with wave.open(str(SPEECH_WAV)) as src:
        params = src.getparams()
        frames = src.readframes(src.getnframes())
    silence = b"\x00\x00" * int(params.framerate * SILENCE_S) * params.nchannels
    out = io.BytesIO()
    with wave.open(out, "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames + silence)
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module")
def talking_browser(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    """A second Chromium whose microphone keeps asking the question (the first one's plays
    hello.wav back to back, with no pause long enough to end an utterance)."""
    wav = question_then_silence(tmp_path_factory.mktemp("handsfree") / "question.wav")
    other = browser.browser_type.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
    yield other
    other.close()


@pytest.fixture
def talking_page(talking_browser: Browser, console: Console) -> Iterator[Page]:
    context = talking_browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["microphone"])
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", console.on_console)
    page.on("pageerror", console.on_error)
    yield page
    context.close()
    assert not console.csp_violations(), console.csp_violations()
    assert not console.errors, console.errors


def test_hands_free_listens_speaks_and_is_interrupted(
    talking_page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    page = talking_page
    # A long spoken answer (9 s of text, more of speech): the question comes back during it.
    fake_openai.script(
        Reply(text=[f"Sentence number {i}. " for i in range(60)], delay_s=0.15), match="capital"
    )
    sent: list[dict] = []
    binary: list[int] = []

    def watch(ws) -> None:  # noqa: ANN001 - a playwright WebSocket
        def on_sent(payload: str | bytes) -> None:
            if isinstance(payload, bytes):
                binary.append(len(payload))
            else:
                sent.append(json.loads(payload))

        ws.on("framesent", on_sent)

    page.on("websocket", watch)
    open_app(page, web_server)
    page.locator("#hands-free").click()
    bar = page.locator("#hands-free-bar")
    expect(bar).to_be_visible()
    expect(bar).to_have_attribute("data-state", "listening")
    start = next(f for f in sent if f["type"] == "voice_stream")
    assert (start["action"], start["format"], start["sampleRate"]) == ("start", "pcm16", 16000)
    voice = page.evaluate("window.prismd.voice")
    assert voice["echoCancellation"] is True, voice
    # The question becomes a voice turn; its answer is spoken as it arrives.
    asked = page.locator("#messages-inner .msg.user.voice")
    expect(asked.filter(has_text="capital").first).to_be_visible(timeout=60_000)
    expect(bar).to_have_attribute("data-state", "speaking", timeout=60_000)
    # The question comes again while the answer is spoken: the server stops that answer, and
    # keeps of it what was spoken (meta.spoken; what had streamed beyond it is meta.streamed).
    # (The first answer may be stopped before a word of it was spoken, while the speech engine
    # loads: the question keeps coming, so wait for one interrupted mid-speech.)
    stopped = page.locator("#messages-inner .msg.assistant.was-stopped")
    expect(stopped.first).to_be_visible(timeout=60_000)
    sid = page.evaluate("window.prismd.sessionId")
    deadline = time.monotonic() + 90
    while True:
        messages = page.request.get(f"{web_server.url}/api/sessions/{sid}/messages").json()
        rows = [m for m in messages if m["role"] == "assistant" and m["status"] == "stopped"]
        if any(m["content"].startswith("Sentence number 0.") for m in rows):
            break
        assert time.monotonic() < deadline, [(m["content"][:40], m["meta"]) for m in rows]
        page.wait_for_timeout(200)
    for m in rows:
        assert m["content"] == m["meta"]["spoken"], m
        assert m["meta"].get("streamed", m["content"]).startswith(m["content"]), m
    expect(asked.filter(has_text="capital")).to_have_count(2, timeout=60_000)
    page.locator("#hands-free-stop").click()
    expect(bar).to_be_hidden()
    assert any(f["type"] == "voice_stream" and f["action"] == "stop" for f in sent)
    # Audio went up as 50 ms frames of 16 kHz PCM16, as binary WebSocket frames.
    assert len(binary) > 40 and set(binary) == {1600}, sorted(set(binary))
    # No more frames once it is off.
    before = len(binary)
    page.wait_for_timeout(500)
    assert len(binary) == before
