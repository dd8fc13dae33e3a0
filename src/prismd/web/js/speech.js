// Spoken replies: one speaker for the whole page. Clips (`audio` frames, one per sentence)
// play one after the other, never on top of each other; `stopSpeech` silences it at once
// (Esc, a stop, the user talking over it in hands-free mode).

const TYPES = { wav: "audio/wav", mp3: "audio/mpeg", ogg: "audio/ogg", webm: "audio/webm", opus: "audio/ogg" };

// Raw 16-bit mono PCM gets a WAV header so that the browser can play it.
function wavOf(pcm, sampleRate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, value) => { for (let i = 0; i < 4; i++) header.setUint8(offset + i, value.charCodeAt(i)); };
  text(0, "RIFF"); header.setUint32(4, 36 + pcm.length, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
  header.setUint16(32, 2, true); header.setUint16(34, 16, true);
  text(36, "data"); header.setUint32(40, pcm.length, true);
  return new Blob([header.buffer, pcm], { type: "audio/wav" });
}

export function audioUrl(data, format, sampleRate) {
  const binary = atob(data);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  if (format === "pcm16") return URL.createObjectURL(wavOf(bytes, sampleRate || 24000));
  return URL.createObjectURL(new Blob([bytes], { type: TYPES[format] || "audio/wav" }));
}

const speech = { queue: [], audio: null, playing: false, played: 0, listeners: new Set() };

function setPlaying(on) {
  if (speech.playing === on) return;
  speech.playing = on;
  for (const listener of speech.listeners) listener(on);
}

function playNext() {
  const url = speech.queue.shift();
  if (!url) {
    setPlaying(false);
    return;
  }
  setPlaying(true);
  speech.audio.src = url;
  speech.audio.play().catch(() => {
    speech.queue.length = 0;
    setPlaying(false);
  });
}

export function enqueueSpeech(url) {
  if (!speech.audio) {
    speech.audio = new Audio();
    speech.audio.addEventListener("ended", () => { speech.played += 1; playNext(); });
    speech.audio.addEventListener("error", playNext);
  }
  speech.queue.push(url);
  if (!speech.playing) playNext();
}

export function stopSpeech() {
  speech.queue.length = 0;
  if (speech.audio) speech.audio.pause();
  setPlaying(false);
}

// listener(playing: bool) whenever the speaker starts or falls silent.
export function onSpeech(listener) {
  speech.listeners.add(listener);
}

export function speechState() {
  return { playing: speech.playing, queued: speech.queue.length, played: speech.played };
}
