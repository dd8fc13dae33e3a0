"""Voice: speech in and out, on the CPU.

The parts, and how audio goes through them (plain classes that call each other):

- Push-to-talk (`pipeline.ConnectionVoice`, `recording.Recording`): the `audio_chunk`s of a
  recording are decoded as they arrive (`decode.StreamDecoder`) and cut into segments at pauses
  (`vad.Endpointer`); each segment is transcribed (`stt`) as soon as a pause closes it, so at
  `audio_end` only the last one is left. The joined transcript starts a turn through the
  connection's chat path (`transcribed` first).
- Hands-free (`pipeline.HandsFree`): PCM frames → `vad.Endpointer` → one voice turn per
  utterance; speech while the session's reply plays stops it (barge-in).
- Spoken replies (`speaker.SpokenReply`): the answer's text as it streams →
  `sentences.SentenceSplitter` → `tts`, one `audio` event per sentence.
- REST (`server/voice.py`): whole uploads, cut into segments when longer than one Whisper
  window.

`engines.VoiceEngines` is the one entry point: it loads the engines (faster-whisper, Piper,
Silero VAD) on first use and runs all the work in three threads (speech-to-text,
text-to-speech, decoding and VAD) shared fairly between users, with per-user bounds and
cancellation (`scheduler`). The heavy libraries (numpy, PyAV, onnxruntime, faster-whisper,
piper) are imported only when voice is first used, so an idle server that never hears a word
pays nothing for them.
"""
