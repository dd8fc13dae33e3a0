// Push-to-talk: MediaRecorder (webm/opus) → `audio_chunk` frames (base64) → `audio_end`.
// Spoken replies (`audio` events) play through an <audio> element from a blob: URL.

const MIME = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus"];

export function micSupported() {
  return !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

export class Recorder {
  constructor(send) {
    this.send = send; // (frame) => void
    this.recorder = null;
    this.stream = null;
    this.pending = Promise.resolve();
    this.sent = 0;
  }

  get active() {
    return this.recorder !== null;
  }

  async start() {
    if (this.recorder) return;
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const mimeType = MIME.find((m) => MediaRecorder.isTypeSupported(m)) || "";
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : undefined);
    this.sent = 0;
    this.recorder.addEventListener("dataavailable", (event) => {
      if (!event.data || !event.data.size) return;
      // Chunks go out in order even though reading each blob is asynchronous.
      this.pending = this.pending.then(async () => {
        const data = toBase64(await event.data.arrayBuffer());
        this.sent += 1;
        this.send({ type: "audio_chunk", data, format: "webm", session: true });
      });
    });
    this.recorder.start(250);
  }

  // Stops recording; resolves once `audio_end` went out (false when nothing was recorded).
  stop() {
    const recorder = this.recorder;
    if (!recorder) return Promise.resolve(false);
    this.recorder = null;
    return new Promise((resolve) => {
      recorder.addEventListener("stop", () => {
        for (const track of this.stream.getTracks()) track.stop();
        this.stream = null;
        this.pending = this.pending.then(() => {
          if (this.sent) this.send({ type: "audio_end", session: true });
          resolve(this.sent > 0);
        });
      }, { once: true });
      recorder.stop();
    });
  }
}

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
