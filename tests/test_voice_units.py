"""The voice processors alone: sentence splitting, container sniffing and PCM decoding, VAD
end-of-utterance on a PCM stream (Silero's ONNX model in this process, no server)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from prismd.voice.decode import decode, pcm16_to_float, resample, sniff
from prismd.voice.errors import AudioDecodeError
from prismd.voice.sentences import SentenceSplitter, speakable

from .voice_fixtures import HAVE_ESPEAK, encode, espeak_wav, pcm16, silence_wav, wer


def split_streamed(text: str, piece: int = 3) -> list[str]:
    s = SentenceSplitter()
    out = []
    for i in range(0, len(text), piece):
        out += s.feed(text[i : i + piece])
    return out + s.flush()


def test_sentences_come_out_as_soon_as_they_end():
    s = SentenceSplitter()
    assert s.feed("Paris is the capital of France. It") == ["Paris is the capital of France."]
    assert s.feed(" has 2.1 million people") == []
    assert s.feed("! And") == ["It has 2.1 million people!"]
    assert s.flush() == ["And"]


def test_sentences_skip_markup_and_code():
    text = (
        "Here is **bold** and `code`, e.g. this one. See [the docs](http://x.org).\n\n"
        "```python\nprint('not read aloud. at all.')\n```\n- First item\n- Second item"
    )
    assert split_streamed(text) == [
        "Here is bold and code, e.g. this one.",
        "See the docs.",
        "First item",
        "Second item",
    ]
    assert speakable("## Title **x**") == "Title x"


def test_long_sentence_is_cut_at_a_comma_or_space():
    text = "word, " * 100
    pieces = split_streamed(text, 50)
    assert all(len(p) <= 240 for p in pieces) and len(pieces) >= 2
    assert " ".join(pieces).split() == text.split()


def test_containers_are_sniffed_from_bytes():
    wav = silence_wav(0.1)
    assert sniff(wav) == "wav"
    assert sniff(b"OggS\x00" + b"\x00" * 20) == "ogg"
    assert sniff(b"\x1a\x45\xdf\xa3" + b"\x00" * 20) == "webm"
    assert sniff(b"ID3\x04" + b"\x00" * 20) == "mp3"
    assert sniff(b"hello") is None
    with pytest.raises(AudioDecodeError, match="Unrecognised"):
        decode(b"hello world")
    with pytest.raises(AudioDecodeError, match="No audio"):
        decode(b"")


def test_pcm16_is_resampled_to_16k():
    one_second_48k = (np.ones(48_000) * 1000).astype("<i2").tobytes()
    samples = pcm16_to_float(one_second_48k, 48_000)
    assert samples.size == 16_000 and abs(samples.mean() - 1000 / 32768) < 1e-4
    assert resample(np.zeros(22_050, dtype=np.float32), 22_050).size == 16_000
    # An odd byte (half a sample) is dropped, not an error.
    assert pcm16_to_float(b"\x00\x00\x01", 16_000).size == 1


def silence_encoded(container: str, codec: str, seconds: int, rate: int = 16_000) -> bytes:
    """`seconds` of silence compressed with PyAV: tiny for its length (a decompression bomb)."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as box:
        stream: Any = box.add_stream(codec, rate=rate, layout="mono")
        zeros = np.zeros((1, rate), dtype=np.int16)
        for n in range(seconds):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, n * rate
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return buf.getvalue()


def test_compressed_silence_over_the_limit_is_refused_while_decoding(monkeypatch):
    import tracemalloc

    import av

    from prismd.config import VoiceSettings
    from prismd.voice.engines import VoiceEngines
    from prismd.voice.errors import TranscriptionFailed

    flac = silence_encoded("flac", "flac", 1200)  # 20 minutes: ~220 KB, 77 MB decoded
    assert sniff(flac) == "flac" and len(flac) < 400_000
    limit = 30 * 16_000
    decoded = 0
    real = av.AudioResampler

    class Counting:  # counts what the decoder turns into 16 kHz samples
        def __init__(self, **kwargs: Any) -> None:
            self.inner = real(**kwargs)

        def resample(self, frame: Any) -> Any:
            nonlocal decoded
            out = self.inner.resample(frame)
            decoded += sum(o.samples for o in out)
            return out

    monkeypatch.setattr(av, "AudioResampler", Counting)
    tracemalloc.start()
    try:
        with pytest.raises(TranscriptionFailed, match="longer than 30 s; the limit is 30 s"):
            decode(flac, max_samples=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    # Stopped within one frame (FLAC's default block: 4608 samples) of the limit.
    assert limit - 5_000 < decoded <= limit
    assert peak < 2 * limit * 4  # float32: never far past the limit (77 MB decoded whole)
    # Under the limit it decodes whole.
    assert decode(silence_encoded("flac", "flac", 2), max_samples=limit).size == 32_000
    # The transcribe path (REST and push-to-talk) passes the configured limit, and refuses
    # before any model loads.
    engines = VoiceEngines(VoiceSettings(max_audio_seconds=30))
    try:
        with pytest.raises(TranscriptionFailed, match="the limit is 30 s") as err:
            engines._decode(flac, None, None)
        assert err.value.code.value == "transcription_failed"
    finally:
        engines.close()


def test_opus_silence_over_the_limit_is_refused():
    from prismd.voice.errors import TranscriptionFailed

    ogg = silence_encoded("ogg", "libopus", 120, rate=48_000)
    with pytest.raises(TranscriptionFailed, match="longer than 60 s"):
        decode(ogg, max_samples=60 * 16_000)
    assert decode(ogg, max_samples=200 * 16_000).size > 119 * 16_000


def test_containers_open_only_with_the_detected_demuxer():
    webm = silence_encoded("webm", "libopus", 2, rate=48_000)
    assert sniff(webm) == "webm" and abs(decode(webm).size - 32_000) < 400
    # FLAC behind an ID3 tag: FFmpeg's probing would find and decode the FLAC; the bytes
    # are MP3 by their magic, so only the MP3 demuxer runs and refuses them.
    disguised = b"ID3\x04\x00\x00\x00\x00\x00\x00" + silence_encoded("flac", "flac", 2)
    assert sniff(disguised) == "mp3"
    with pytest.raises(AudioDecodeError, match="mp3"):
        decode(disguised)


def test_raw_pcm16_over_the_limit_is_refused_before_resampling(monkeypatch):
    from prismd.voice import decode as decode_module
    from prismd.voice.errors import TranscriptionFailed

    def no_resampling(*args: Any) -> None:
        raise AssertionError("resampled audio over the limit")

    monkeypatch.setattr(decode_module, "resample", no_resampling)
    raw = bytes(2 * 4000 * 301)  # 301 s at 4 kHz: 2.4 MB that would resample to 4.8 M samples
    with pytest.raises(TranscriptionFailed, match="301 s long; the limit is 300 s"):
        decode(raw, "pcm16", 4000, max_samples=300 * 16_000)
    with pytest.raises(TranscriptionFailed, match="the limit is 300 s"):
        pcm16_to_float(raw, 4000, 300 * 16_000)
    monkeypatch.undo()
    assert decode(raw[: 2 * 4000 * 2], "pcm16", 4000, max_samples=300 * 16_000).size == 32_000


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_webm_opus_decodes_from_concatenated_chunks():
    wav = espeak_wav("Hello there, how are you?", rate=48_000)
    webm = encode(wav, "webm", "libopus")
    whole = decode(webm)
    assert abs(whole.size / 16_000 - len(pcm16(wav)) / 32_000) < 0.1
    # Truncated mid-stream (the last MediaRecorder chunk may be): what decoded is kept.
    part = decode(webm[: len(webm) * 2 // 3])
    assert 0 < part.size < whole.size


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_vad_ends_the_utterance_after_the_configured_silence():
    from prismd.voice.vad import EndpointConfig, Endpointer, SileroVad

    vad = SileroVad()
    speech = pcm16_to_float(pcm16(espeak_wav("What is the capital of France?")), 16_000)
    silence = np.zeros(16_000, dtype=np.float32)
    for silence_ms in (300, 800):
        ep = Endpointer(vad.stream(), EndpointConfig(silence_ms=silence_ms))
        events = []
        stream = np.concatenate([silence[:8000], speech, silence, silence])
        ended_at = None
        for i in range(0, stream.size, 320):  # 20 ms frames
            for kind, value in ep.feed(stream[i : i + 320]):
                events.append(kind)
                if kind == "utterance":
                    ended_at = (i + 320) / 16_000
                    utterance = value
        assert events == ["speech", "utterance"]
        voiced = np.flatnonzero(np.abs(speech) > 0.02)  # espeak's file ends in silence
        speech_end = (8000 + voiced[-1]) / 16_000
        # Ends `silence_ms` after the speech (VAD windows are 32 ms; espeak trails off).
        assert ended_at is not None
        assert silence_ms / 1000 - 0.25 < ended_at - speech_end < silence_ms / 1000 + 0.25
        assert abs(utterance.size - speech.size) / 16_000 < silence_ms / 1000 + 0.5
    # Silence alone never makes an utterance.
    ep = Endpointer(vad.stream())
    assert ep.feed(np.zeros(16_000 * 3, dtype=np.float32)) == [] and ep.flush() is None


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_vad_offers_the_utterance_at_a_pause_and_takes_it_back_if_speech_resumes():
    from prismd.voice.vad import EndpointConfig, Endpointer, SileroVad

    vad = SileroVad()
    speech = pcm16_to_float(pcm16(espeak_wav("What is the capital of France?")), 16_000)
    voiced = np.flatnonzero(np.abs(speech) > 0.02)
    speech = speech[voiced[0] : voiced[-1] + 1]  # espeak's leading and trailing silence cut
    silence = np.zeros(16_000, dtype=np.float32)
    ep = Endpointer(vad.stream(), EndpointConfig(silence_ms=800, pause_ms=300))
    events = []
    # Speech, a 0.5 s pause (longer than pause_ms, shorter than silence_ms), speech, silence.
    stream = np.concatenate([silence[:8000], speech, silence[:8000], speech, silence])
    for i in range(0, stream.size, 320):
        events += ep.feed(stream[i : i + 320])
    kinds = [k for k, _ in events]
    assert kinds == ["speech", "pause", "resume", "pause", "utterance"], kinds
    last_pause, utterance = events[3][1], events[4][1]
    # The speculative audio is the utterance minus the end of its closing silence.
    assert np.array_equal(utterance[: last_pause.size], last_pause)
    assert 0.3 < (utterance.size - last_pause.size) / 16_000 < 0.6


def test_word_error_rate():
    assert wer("the cat sat", "The cat, sat.") == 0
    assert wer("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(1 / 6)
    assert wer("a b", "") == 1


def test_voice_config_accepts_auto_speak_in_either_spelling(tmp_path):
    from prismd.config import ConfigError, load_settings

    for key in ("autoSpeak", "auto_speak"):
        path = tmp_path / f"{key}.toml"
        path.write_text(f"[voice]\n{key} = true\nsilence_ms = 700\n[voice.stt]\nwindow_s = 30\n")
        voice = load_settings(path, env={"PRISMD_HOME": str(tmp_path)}).voice
        assert voice.auto_speak is True and voice.silence_ms == 700 and voice.stt.window_s == 30
    path.write_text("[voice]\nsilence_ms = 5\n")
    with pytest.raises(ConfigError, match="voice.silence_ms"):
        load_settings(path, env={"PRISMD_HOME": str(tmp_path)})


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
@pytest.mark.parametrize(
    ("kind", "fmt", "rate"),
    [
        ("webm", None, None),
        ("ogg", None, None),
        ("mp3", None, None),
        ("wav", None, None),
        ("pcm16", "pcm16", 48_000),
        ("pcm16", "pcm16", 22_050),
    ],
)
def test_a_recording_decoded_while_it_arrives_equals_the_whole_decoded(kind, fmt, rate):
    """Pieces of any size, decoded as they come (push-to-talk), give exactly the samples of
    the whole recording decoded at once."""
    import random

    from prismd.voice.decode import StreamDecoder

    wav = espeak_wav("Hello there, how are you today? I am fine.", rate=48_000)
    data = {
        "webm": lambda: encode(wav, "webm", "libopus"),
        "ogg": lambda: encode(wav, "ogg", "libopus"),
        "mp3": lambda: encode(wav, "mp3", "libmp3lame", 24_000),
        "wav": lambda: wav,
        "pcm16": lambda: pcm16(wav, rate),
    }[kind]()
    whole = decode(data, fmt, rate)
    for seed in range(3):
        pick = random.Random(seed)
        stream = StreamDecoder(fmt, rate)
        parts, sent = [], 0
        while sent < len(data):
            size = pick.randint(1, 6000)
            stream.feed(data[sent : sent + size])
            sent += size
            parts.append(stream.decode())
        parts.append(stream.decode(final=True))
        assert sum(p.size for p in parts[:-1]) > whole.size // 2  # most came before the end
        assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_push_to_talk_segments_cut_at_pauses_and_keep_every_word():
    """The endpointer as push-to-talk uses it: long speech is cut at shorter pauses, a short
    word alone between pauses goes with the next segment (never dropped), what is left at the
    end is flushed even if short, and `spans` says where each segment lies."""
    from prismd.voice.vad import WINDOW, EndpointConfig, Endpointer, SileroVad

    # 320 ms of silence ends a segment, 160 ms once it is 1.5 s long; "Yes." is under 500 ms
    # of speech: too short to stand alone.
    config = EndpointConfig(
        silence_ms=320, min_speech_ms=500, splits=((1500, 160),), keep_short=True
    )
    vad = SileroVad()

    def said(text: str) -> np.ndarray:
        speech = pcm16_to_float(pcm16(espeak_wav(text)), 16_000)
        voiced = np.flatnonzero(np.abs(speech) > 0.02)
        return speech[voiced[0] : voiced[-1] + 1]

    pause = np.zeros(8000, dtype=np.float32)  # 0.5 s
    first, short, last = said("Please call my mother tomorrow."), said("Yes."), said("Okay.")
    stream = np.concatenate([pause, first, pause, short, pause, first, pause, last])
    endpointer = Endpointer(vad.stream(), config)
    events = [e for i in range(0, stream.size, 4000) for e in endpointer.feed(stream[i : i + 4000])]
    segments = [v for k, v in events if k == "utterance"]
    rest = endpointer.flush()
    assert rest is not None and len(segments) == 2
    # "Yes." was kept with the sentence after it; "Okay." is short but ends the recording.
    assert segments[1].size > first.size + short.size
    assert rest.size >= last.size
    assert endpointer.heard_ms > 1000
    (start, end), second, third = endpointer.spans
    assert start <= 8000 <= start + 10 * WINDOW  # the preroll before the speech
    assert end - start == segments[0].size
    assert end < second[0] and second[1] - second[0] == segments[1].size
    assert second[1] < third[0] and third[1] - third[0] == rest.size
    # Words 200 ms apart: a pause too short to end a segment, until the segment is 1.5 s long.
    gap = np.zeros(3200, dtype=np.float32)
    words = [said(w) for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    endpointer = Endpointer(vad.stream(), config)
    events = endpointer.feed(np.concatenate([x for w in words for x in (w, gap)] + [pause]))
    cut = [v.size / 16_000 for k, v in events if k == "utterance"]
    assert len(cut) >= 2 and all(1.5 <= seconds < 3 for seconds in cut[:-1]), cut


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_push_to_talk_is_as_accurate_as_whole_recordings():
    """The speech fixtures (the sentences the accuracy test bounds, spoken by espeak-ng and
    by Piper with its noise off, so that every run hears the same audio), and requests of
    several of them: transcribed whole (as an upload is) and as a push-to-talk recording
    (cut at its pauses, a segment at a time), the word error rate of push-to-talk is no
    worse. Engines in this process."""
    import asyncio

    from piper import SynthesisConfig

    from prismd.config import VoiceSettings
    from prismd.voice.decode import to_wav
    from prismd.voice.engines import VoiceEngines

    from .voice_fixtures import SENTENCES

    requests = [" ".join(SENTENCES[:3]), " ".join(SENTENCES[2:]), " ".join(SENTENCES)]
    engines = VoiceEngines(VoiceSettings(max_user_transcriptions=100))

    def piper(text: str) -> bytes:
        voice = engines._tts.get()._load("default")
        quiet = SynthesisConfig(noise_scale=0, noise_w_scale=0)
        audio = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=quiet))
        return to_wav(audio, voice.config.sample_rate)

    async def both(wav: bytes) -> tuple[str, str]:
        whole = await engines.transcribe(engines.ticket("u", "upload"), wav)
        recording = engines.recording(engines.ticket("u", "recording"), None, None)
        for piece in range(0, len(wav), 16_000):
            recording.add(wav[piece : piece + 16_000])
        return whole.text, (await recording.finish()).text

    async def main() -> dict[str, dict[str, list[float]]]:
        errors: dict[str, dict[str, list[float]]] = {}
        for speak in (espeak_wav, piper):
            for text in SENTENCES + requests:
                whole, pushed = await both(speak(text))
                kind = "sentences" if text in SENTENCES else "requests"
                into = errors.setdefault(f"{speak.__name__} {kind}", {"whole": [], "ptt": []})
                into["whole"].append(wer(text, whole))
                into["ptt"].append(wer(text, pushed))
        return errors

    try:
        errors = asyncio.run(main())
    finally:
        engines.close()
    for kind in ("sentences", "requests"):
        whole = [e for key, v in errors.items() if key.endswith(kind) for e in v["whole"]]
        pushed = [e for key, v in errors.items() if key.endswith(kind) for e in v["ptt"]]
        assert sum(pushed) <= sum(whole), (kind, errors)


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_push_to_talk_segments_are_contiguous():
    """Every sample of a recording is in exactly one segment (or the silent tail after the
    last cut), in order, whatever pieces it arrives in; a cut follows the pause that made it."""
    from prismd.config import VoiceSettings
    from prismd.voice.engines import VoiceEngines
    from prismd.voice.vad import Segmenter, SileroVad

    from .voice_fixtures import SENTENCES

    speech = pcm16_to_float(pcm16(espeak_wav(" ".join(SENTENCES[1:4]))), 16_000)
    stream = np.concatenate([np.zeros(4000, dtype=np.float32), speech])
    config = VoiceEngines(VoiceSettings()).segment_config()
    segmenter = Segmenter(SileroVad().stream(), config)
    events = []
    for i in range(0, stream.size, 3000):
        events += segmenter.feed(stream[i : i + 3000])
    events += segmenter.flush()
    segments = [v for k, v in events if k == "segment"]
    assert len(segments) >= 2 and all(cut for _, _, cut in segments[:-1])
    pieces = [samples for _, samples, _ in segments] + [v[1] for k, v in events if k == "tail"]
    assert np.array_equal(np.concatenate(pieces), stream)
    starts = [start for start, _, _ in segments]
    assert starts == [0, *np.cumsum([s.size for _, s, _ in segments])[:-1].tolist()]
    assert segmenter.heard_ms > 3000
