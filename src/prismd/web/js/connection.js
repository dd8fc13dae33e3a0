// The WebSocket to /ws: connect, reconnect with backoff, keep alive, and hold the frames that
// must not be lost (a chat typed offline, an approval) until the socket is back. It knows
// nothing of sessions: every frame goes to `onFrame`, and `connected` marks it ready.
import { CLIENT, EVENT } from "./protocol.js";

const KEEPALIVE_MS = 25000;
// Frames worth keeping while offline: the user's chat and approval answers.
const KEPT = new Set([CLIENT.CHAT, CLIENT.APPROVAL_RESPONSE]);

export class Connection {
  // onFrame(frame); onReady() once `connected` arrived; onDown(delayMs) when the socket
  // closed (a reconnect is due in delayMs); beforeRetry(attempt) -> false to stop retrying
  // (the login expired, say).
  constructor({ onFrame, onReady, onDown, beforeRetry }) {
    this.onFrame = onFrame;
    this.onReady = onReady;
    this.onDown = onDown;
    this.beforeRetry = beforeRetry;
    this.ws = null;
    this.ready = false; // `connected` received on the current socket
    this.attempts = 0;
    this.timer = null;
    this.outbox = [];
    setInterval(() => { if (this.ready) this.send({ type: CLIENT.PING }); }, KEEPALIVE_MS);
    addEventListener("online", () => { if (!this.ready) this.connect(); });
  }

  connect() {
    clearTimeout(this.timer);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.ready = false;
    ws.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === EVENT.CONNECTED) {
        this.ready = true;
        this.attempts = 0;
        this.onReady();
        return;
      }
      this.onFrame(frame);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws) return; // replaced (or taken offline on purpose)
      this.ready = false;
      this.scheduleReconnect();
    });
  }

  async scheduleReconnect() {
    this.attempts += 1;
    const delay = Math.min(10000, 400 * 2 ** Math.min(this.attempts - 1, 5)) * (0.75 + Math.random() / 2);
    this.onDown(delay);
    if (this.beforeRetry && !(await this.beforeRetry(this.attempts))) return;
    this.timer = setTimeout(() => this.connect(), delay);
  }

  get open() {
    return !!(this.ws && this.ready && this.ws.readyState === WebSocket.OPEN);
  }

  // Sends a JSON frame; false when offline (chats and approvals then wait in the outbox).
  send(frame) {
    if (this.open) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    if (KEPT.has(frame.type)) this.outbox.push(frame);
    return false;
  }

  // Sends binary data (hands-free PCM); dropped when offline.
  sendBinary(data) {
    if (!this.open) return false;
    this.ws.send(data);
    return true;
  }

  get waiting() {
    return this.outbox.length;
  }

  flush() {
    const frames = this.outbox;
    this.outbox = [];
    for (const frame of frames) this.send(frame);
  }
}
