"""Voice: audio decoding, voice activity detection, speech-to-text, text-to-speech.

Voice works as frames flowing through small processors (decode → VAD → STT → turn → sentence
splitter → TTS), each testable alone. The heavy libraries (numpy, PyAV, onnxruntime,
faster-whisper, piper) are imported only when voice is first used, so an idle server that never
hears a word pays nothing for them; `engines.VoiceEngines` is the one entry point.
"""
