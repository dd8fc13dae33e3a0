// The chat view: the session on screen, bound over the socket without loss (`resume`), its
// events applied to the messages, sending, stopping, retrying and editing; the context meter
// and the session's running totals in the top bar.
import { api, ApiError, enc } from "./api.js";
import { $, $$, h, icon, toast, uuid, closeDrawer, formatCost, formatCount } from "./dom.js";
import { CLIENT, ERROR, EVENT } from "./protocol.js";
import { userBubble, TurnView, renderHistory, isImage } from "./view.js";
import { audioUrl, enqueueSpeech, stopSpeech } from "./speech.js";
import { picks, showAgent, announceAgent } from "./agents.js";
import { openApproval, closeApproval, closeApprovalsOf, closeAllApprovals, answerApproval } from "./approvals.js";

const KEY_SESSION = "prismd.sessionId";

// The state of the chat on screen (and only that).
export const chat = {
  sessionId: localStorage.getItem(KEY_SESSION) || null,
  lastSeq: 0,
  turns: new Map(), // turnId -> TurnView of the session shown
  turn: null, // the running turn's view
  pendingTurn: null, // the placeholder of a chat sent, before its `start`
  running: false,
  resume: null, // {sessionId, mode: "load"|"reconnect"} while waiting for the `session` reply
  queue: null, // events held while the history loads
  shownSession: null, // the session whose messages are on screen
  autoTitle: null,
  speakTarget: null,
};

let deps = null;

// conn: the Connection; sessionsChanged(); signedOut(message); setupNeeded();
// runningChanged(running); sessionChanged(sessionId) (another session is on screen).
export function initChat(options) {
  deps = options;
}

const send = (frame) => deps.conn.send(frame);

export function scrollToEnd(force = false) {
  const box = $("#messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
  if (force || near) requestAnimationFrame(() => { box.scrollTop = box.scrollHeight; });
}

function setRunning(running) {
  chat.running = running;
  $("#send").hidden = running;
  $("#stop").hidden = !running;
  document.body.classList.toggle("turn-running", running);
  updateLastActions();
  deps.runningChanged(running);
}

export function showEmpty(on) {
  $("#empty-state").hidden = !on;
  $("#messages").classList.toggle("is-empty", on);
}

function clearMessages() {
  $("#messages-inner").replaceChildren();
  chat.turns = new Map();
  chat.turn = null;
  chat.pendingTurn = null;
  closeAllApprovals();
  $("#context-meter").hidden = true;
  $("#session-usage").hidden = true;
}

function rememberSession(id) {
  chat.sessionId = id;
  if (id) localStorage.setItem(KEY_SESSION, id);
  else localStorage.removeItem(KEY_SESSION);
}

// ------------------------------------------------------------------ binding to a session

// A new socket is ready: bind it to the session on screen (or send what waited).
export function onConnected() {
  announceAgent();
  if (chat.sessionId) {
    const reconnect = chat.shownSession === chat.sessionId;
    startResume(chat.sessionId, reconnect ? "reconnect" : "load");
  } else {
    deps.conn.flush();
  }
}

// Binds to a session. "load": the screen is rebuilt from the history over REST plus a replay
// of the turn in progress from its start; "reconnect": the screen is intact and only the
// events after the last one seen are replayed.
function startResume(sessionId, mode) {
  chat.resume = { sessionId, mode };
  if (mode === "load") {
    chat.queue = [];
    send({ type: CLIENT.RESUME, sessionId });
  } else {
    send({ type: CLIENT.RESUME, sessionId, lastSeq: chat.lastSeq });
  }
}

function fileUrl(sessionId) {
  return (f) => (isImage(f) ? `/api/sessions/${enc(sessionId)}/files/${enc(f.id)}` : null);
}

async function onResumed(frame) {
  const pending = chat.resume;
  chat.resume = null;
  if (pending.mode === "reconnect") {
    deps.conn.flush();
    return;
  }
  const sessionId = frame.sessionId;
  let history = [];
  try {
    history = await api(`/api/sessions/${enc(sessionId)}/messages`);
  } catch (err) {
    if (err.status === 401) return deps.signedOut();
    history = [];
  }
  if (chat.sessionId !== sessionId) return; // switched away meanwhile
  // A chat typed while offline waits in the outbox: keep its bubble and placeholder.
  const waiting = deps.conn.waiting && chat.pendingTurn ? chat.pendingTurn : null;
  const waitingBubble = waiting ? waiting.el.previousElementSibling : null;
  clearMessages();
  const queued = chat.queue || [];
  chat.queue = null;
  const live = new Set(queued.filter((f) => f.turnId).map((f) => f.turnId));
  const spoken = new Set(queued.filter((f) => f.type === EVENT.TRANSCRIBED).map((f) => f.turnId));
  const turns = renderHistory(history, $("#messages-inner"), {
    skipTurns: live, skipUsers: spoken, makeTurn, fileUrl: fileUrl(sessionId),
  });
  for (const [id, view] of turns) chat.turns.set(id, view);
  chat.shownSession = sessionId;
  showEmpty(!history.length && !queued.length);
  chat.lastSeq = 0;
  for (const event of queued) applyEvent(event, false);
  chat.lastSeq = Math.max(chat.lastSeq, frame.lastSeq || 0);
  if (waiting) {
    if (waitingBubble) $("#messages-inner").append(waitingBubble);
    $("#messages-inner").append(waiting.el);
    chat.pendingTurn = waiting;
    showEmpty(false);
  }
  if ($("#context-meter").hidden) {
    try {
      const saved = JSON.parse(localStorage.getItem(`prismd.context.${sessionId}`) || "null");
      if (saved) setContextMeter(saved, false);
    } catch { /* a bad saved value is ignored */ }
  }
  setRunning(!!frame.turnRunning || !!waiting);
  updateLastActions();
  scrollToEnd(true);
  refreshSessionUsage();
  deps.conn.flush();
}

// Every frame from the socket but `connected`.
export function onFrame(frame) {
  switch (frame.type) {
    case EVENT.SESSION_ENDED:
      if (leaving) leaving();
      return;
    case EVENT.PONG:
    case EVENT.AGENT_SELECTED:
    case EVENT.VOICE_STATE:
      return;
    case EVENT.SESSION:
      return onSession(frame);
    default:
      break;
  }
  if (frame.seq === undefined || frame.seq === null) {
    if (frame.type === EVENT.ERROR) return onPlainError(frame);
    if (frame.type === EVENT.STOPPED) return setRunning(false); // nothing was running
    if (frame.type === EVENT.APPROVAL_RESOLVED) return applyEvent(frame, true);
    if (frame.type === EVENT.AUDIO && frame.data) {
      // The answer to `speak` ("Read aloud"): for this connection only.
      const url = audioUrl(frame.data, frame.format, frame.sampleRate);
      if (chat.speakTarget && chat.speakTarget.el.isConnected) chat.speakTarget.audio(url, true);
      else enqueueSpeech(url);
    }
    return;
  }
  if (frame.sessionId && chat.sessionId && frame.sessionId !== chat.sessionId) return;
  if (chat.queue) {
    chat.queue.push(frame);
    return;
  }
  applyEvent(frame, true);
}

function onSession(frame) {
  if ("lastSeq" in frame) {
    // A reply to `resume`; one for a session the user already left is stale.
    if (chat.resume && chat.resume.sessionId === frame.sessionId) {
      showAgent(frame.agentId);
      onResumed(frame);
    }
    return;
  }
  // Bound by a chat (a new session, or one created by a voice turn).
  if (chat.sessionId !== frame.sessionId) {
    rememberSession(frame.sessionId);
    chat.lastSeq = 0;
    const users = $$("#messages-inner .msg.user");
    const first = users.length ? users[0].dataset.text : "";
    if (first) chat.autoTitle = { sessionId: frame.sessionId, text: first };
  }
  chat.shownSession = frame.sessionId;
  showAgent(frame.agentId);
  deps.sessionsChanged();
}

function onPlainError(frame) {
  const code = frame.code;
  if (code === ERROR.RESUME_GAP && chat.sessionId) {
    chat.shownSession = null;
    startResume(chat.sessionId, "load");
    return;
  }
  if (code === ERROR.SESSION_NOT_FOUND && chat.resume) {
    chat.resume = null;
    chat.queue = null;
    newChat(false);
    return;
  }
  if (code === ERROR.PROVIDER_UNCONFIGURED) {
    setRunning(false);
    dropPendingTurn();
    deps.setupNeeded();
    return;
  }
  if (code === ERROR.TURN_IN_PROGRESS) {
    dropPendingTurn(true);
    toast(frame.error, "warn");
    return;
  }
  if (code === ERROR.UNAUTHORIZED) return deps.signedOut("Sign in again.");
  if ([ERROR.STT_UNAVAILABLE, ERROR.TRANSCRIPTION_FAILED, ERROR.TTS_UNAVAILABLE].includes(code)) {
    if (!deps.handsFreeActive()) {
      setRunning(false);
      dropPendingTurn();
    } else if (code === ERROR.TRANSCRIPTION_FAILED) {
      return; // hands-free: something that was not speech; keep listening
    }
  } else if (chat.pendingTurn) {
    setRunning(false);
    dropPendingTurn(true);
  }
  toast(frame.error || "Error", "error");
}

function makeTurn(turnId) {
  return new TurnView(turnId, { onApprove: answerApproval, onSpeak: speakTurn });
}

export function resolvedApproval(requestId, approved) {
  for (const view of chat.turns.values()) view.approvalResolved(requestId, approved);
}

// "Read aloud": `speak` answers with `audio` frames for this connection only (no seq).
function speakTurn(view) {
  const text = view.text.trim();
  if (!text) return;
  stopSpeech();
  chat.speakTarget = view;
  view.clips = [];
  send({ type: CLIENT.SPEAK, text: text.slice(0, 4000) });
}

function turnFor(frame) {
  const id = frame.turnId;
  let view = chat.turns.get(id);
  if (!view) {
    view = chat.pendingTurn || makeTurn(id);
    chat.pendingTurn = null;
    view.turnId = id;
    view.el.dataset.turnId = id;
    chat.turns.set(id, view);
    if (!view.el.isConnected) $("#messages-inner").append(view.el);
  }
  return view;
}

function applyEvent(frame, live) {
  if (frame.seq !== undefined && frame.seq !== null) {
    if (frame.seq <= chat.lastSeq) return; // already shown (replay overlap)
    chat.lastSeq = frame.seq;
  }
  showEmpty(false);
  switch (frame.type) {
    case EVENT.START: {
      chat.turn = turnFor(frame);
      setRunning(true);
      break;
    }
    case EVENT.CHUNK:
      turnFor(frame).appendText(frame.delta);
      break;
    case EVENT.REASONING:
      turnFor(frame).addReasoning(frame.content);
      break;
    case EVENT.TOOL_START:
      turnFor(frame).toolStart(frame);
      break;
    case EVENT.TOOL_END:
      turnFor(frame).toolEnd(frame);
      break;
    case EVENT.APPROVAL_REQUEST:
      turnFor(frame).approvalRequest(frame);
      openApproval(frame);
      break;
    case EVENT.APPROVAL_RESOLVED:
      resolvedApproval(frame.requestId, frame.approved);
      closeApproval(frame.requestId);
      break;
    case EVENT.STOPPED:
      if (frame.turnId) turnFor(frame).stopped();
      if (live) stopSpeech(); // what was not spoken yet never will be (barge-in, Esc)
      break;
    case EVENT.TRANSCRIBED: {
      const view = chat.turns.get(frame.turnId);
      const bubble = userBubble(frame.text, [], { voice: true });
      if (view && view.el.isConnected) view.el.before(bubble);
      else $("#messages-inner").append(bubble);
      setRunning(true);
      break;
    }
    case EVENT.AUDIO:
      if (frame.data) turnFor(frame).audio(audioUrl(frame.data, frame.format, frame.sampleRate), live);
      break;
    case EVENT.DONE:
      turnFor(frame).done(frame);
      closeApprovalsOf(frame.turnId);
      if (chat.turn && chat.turn.turnId === frame.turnId) chat.turn = null;
      setRunning(false);
      if (live) {
        autoTitle().finally(deps.sessionsChanged);
        refreshSessionUsage();
      }
      break;
    case EVENT.CONTEXT_USAGE:
      setContextMeter(frame);
      break;
    case EVENT.ERROR:
      turnFor(frame).error(frame.error, frame.code);
      setRunning(false);
      if (live) deps.sessionsChanged();
      break;
    default:
      break;
  }
  scrollToEnd();
}

// A new chat is named after its first message (once, and only if it has no name yet).
async function autoTitle() {
  const pending = chat.autoTitle;
  chat.autoTitle = null;
  if (!pending || pending.sessionId !== chat.sessionId) return;
  const line = pending.text.split("\n").find((l) => l.trim()) || "";
  const name = line.trim().length > 60 ? `${line.trim().slice(0, 57)}…` : line.trim();
  if (!name) return;
  try {
    const session = await api(`/api/sessions/${enc(pending.sessionId)}`);
    if (!session.name) {
      await api(`/api/sessions/${enc(pending.sessionId)}`, { method: "PATCH", body: { name } });
    }
  } catch { /* no rename route on this server: the sidebar shows "Untitled chat" */ }
}

// ------------------------------------------------------------------ top bar figures

function setContextMeter(frame, save = true) {
  if (save && chat.sessionId) {
    const { usedTokens, maxContext, percentage, breakdown } = frame;
    localStorage.setItem(`prismd.context.${chat.sessionId}`, JSON.stringify({ usedTokens, maxContext, percentage, breakdown }));
  }
  const meter = $("#context-meter");
  const pct = Math.max(0, Math.min(100, Number(frame.percentage) || 0));
  meter.hidden = false;
  $("#context-fill").style.width = `${Math.max(pct, 1.5)}%`;
  meter.classList.toggle("warn", pct >= 70);
  meter.classList.toggle("full", pct >= 90);
  $("#context-label").textContent = `${pct < 10 ? pct.toFixed(1) : Math.round(pct)}%`;
  const b = frame.breakdown || {};
  meter.title = `Context: ${(frame.usedTokens || 0).toLocaleString()} of ${(frame.maxContext || 0).toLocaleString()} tokens` +
    (b.systemPrompt !== undefined ? `\nsystem ${b.systemPrompt} · user ${b.userMessages} · assistant ${b.assistantMessages}` : "");
}

// The session's totals (its stored turns): turns, tokens, cost.
async function refreshSessionUsage() {
  const id = chat.sessionId;
  const box = $("#session-usage");
  if (!id) {
    box.hidden = true;
    return;
  }
  let row;
  try { row = await api(`/api/sessions/${enc(id)}`); } catch { return; }
  if (chat.sessionId !== id || !row.turn_count) return;
  const tokens = (row.tokens_in || 0) + (row.tokens_out || 0);
  const cost = row.cost_known === false ? `${formatCost(row.cost_usd)}+` : formatCost(row.cost_usd);
  box.textContent = `${row.turn_count} turn${row.turn_count === 1 ? "" : "s"} · ${formatCount(tokens)} tokens · ${cost}`;
  box.title = `This chat: ${formatCount(row.tokens_in)} tokens in, ${formatCount(row.tokens_out)} out` +
    (row.cost_known === false ? " (some turns used a model with no known price)" : "");
  box.hidden = false;
}

// ------------------------------------------------------------------ the last exchange

function dropPendingTurn(removeBubble = false) {
  if (chat.pendingTurn) {
    chat.pendingTurn.el.remove();
    chat.pendingTurn = null;
    if (removeBubble) {
      const users = $$("#messages-inner .msg.user");
      const last = users[users.length - 1];
      if (last && last.nextElementSibling === null) {
        $("#input").value = last.dataset.text || "";
        last.remove();
      }
    }
  }
}

function updateLastActions() {
  for (const btn of $$("#messages-inner .edit-btn, #messages-inner .retry-btn")) btn.remove();
  if (chat.running) return;
  const users = $$("#messages-inner .msg.user:not(.voice)");
  const lastUser = users[users.length - 1];
  if (lastUser) {
    lastUser.querySelector(".msg-actions").append(h("button", {
      type: "button", class: "icon-btn edit-btn", title: "Edit and resend", "aria-label": "Edit and resend",
      onclick: () => editLast(lastUser),
    }, icon("edit")));
  }
  const answers = $$("#messages-inner .msg.assistant");
  const lastAnswer = answers[answers.length - 1];
  if (lastAnswer && chat.sessionId) {
    lastAnswer.querySelector(".msg-actions").append(h("button", {
      type: "button", class: "icon-btn retry-btn", title: "Retry", "aria-label": "Retry",
      onclick: () => retry(),
    }, icon("retry")));
  }
}

// Sends a chat; `files` are uploads ({fileId, filename, mimeType, size, previewUrl?, url?}).
// False when it cannot go now (an answer is coming, the chat is loading).
export function sendChat(text, files) {
  if (!text.trim() && !files.length) return false;
  if (chat.running) {
    toast("An answer is still coming: stop it first (Esc).", "warn");
    return false;
  }
  if (chat.queue) {
    toast("Still loading this chat…", "warn");
    return false;
  }
  const frame = { type: CLIENT.CHAT, message: text, clientMessageId: uuid() };
  if (chat.sessionId) frame.sessionId = chat.sessionId;
  if (picks.agentId) frame.agentId = picks.agentId;
  if (picks.model) frame.model = picks.model;
  if (files.length) frame.files = files.map((f) => ({ fileId: f.fileId }));
  showEmpty(false);
  $("#messages-inner").append(userBubble(text, files));
  chat.pendingTurn = makeTurn(null);
  $("#messages-inner").append(chat.pendingTurn.el);
  setRunning(true);
  scrollToEnd(true);
  send(frame);
  return true;
}

export function stop() {
  stopSpeech();
  if (!chat.running) return;
  send({ type: CLIENT.STOP });
}

// Drops the last exchange on the server (POST …/retry), then sends `text` (default: the same)
// with the files, which the server hands back as new uploads.
async function retry(text) {
  if (chat.running || !chat.sessionId) return;
  let res;
  try {
    res = await api(`/api/sessions/${enc(chat.sessionId)}/retry`, { method: "POST" });
  } catch (err) {
    toast(`Retry failed: ${err.message}`, "error");
    return;
  }
  // Remove the last exchange from the screen: the last user message and what follows it.
  const users = $$("#messages-inner .msg.user");
  const last = users[users.length - 1];
  if (last) {
    while (last.nextElementSibling) last.nextElementSibling.remove();
    last.remove();
  }
  const files = (res.files || []).map((f) => ({
    ...f, fileId: f.id, url: isImage(f) ? `/api/uploads/${enc(f.id)}` : null,
  }));
  sendChat(text ?? res.message ?? "", files);
}

function editLast(bubble) {
  if (chat.running) return;
  const original = bubble.dataset.text || "";
  const area = h("textarea", { class: "edit-area", rows: 3, "aria-label": "Edit message" });
  area.value = original;
  const save = () => {
    const text = area.value;
    if (!text.trim()) return;
    retry(text);
  };
  const form = h("div", { class: "edit-box" }, area,
    h("div", { class: "edit-buttons" },
      h("button", { type: "button", class: "btn small", text: "Cancel", onclick: () => { form.remove(); bubble.hidden = false; } }),
      h("button", { type: "button", class: "btn small primary", text: "Save & send", onclick: save })));
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save(); }
    if (e.key === "Escape") { e.stopPropagation(); form.remove(); bubble.hidden = false; }
  });
  bubble.hidden = true;
  bubble.after(form);
  area.focus();
}

// ------------------------------------------------------------------ switching sessions

export function openSession(id) {
  closeDrawer();
  if (id === chat.sessionId && chat.shownSession === id) return;
  rememberSession(id);
  chat.shownSession = null;
  chat.lastSeq = 0;
  setRunning(false);
  clearMessages();
  showEmpty(false);
  $("#messages-inner").append(h("div", { class: "loading", text: "Loading…" }));
  deps.sessionChanged(id);
  if (deps.conn.ready) startResume(id, "load");
}

export function newChat(notify = true) {
  closeDrawer();
  if (notify && chat.sessionId) send({ type: CLIENT.NEW_SESSION });
  rememberSession(null);
  chat.shownSession = null;
  chat.lastSeq = 0;
  setRunning(false);
  clearMessages();
  showEmpty(true);
  deps.sessionChanged(null);
  $("#input").focus();
}

// A session deleted elsewhere in the app: if it is on screen, start afresh (the server has
// unbound this connection from it).
export function forgetSession(id) {
  localStorage.removeItem(`prismd.context.${id}`);
  if (id === chat.sessionId) newChat(false);
}

let leaving = null;

// Leaves the session on screen for a new chat, and resolves once the server has unbound this
// connection from it (`new_session` → `session_ended`): a chat sent after that cannot land in
// it. (Archiving the chat on screen waits for this, or its next message would reopen it.)
export function leaveSession() {
  const bound = !!chat.sessionId && deps.conn.open;
  newChat(false);
  if (!bound) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, 5000);
    function done() {
      clearTimeout(timer);
      if (leaving === done) leaving = null;
      resolve();
    }
    leaving = done;
    send({ type: CLIENT.NEW_SESSION });
  });
}

export function markStarted() {
  setRunning(true);
  showEmpty(false);
}
