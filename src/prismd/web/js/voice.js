// Voice: push-to-talk (hold the mic: MediaRecorder → `audio_chunk`s → `audio_end`) and
// hands-free (`voice_stream`: echo-cancelled capture → 16 kHz PCM16 as binary frames; the
// server ends each utterance by itself, and stops its own spoken reply when the user talks
// over it). Hands-free shows whether prismd is listening, thinking or speaking.
import { $, toast } from "./dom.js";
import { CLIENT, ERROR, EVENT } from "./protocol.js";
import { onSpeech, speechState, stopSpeech } from "./speech.js";

const MIME = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus"];
const RATE = 16000;
const FRAME_SAMPLES = 800; // 50 ms
const PREROLL = 40; // frames kept until the server has the stream (2 s)

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

let deps = null;

// conn: the Connection; chat(): {sessionId, running}; agent(): {agentId, model};
// started(): a voice turn was sent (the chat shows it as running).
export function initVoice(options) {
  deps = options;
  const mic = $("#mic");
  const hands = $("#hands-free");
  const supported = !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
  if (supported && window.MediaRecorder) {
    mic.hidden = false;
    mic.addEventListener("pointerdown", micDown);
    mic.addEventListener("pointerup", micUp);
    mic.addEventListener("pointerleave", () => { if (held) micUp(); });
    mic.addEventListener("keydown", (e) => {
      if (e.key === " " || e.key === "Enter") {
        e.preventDefault();
        if (recorder.active) micFinish(); else micDown(e);
        held = false;
      }
    });
  }
  if (supported && window.AudioWorkletNode) {
    hands.hidden = false;
    hands.addEventListener("click", () => (handsFree.active ? handsFree.stop() : handsFree.start()));
    $("#hands-free-stop").addEventListener("click", () => handsFree.stop());
  }
  onSpeech(() => handsFree.render());
}

// ------------------------------------------------------------------ push-to-talk

class Recorder {
  constructor() {
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
        deps.conn.send({ type: CLIENT.AUDIO_CHUNK, data, format: "webm", session: true });
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
          if (this.sent) deps.conn.send({ type: CLIENT.AUDIO_END, session: true });
          resolve(this.sent > 0);
        });
      }, { once: true });
      recorder.stop();
    });
  }
}

const recorder = new Recorder();
let pressedAt = 0;
let held = false;

async function micDown(event) {
  event.preventDefault();
  if (recorder.active) return micFinish();
  if (handsFree.active) return toast("Hands-free is on: just talk.", "warn");
  if (deps.chat().running) return toast("Wait for the answer to finish, or stop it.", "warn");
  held = true;
  pressedAt = Date.now();
  try {
    await recorder.start();
  } catch (err) {
    toast(`Microphone unavailable: ${err.message}`, "error");
    return;
  }
  $("#mic").classList.add("recording");
  $("#mic").setAttribute("aria-pressed", "true");
  setNote("Listening… release (or click again) to send");
  if (!held && Date.now() - pressedAt > 400) micFinish();
}

function micUp() {
  held = false;
  // Held down: push to talk. A short click toggles (click again to send).
  if (recorder.active && Date.now() - pressedAt > 400) micFinish();
}

async function micFinish() {
  $("#mic").classList.remove("recording");
  $("#mic").setAttribute("aria-pressed", "false");
  setNote("");
  if (await recorder.stop()) deps.started();
}

function setNote(text) {
  $("#composer-note").textContent = text;
  $("#composer-note").hidden = !text;
}

// ------------------------------------------------------------------ hands-free

const STATE_TEXT = {
  starting: "Starting the microphone…",
  listening: "Listening…",
  thinking: "Thinking…",
  speaking: "Speaking — talk to interrupt",
};

class HandsFree {
  constructor() {
    this.active = false; // the user turned it on
    this.started = false; // the server acknowledged `voice_stream` start on this socket
    this.stream = null;
    this.context = null;
    this.node = null;
    this.state = "off";
    this.framesSent = 0;
    this.capture = {}; // the microphone track's settings (echoCancellation…)
    this.preroll = []; // frames captured before the server acknowledged the stream
  }

  // The server's stream follows the socket and the session: sent again on every new socket
  // and whenever another session is on screen.
  startFrame() {
    const chat = deps.chat();
    const agent = deps.agent();
    const frame = { type: CLIENT.VOICE_STREAM, action: "start", format: "pcm16", sampleRate: RATE, speak: true };
    if (chat.sessionId) frame.sessionId = chat.sessionId;
    if (agent.agentId) frame.agentId = agent.agentId;
    if (agent.model) frame.model = agent.model;
    return frame;
  }

  async start() {
    if (this.active) return;
    this.active = true;
    this.state = "starting";
    this.render();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
      const [track] = this.stream.getAudioTracks();
      this.capture = track && track.getSettings ? track.getSettings() : {};
      try {
        this.context = new AudioContext({ sampleRate: RATE }); // the browser resamples
      } catch {
        this.context = new AudioContext(); // the worklet resamples
      }
      await this.context.audioWorklet.addModule("/static/js/pcm-worklet.js");
      const source = this.context.createMediaStreamSource(this.stream);
      this.node = new AudioWorkletNode(this.context, "pcm-sender", {
        numberOfInputs: 1,
        numberOfOutputs: 1,
        outputChannelCount: [1],
        processorOptions: { targetRate: RATE, frameSamples: FRAME_SAMPLES },
      });
      this.node.port.onmessage = (event) => this.onPcm(event.data);
      source.connect(this.node);
      // Its output is silence; connected, the graph pulls it (and so runs it) in every browser.
      this.node.connect(this.context.destination);
      if (this.context.state === "suspended") await this.context.resume();
    } catch (err) {
      this.teardown();
      toast(`Microphone unavailable: ${err.message}`, "error");
      return;
    }
    if (!this.active) return this.teardown(); // turned off meanwhile
    this.started = false;
    deps.conn.send(this.startFrame());
    this.render();
  }

  stop() {
    if (!this.active) return;
    if (this.started) deps.conn.send({ type: CLIENT.VOICE_STREAM, action: "stop" });
    this.teardown();
    stopSpeech();
  }

  teardown() {
    this.active = false;
    this.started = false;
    this.preroll = [];
    if (this.node) this.node.port.onmessage = null;
    this.node = null;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    if (this.context) this.context.close().catch(() => {});
    this.context = null;
    this.render();
  }

  onPcm({ pcm, level }) {
    if (!this.active) return;
    $("#hands-free-level").value = Math.min(100, Math.round(level * 400));
    if (!this.started) {
      // Until the server has the stream, the first words wait here (up to PREROLL frames).
      this.preroll.push(pcm);
      if (this.preroll.length > PREROLL) this.preroll.shift();
      return;
    }
    if (deps.conn.sendBinary(pcm)) this.framesSent += 1;
  }

  flushPreroll() {
    const frames = this.preroll;
    this.preroll = [];
    for (const pcm of frames) if (deps.conn.sendBinary(pcm)) this.framesSent += 1;
  }

  // A new socket: its server side has no stream yet.
  onConnected() {
    this.started = false;
    if (this.active && this.node) deps.conn.send(this.startFrame());
  }

  // Another session on screen (or a new chat): utterances go there from now on.
  retarget() {
    if (this.active && this.started) {
      this.started = false;
      deps.conn.send(this.startFrame());
    }
  }

  // Frames for hands-free; true when consumed.
  onFrame(frame) {
    if (frame.type === EVENT.VOICE_STREAM) {
      if (frame.action === "started") {
        this.started = this.active;
        if (this.started) this.flushPreroll();
      }
      this.render();
      return true;
    }
    if (frame.type === EVENT.ERROR && frame.seq === undefined && this.active && !this.started &&
        [ERROR.STT_UNAVAILABLE, ERROR.RATE_LIMITED, ERROR.INVALID_MESSAGE].includes(frame.code)) {
      toast(`Hands-free is not available: ${frame.error}`, "error");
      this.teardown();
      return true;
    }
    return false;
  }

  render() {
    const speaking = speechState().playing;
    let state = "off";
    if (this.active) {
      if (!this.started) state = "starting";
      else if (speaking) state = "speaking";
      else if (deps.chat().running) state = "thinking";
      else state = "listening";
    }
    this.state = state;
    const bar = $("#hands-free-bar");
    bar.hidden = state === "off";
    bar.dataset.state = state;
    $("#hands-free-state").textContent = STATE_TEXT[state] || "";
    const button = $("#hands-free");
    button.classList.toggle("on", this.active);
    button.setAttribute("aria-pressed", String(this.active));
    document.body.classList.toggle("hands-free", this.active);
  }
}

export const handsFree = new HandsFree();
export { recorder };

// The chat's running state changed: thinking or listening.
export function voiceRunningChanged() {
  handsFree.render();
}

export function handsFreeActive() {
  return handsFree.active;
}

export function voiceDebug() {
  return {
    state: handsFree.state,
    framesSent: handsFree.framesSent,
    started: handsFree.started,
    echoCancellation: handsFree.capture.echoCancellation,
    ...speechState(),
  };
}
