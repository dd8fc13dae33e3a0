// Rendering of messages: user bubbles, assistant turns (text blocks, reasoning, tool cards,
// per-turn figures). Every piece of model or user text goes in as text or through
// renderMarkdown (sanitised); nothing here builds HTML from strings.
import { renderMarkdown, copyText } from "./markdown.js";
import { h, icon, formatBytes, formatMs, formatCost } from "./dom.js";
import { enqueueSpeech, stopSpeech } from "./speech.js";

const IMAGE = /^image\/(png|jpe?g|gif|webp)$/i;

export function isImage(file) {
  return IMAGE.test(file.mimeType || file.mime_type || "");
}

function pretty(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") {
    try { return JSON.stringify(JSON.parse(value), null, 2); } catch { return value; }
  }
  return JSON.stringify(value, null, 2);
}

// A file: its name and size, a small picture for an image; in the composer, the upload's
// progress and a remove button. `file`: {filename, size, mimeType, previewUrl?, url?,
// progress?, state?}.
export function fileChip(file, onRemove) {
  const chip = h("span", { class: "file-chip", title: file.filename },
    icon("file", 14), h("span", { class: "name", text: file.filename }),
    file.size !== undefined ? h("span", { class: "size", text: formatBytes(file.size) }) : null);
  const picture = file.previewUrl || (isImage(file) && file.url);
  if (picture) chip.prepend(h("img", { src: picture, alt: "" }));
  if (file.state) chip.dataset.state = file.state;
  if (file.state === "uploading") {
    const bar = h("progress", { class: "upload-progress", max: "100", "aria-label": `Uploading ${file.filename}` });
    bar.value = Math.round((file.progress || 0) * 100);
    chip.append(bar);
  }
  if (onRemove) {
    chip.append(h("button", { type: "button", class: "chip-x", "aria-label": `Remove ${file.filename}`, onclick: onRemove, text: "×" }));
  }
  return chip;
}

// The files of a message: images as thumbnails (a link to the full picture), others as chips.
function messageFiles(files) {
  const box = h("div", { class: "files" });
  for (const f of files) {
    const src = f.previewUrl || f.url;
    if (isImage(f) && src) {
      box.append(h("a", { class: "thumb", href: f.url || src, target: "_blank", rel: "noopener", title: f.filename },
        h("img", { src, alt: f.filename })));
    } else {
      box.append(fileChip(f));
    }
  }
  return box;
}

export function userBubble(text, files = [], { voice = false } = {}) {
  const body = h("div", { class: "bubble" });
  if (voice) body.append(h("div", { class: "voice-tag", text: "🎙 transcribed" }));
  if (files.length) body.append(messageFiles(files));
  if (text) body.append(h("div", { class: "text", text }));
  const el = h("article", { class: "msg user" + (voice ? " voice" : "") }, body,
    h("div", { class: "msg-actions" }));
  el.dataset.text = text || "";
  return el;
}

// One assistant turn: text blocks and tool cards in the order they happened.
export class TurnView {
  constructor(turnId, { onApprove, onSpeak } = {}) {
    this.turnId = turnId;
    this.onApprove = onApprove;
    this.onSpeak = onSpeak;
    this.blocks = h("div", { class: "blocks" });
    this.reasoningText = "";
    this.reasoning = null;
    this.status = h("div", { class: "turn-status" });
    this.meta = h("div", { class: "turn-meta" });
    this.actions = h("div", { class: "msg-actions" });
    this.el = h("article", { class: "msg assistant streaming" },
      h("div", { class: "avatar", "aria-hidden": "true", text: "◆" }),
      h("div", { class: "turn-body" }, this.blocks, this.status, h("div", { class: "turn-foot" }, this.meta, this.actions)));
    this.el.dataset.turnId = turnId || "";
    this.current = null; // the text block being streamed into
    this.tools = new Map();
    this.approvals = new Map();
    this.renderScheduled = false;
    this.setWaiting(true);
  }

  setWaiting(on) {
    this.status.replaceChildren();
    if (on) this.status.append(h("span", { class: "typing" }, h("i"), h("i"), h("i")));
  }

  appendText(delta) {
    if (!delta) return;
    this.setWaiting(false);
    if (!this.current) {
      const el = h("div", { class: "md" });
      this.current = { el, text: "" };
      this.blocks.append(el);
    }
    this.current.text += delta;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.renderScheduled) return;
    this.renderScheduled = true;
    requestAnimationFrame(() => this.flush());
  }

  flush() {
    this.renderScheduled = false;
    for (const block of this.blocks.querySelectorAll(".md.dirty")) block.classList.remove("dirty");
    if (this.current) renderMarkdown(this.current.el, this.current.text);
  }

  get text() {
    return [...this.blocks.querySelectorAll(".md")].map((el) => el.textContent).join("\n");
  }

  addReasoning(content) {
    if (!content) return;
    this.reasoningText += content;
    if (!this.reasoning) {
      this.reasoningBody = h("div", { class: "reasoning-body" });
      this.reasoning = h("details", { class: "reasoning" },
        h("summary", {}, icon("brain", 14), h("span", { text: "Reasoning" })), this.reasoningBody);
      this.el.querySelector(".turn-body").prepend(this.reasoning);
    }
    this.reasoningBody.textContent = this.reasoningText;
  }

  toolStart({ id, name, input }) {
    this.setWaiting(false);
    this.current = null;
    if (this.tools.has(id)) return this.tools.get(id);
    const state = h("span", { class: "tool-state running", text: "running" });
    const output = h("pre", { class: "tool-output" });
    const inputText = pretty(input);
    const card = h("details", { class: "tool-card" },
      h("summary", {}, icon("tool", 14), h("span", { class: "tool-name", text: name || "tool" }),
        h("span", { class: "tool-brief", text: brief(input) }), state),
      h("div", { class: "tool-detail" },
        inputText ? h("div", { class: "tool-label", text: "Input" }) : null,
        inputText ? h("pre", { class: "tool-input", text: inputText }) : null,
        output));
    const tool = { card, state, output, approval: null };
    this.tools.set(id, tool);
    this.blocks.append(card);
    return tool;
  }

  toolEnd({ id, name, status, output, durationMs }) {
    const tool = this.tools.get(id) || this.toolStart({ id, name, input: null });
    tool.state.className = `tool-state ${status || "ok"}`;
    tool.state.textContent = (status || "ok") + (durationMs !== undefined && durationMs !== null ? ` · ${formatMs(durationMs)}` : "");
    if (output) {
      const detail = tool.output.parentNode;
      if (!detail.querySelector(".out-label")) detail.insertBefore(h("div", { class: "tool-label out-label", text: "Output" }), tool.output);
      tool.output.textContent = output;
    }
    if (tool.approval) tool.approval.remove();
    tool.approval = null;
    this.setWaiting(true);
  }

  approvalRequest(frame) {
    const req = frame.request || {};
    const id = frame.toolCallId;
    const tool = (id && this.tools.get(id)) || [...this.tools.values()].pop() || this.toolStart({ id: id || frame.requestId, name: req.tool, input: req.query });
    tool.state.className = "tool-state waiting";
    tool.state.textContent = "needs approval";
    tool.card.open = true;
    const box = h("div", { class: "approval-inline" },
      h("span", { text: `Allow ${req.tool || "this tool"} to run?` }),
      h("button", { type: "button", class: "btn small primary", text: "Approve", onclick: () => this.onApprove?.(frame.requestId, true) }),
      h("button", { type: "button", class: "btn small", text: "Deny", onclick: () => this.onApprove?.(frame.requestId, false) }));
    if (tool.approval) tool.approval.remove();
    tool.approval = box;
    tool.card.querySelector(".tool-detail").prepend(box);
    this.approvals.set(frame.requestId, tool);
    this.setWaiting(false);
  }

  approvalResolved(requestId, approved) {
    const tool = this.approvals.get(requestId);
    if (!tool) return;
    if (tool.approval) tool.approval.remove();
    tool.approval = null;
    tool.state.className = approved ? "tool-state running" : "tool-state denied";
    tool.state.textContent = approved ? "approved · running" : "denied";
  }

  stopped() {
    this.el.classList.add("was-stopped");
  }

  error(message, code) {
    this.setWaiting(false);
    this.blocks.append(h("div", { class: "turn-error", role: "alert" },
      h("strong", { text: "Error" }), h("span", { text: ` ${message}` }), code ? h("code", { text: code }) : null));
    this.finish();
  }

  // Spoken reply: one clip per sentence; a "Play" button replays them all in order.
  audio(url, autoplay) {
    this.clips = this.clips || [];
    this.clips.push(url);
    if (!this.playButton) {
      this.playButton = h("button", { type: "button", class: "icon-btn play-btn", title: "Play the spoken reply", "aria-label": "Play the spoken reply",
        onclick: () => { stopSpeech(); for (const clip of this.clips) enqueueSpeech(clip); } }, icon("play"));
      this.actions.prepend(this.playButton);
    }
    if (autoplay) enqueueSpeech(url);
  }

  done(frame) {
    if (!this.current && !this.blocks.querySelector(".md") && frame.finalContent) this.appendText(frame.finalContent);
    this.flush();
    const latency = frame.latency || {};
    const parts = [];
    if (frame.tokensIn !== undefined) parts.push(`${frame.tokensIn.toLocaleString()} in · ${(frame.tokensOut || 0).toLocaleString()} out`);
    const cost = formatCost(frame.costUsd);
    if (cost) parts.push(cost);
    const dur = formatMs(frame.durationMs);
    if (dur) parts.push(dur);
    if (latency.firstTokenMs !== undefined && latency.firstTokenMs !== null) parts.push(`first token ${formatMs(latency.firstTokenMs)}`);
    const model = frame.resolvedModel || frame.model;
    if (model) parts.push(model);
    this.meta.replaceChildren(...parts.map((p) => h("span", { text: p })));
    if (frame.stopReason === "stopped") {
      this.stopped();
      this.meta.prepend(h("span", { class: "badge", text: "stopped" }));
    } else if (frame.stopReason === "max_rounds") {
      this.meta.prepend(h("span", { class: "badge", text: "tool round limit" }));
    }
    this.finish();
  }

  finish() {
    this.el.classList.remove("streaming");
    this.setWaiting(false);
    if (this.blocks.querySelector(".md") && !this.actions.querySelector(".copy-msg")) {
      this.actions.append(h("button", { type: "button", class: "icon-btn copy-msg", title: "Copy answer", "aria-label": "Copy answer",
        onclick: (e) => copyText(this.text, e.currentTarget) }, icon("copy")));
      if (this.onSpeak) {
        this.actions.append(h("button", { type: "button", class: "icon-btn speak-btn", title: "Read aloud", "aria-label": "Read aloud",
          onclick: () => this.onSpeak(this) }, icon("speaker")));
      }
    }
  }
}

function brief(input) {
  if (input === undefined || input === null) return "";
  let value = input;
  if (typeof value === "string") {
    try { value = JSON.parse(value); } catch { return value.slice(0, 80); }
  }
  if (typeof value === "object") {
    const first = Object.values(value).find((v) => typeof v === "string");
    if (first) return first.slice(0, 80);
  }
  return JSON.stringify(value).slice(0, 80);
}

// Rebuilds turns from stored messages (GET /api/sessions/{id}/messages: snake_case rows).
// `fileUrl(file)`: where a stored file is served (for image thumbnails).
export function renderHistory(messages, container, { skipTurns, skipUsers, makeTurn, fileUrl }) {
  const turns = new Map();
  for (const m of messages) {
    const turnId = m.turn_id || m.id;
    if (m.role === "user") {
      // A voice turn being replayed brings its own `transcribed` event.
      if (skipUsers && skipUsers.has(turnId)) continue;
      const voice = !!(m.meta && (m.meta.input === "voice" || m.meta.voice));
      const files = (m.files || []).map((f) => ({ ...f, mimeType: f.mime_type, url: fileUrl ? fileUrl(f) : null }));
      container.append(userBubble(m.content, files, { voice }));
      continue;
    }
    if (skipTurns.has(turnId)) continue;
    if (m.role !== "assistant" && m.role !== "tool") continue;
    let view = turns.get(turnId);
    if (!view) {
      view = makeTurn(turnId);
      turns.set(turnId, view);
      container.append(view.el);
    }
    if (m.role === "assistant") {
      if (m.reasoning) view.addReasoning(m.reasoning);
      if (m.content) {
        view.current = null;
        view.appendText(m.content);
        view.flush();
      }
      let calls = [];
      try { calls = m.tool_calls ? JSON.parse(m.tool_calls) : []; } catch { calls = []; }
      for (const c of calls) view.toolStart({ id: c.id, name: c.name, input: c.arguments });
      const meta = m.meta || {};
      if (m.status === "error") view.error(meta.error || "The turn failed", meta.code);
      else if (meta.tokensIn !== undefined || m.status === "stopped" || m.status === "complete") {
        view.done({ ...meta, stopReason: meta.stopReason || (m.status === "stopped" ? "stopped" : undefined) });
      }
      if (m.status === "interrupted") view.meta.prepend(h("span", { class: "badge", text: "interrupted" }));
    } else {
      let result = {};
      try { result = m.tool_result ? JSON.parse(m.tool_result) : {}; } catch { result = {}; }
      view.toolEnd({ id: result.id, name: result.name, status: result.status, output: m.content });
      view.setWaiting(false);
    }
  }
  for (const view of turns.values()) view.finish();
  return turns;
}
