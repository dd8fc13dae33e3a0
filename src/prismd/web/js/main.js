// The prismd web app: state, the WebSocket connection (resume without loss, reconnect with
// backoff), the sessions sidebar, pickers, composer, approvals, voice.
import { api, maybe, ApiError } from "./api.js";
import { h, icon, fileChip, userBubble, TurnView, renderHistory, enqueueSpeech, stopSpeech } from "./view.js";
import { Recorder, micSupported, audioUrl } from "./voice.js";

const $ = (sel) => document.querySelector(sel);
const MAX_FILE_BYTES = 10 * 1024 * 1024;
const KEY_SESSION = "prismd.sessionId";
const KEY_AGENT = "prismd.agentId";
const KEY_MODEL = "prismd.model";
const KEY_THEME = "prismd.theme";

const S = {
  user: null,
  authRequired: false,
  agents: [],
  defaultAgent: null,
  agentId: localStorage.getItem(KEY_AGENT) || null,
  model: localStorage.getItem(KEY_MODEL) || "",
  sessionId: localStorage.getItem(KEY_SESSION) || null,
  lastSeq: 0,
  turns: new Map(), // turnId -> TurnView of the session shown
  turn: null, // the running turn's view
  running: false,
  files: [],
  ws: null,
  ready: false, // `connected` received on the current socket
  attempts: 0,
  reconnectTimer: null,
  outbox: [],
  resume: null, // {sessionId, mode: "load"|"reconnect"} while waiting for the `session` reply
  queue: null, // events held while the history loads
  shownSession: null, // the session whose messages are on screen
  approvals: new Map(), // requestId -> frame (open)
  started: false,
};
window.prismd = S; // handy in the console and for tests

// ------------------------------------------------------------------ theme

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}
function effectiveTheme() {
  return document.documentElement.dataset.theme ||
    (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
}
applyTheme(localStorage.getItem(KEY_THEME));

// ------------------------------------------------------------------ small UI helpers

let toastTimer = null;
function toast(message, kind = "info") {
  const el = $("#toast");
  el.textContent = message;
  el.className = `toast show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.className = "toast"; }, 4500);
}

function show(view) {
  for (const id of ["#login-view", "#setup-view", "#chat-view"]) $(id).hidden = id !== view;
  document.body.classList.remove("booting");
}

function scrollToEnd(force = false) {
  const box = $("#messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
  if (force || near) requestAnimationFrame(() => { box.scrollTop = box.scrollHeight; });
}

function setRunning(running) {
  S.running = running;
  $("#send").hidden = running;
  $("#stop").hidden = !running;
  document.body.classList.toggle("turn-running", running);
  updateLastActions();
}

function setConn(state, text) {
  const el = $("#conn");
  el.className = `conn ${state}`;
  el.title = text;
  $("#conn-text").textContent = text;
}

// ------------------------------------------------------------------ boot, login, setup

async function boot() {
  let status = { authRequired: false, user: null };
  try {
    status = await maybe("/api/auth/status", status);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) console.warn("auth status", err);
    else status = { authRequired: true, user: null };
  }
  S.authRequired = !!status.authRequired;
  S.user = status.user || null;
  if (S.authRequired && !S.user) {
    showLogin();
    return;
  }
  await enter();
}

function showLogin(message) {
  show("#login-view");
  $("#login-error").textContent = message || "";
  $("#login-user").focus();
}

async function login(event) {
  event.preventDefault();
  const button = $("#login-submit");
  button.disabled = true;
  $("#login-error").textContent = "";
  try {
    const res = await api("/api/auth/login", {
      method: "POST",
      body: { username: $("#login-user").value.trim(), password: $("#login-pass").value },
    });
    S.user = res && res.user;
    $("#login-pass").value = "";
    await enter();
  } catch (err) {
    const status = err instanceof ApiError ? err.status : 0;
    $("#login-error").textContent = status === 429 ? "Too many attempts: wait a minute and try again."
      : status === 401 ? "Wrong user name or password." : `Could not sign in (${err.message}).`;
  } finally {
    button.disabled = false;
  }
}

async function logout() {
  try { await api("/api/auth/logout", { method: "POST" }); } catch { /* already out */ }
  location.reload();
}

async function enter() {
  let health = { providerConfigured: true };
  try { health = await api("/api/health"); } catch (err) { if (err.status === 401) return showLogin(); }
  $("#user-name").textContent = S.user ? S.user.name : "";
  $("#user-box").hidden = !(S.user && S.authRequired);
  if (!health.providerConfigured && !sessionStorage.getItem("prismd.skipSetup")) {
    show("#setup-view");
    return;
  }
  startChat();
}

async function recheckSetup() {
  const health = await api("/api/health").catch(() => ({ providerConfigured: false }));
  if (health.providerConfigured) startChat();
  else toast("Still no model provider: set one of the variables above and restart prismd.", "warn");
}

function startChat() {
  show("#chat-view");
  if (S.started) return;
  S.started = true;
  loadAgents();
  loadModels();
  refreshSessions();
  if (!S.sessionId) showEmpty(true);
  connect();
  $("#input").focus();
}

// ------------------------------------------------------------------ WebSocket

function connect() {
  clearTimeout(S.reconnectTimer);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const ws = new WebSocket(url);
  S.ws = ws;
  S.ready = false;
  setConn("connecting", S.attempts ? "Reconnecting…" : "Connecting…");
  ws.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    onFrame(frame);
  });
  ws.addEventListener("close", () => {
    if (S.ws !== ws) return;
    S.ready = false;
    S.resume = null;
    scheduleReconnect();
  });
}

async function scheduleReconnect() {
  S.attempts += 1;
  const delay = Math.min(10000, 400 * 2 ** Math.min(S.attempts - 1, 5)) * (0.75 + Math.random() / 2);
  setConn("down", `Disconnected — retrying in ${Math.round(delay / 1000)} s`);
  if (S.attempts >= 2 && S.authRequired) {
    // A refused upgrade looks like a closed socket: check whether the login expired.
    const status = await maybe("/api/auth/status", null).catch(() => null);
    if (status && status.authRequired && !status.user) return showLogin("Your session ended: sign in again.");
  }
  S.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (S.ws && S.ready && S.ws.readyState === WebSocket.OPEN) {
    S.ws.send(JSON.stringify(frame));
    return true;
  }
  if (frame.type === "chat" || frame.type === "approval_response") S.outbox.push(frame);
  return false;
}

function onConnected() {
  S.ready = true;
  S.attempts = 0;
  setConn("up", "Connected");
  if (S.agentId) send({ type: "select_agent", agentId: S.agentId });
  if (S.sessionId) {
    const reconnect = S.shownSession === S.sessionId;
    startResume(S.sessionId, reconnect ? "reconnect" : "load");
  } else {
    flushOutbox();
  }
}

function flushOutbox() {
  const frames = S.outbox;
  S.outbox = [];
  for (const frame of frames) send(frame);
}

// Binds to a session. "load": the screen is rebuilt from the history over REST plus a replay
// of the turn in progress from its start; "reconnect": the screen is intact and only the
// events after the last one seen are replayed.
function startResume(sessionId, mode) {
  S.resume = { sessionId, mode };
  if (mode === "load") {
    S.queue = [];
    const frame = { type: "resume", sessionId };
    send(frame);
  } else {
    send({ type: "resume", sessionId, lastSeq: S.lastSeq });
  }
}

async function onResumed(frame) {
  const pending = S.resume;
  S.resume = null;
  if (pending.mode === "reconnect") {
    flushOutbox();
    return;
  }
  const sessionId = frame.sessionId;
  let history = [];
  try {
    history = await api(`/api/sessions/${encodeURIComponent(sessionId)}/messages`);
  } catch (err) {
    if (err.status === 401) return showLogin();
    history = [];
  }
  if (S.sessionId !== sessionId) return; // switched away meanwhile
  // A chat typed while offline waits in the outbox: keep its bubble and placeholder.
  const waiting = S.outbox.length && S.pendingTurn ? S.pendingTurn : null;
  const waitingBubble = waiting ? waiting.el.previousElementSibling : null;
  clearMessages();
  const queued = S.queue || [];
  S.queue = null;
  const live = new Set(queued.filter((f) => f.turnId).map((f) => f.turnId));
  const spoken = new Set(queued.filter((f) => f.type === "transcribed").map((f) => f.turnId));
  const turns = renderHistory(history, $("#messages-inner"), { skipTurns: live, skipUsers: spoken, makeTurn });
  for (const [id, view] of turns) S.turns.set(id, view);
  S.shownSession = sessionId;
  showEmpty(!history.length && !queued.length);
  S.lastSeq = 0;
  for (const event of queued) applyEvent(event, false);
  S.lastSeq = Math.max(S.lastSeq, frame.lastSeq || 0);
  if (waiting) {
    if (waitingBubble) $("#messages-inner").append(waitingBubble);
    $("#messages-inner").append(waiting.el);
    S.pendingTurn = waiting;
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
  flushOutbox();
}

function onFrame(frame) {
  switch (frame.type) {
    case "connected":
      return onConnected();
    case "pong":
      return;
    case "session":
      return onSession(frame);
    case "session_ended":
      return;
    case "agent_selected":
      return;
    case "rate_limited":
      return toast("Slow down: too many messages.", "warn");
    case "voice_state":
      return;
    default:
      break;
  }
  if (frame.seq === undefined || frame.seq === null) {
    if (frame.type === "error") return onPlainError(frame);
    if (frame.type === "stopped") return setRunning(false); // nothing was running
    if (frame.type === "approval_resolved") return applyEvent(frame, true);
    if (frame.type === "audio" && frame.data) {
      const url = audioUrl(frame.data, frame.format, frame.sampleRate);
      if (S.speakTarget && S.speakTarget.el.isConnected) S.speakTarget.audio(url, true);
      else enqueueSpeech(url);
    }
    return;
  }
  if (frame.sessionId && S.sessionId && frame.sessionId !== S.sessionId) return;
  if (S.queue) {
    S.queue.push(frame);
    return;
  }
  applyEvent(frame, true);
}

function onSession(frame) {
  if ("lastSeq" in frame) {
    // A reply to `resume`; one for a session the user already left is stale.
    if (S.resume && S.resume.sessionId === frame.sessionId) {
      setAgentPicker(frame.agentId);
      onResumed(frame);
    }
    return;
  }
  // Bound by a chat (a new session, or one created by a voice turn).
  if (S.sessionId !== frame.sessionId) {
    S.sessionId = frame.sessionId;
    localStorage.setItem(KEY_SESSION, frame.sessionId);
    S.lastSeq = 0;
    const users = document.querySelectorAll("#messages-inner .msg.user");
    const first = users.length ? users[0].dataset.text : "";
    if (first) S.autoTitle = { sessionId: frame.sessionId, text: first };
  }
  S.shownSession = frame.sessionId;
  setAgentPicker(frame.agentId);
  refreshSessions();
}

function onPlainError(frame) {
  const code = frame.code;
  if (code === "resume_gap" && S.sessionId) {
    S.shownSession = null;
    startResume(S.sessionId, "load");
    return;
  }
  if (code === "session_not_found" && S.resume) {
    S.resume = null;
    S.queue = null;
    newChat(false);
    return;
  }
  if (code === "provider_unconfigured") {
    setRunning(false);
    dropPendingTurn();
    show("#setup-view");
    return;
  }
  if (code === "turn_in_progress") {
    dropPendingTurn(true);
    toast(frame.error, "warn");
    return;
  }
  if (code === "unauthorized") return showLogin("Sign in again.");
  if (["stt_unavailable", "transcription_failed", "tts_unavailable"].includes(code)) {
    setRunning(false);
    dropPendingTurn();
  } else if (S.pendingTurn) {
    setRunning(false);
    dropPendingTurn(true);
  }
  toast(frame.error || "Error", "error");
}

function makeTurn(turnId) {
  return new TurnView(turnId, { onApprove: answerApproval, onSpeak: speakTurn });
}

// "Read aloud": `speak` answers with `audio` frames for this connection only (no seq).
function speakTurn(view) {
  const text = view.text.trim();
  if (!text) return;
  stopSpeech();
  S.speakTarget = view;
  view.clips = [];
  send({ type: "speak", text: text.slice(0, 4000) });
}

function turnFor(frame) {
  const id = frame.turnId;
  let view = S.turns.get(id);
  if (!view) {
    view = S.pendingTurn || makeTurn(id);
    S.pendingTurn = null;
    view.turnId = id;
    view.el.dataset.turnId = id;
    S.turns.set(id, view);
    if (!view.el.isConnected) $("#messages-inner").append(view.el);
  }
  return view;
}

function applyEvent(frame, live) {
  if (frame.seq !== undefined && frame.seq !== null) {
    if (frame.seq <= S.lastSeq) return; // already shown (replay overlap)
    S.lastSeq = frame.seq;
  }
  showEmpty(false);
  switch (frame.type) {
    case "start": {
      const view = turnFor(frame);
      S.turn = view;
      setRunning(true);
      break;
    }
    case "chunk":
      turnFor(frame).appendText(frame.delta);
      break;
    case "reasoning":
      turnFor(frame).addReasoning(frame.content);
      break;
    case "tool_start":
      turnFor(frame).toolStart(frame);
      break;
    case "tool_end":
      turnFor(frame).toolEnd(frame);
      break;
    case "approval_request":
      turnFor(frame).approvalRequest(frame);
      openApproval(frame);
      break;
    case "approval_resolved": {
      for (const view of S.turns.values()) view.approvalResolved(frame.requestId, frame.approved);
      closeApproval(frame.requestId);
      break;
    }
    case "stopped":
      if (frame.turnId) turnFor(frame).stopped();
      break;
    case "transcribed": {
      const view = S.turns.get(frame.turnId);
      const bubble = userBubble(frame.text, [], { voice: true });
      if (view && view.el.isConnected) view.el.before(bubble);
      else $("#messages-inner").append(bubble);
      setRunning(true);
      break;
    }
    case "audio":
      if (frame.data) turnFor(frame).audio(audioUrl(frame.data, frame.format, frame.sampleRate), live);
      break;
    case "done":
      turnFor(frame).done(frame);
      for (const [id, f] of S.approvals) if (f.turnId === frame.turnId) closeApproval(id);
      if (S.turn && S.turn.turnId === frame.turnId) S.turn = null;
      setRunning(false);
      if (live) autoTitle().finally(refreshSessions);
      break;
    case "context_usage":
      setContextMeter(frame);
      break;
    case "error":
      turnFor(frame).error(frame.error, frame.code);
      setRunning(false);
      if (live) refreshSessions();
      break;
    default:
      break;
  }
  scrollToEnd();
}

// A new chat is named after its first message (once, and only if it has no name yet).
async function autoTitle() {
  const pending = S.autoTitle;
  S.autoTitle = null;
  if (!pending || pending.sessionId !== S.sessionId) return;
  const line = pending.text.split("\n").find((l) => l.trim()) || "";
  const name = line.trim().length > 60 ? `${line.trim().slice(0, 57)}…` : line.trim();
  if (!name) return;
  try {
    const session = await api(`/api/sessions/${encodeURIComponent(pending.sessionId)}`);
    if (!session.name) {
      await api(`/api/sessions/${encodeURIComponent(pending.sessionId)}`, { method: "PATCH", body: { name } });
    }
  } catch { /* no rename route on this server: the sidebar shows "Untitled chat" */ }
}

// ------------------------------------------------------------------ context meter

function setContextMeter(frame, save = true) {
  if (save && S.sessionId) {
    const { usedTokens, maxContext, percentage, breakdown } = frame;
    localStorage.setItem(`prismd.context.${S.sessionId}`, JSON.stringify({ usedTokens, maxContext, percentage, breakdown }));
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

// ------------------------------------------------------------------ messages

function clearMessages() {
  $("#messages-inner").replaceChildren();
  S.turns = new Map();
  S.turn = null;
  S.pendingTurn = null;
  for (const id of [...S.approvals.keys()]) closeApproval(id);
  $("#context-meter").hidden = true;
}

function showEmpty(on) {
  $("#empty-state").hidden = !on;
  $("#messages").classList.toggle("is-empty", on);
}

function dropPendingTurn(removeBubble = false) {
  if (S.pendingTurn) {
    S.pendingTurn.el.remove();
    S.pendingTurn = null;
    if (removeBubble) {
      const users = document.querySelectorAll("#messages-inner .msg.user");
      const last = users[users.length - 1];
      if (last && last.nextElementSibling === null) {
        $("#input").value = last.dataset.text || "";
        last.remove();
      }
    }
  }
}

function updateLastActions() {
  for (const btn of document.querySelectorAll("#messages-inner .edit-btn, #messages-inner .retry-btn")) btn.remove();
  if (S.running) return;
  const users = document.querySelectorAll("#messages-inner .msg.user:not(.voice)");
  const lastUser = users[users.length - 1];
  if (lastUser) {
    lastUser.querySelector(".msg-actions").append(h("button", {
      type: "button", class: "icon-btn edit-btn", title: "Edit and resend", "aria-label": "Edit and resend",
      onclick: () => editLast(lastUser),
    }, icon("edit")));
  }
  const answers = document.querySelectorAll("#messages-inner .msg.assistant");
  const lastAnswer = answers[answers.length - 1];
  if (lastAnswer && S.sessionId) {
    lastAnswer.querySelector(".msg-actions").append(h("button", {
      type: "button", class: "icon-btn retry-btn", title: "Retry", "aria-label": "Retry",
      onclick: () => retry(),
    }, icon("retry")));
  }
}

function uuid() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

function sendChat(text, files) {
  if (!text.trim() && !files.length) return false;
  if (S.running) {
    toast("An answer is still coming: stop it first (Esc).", "warn");
    return false;
  }
  if (S.queue) {
    toast("Still loading this chat…", "warn");
    return false;
  }
  const frame = { type: "chat", message: text, clientMessageId: uuid() };
  if (S.sessionId) frame.sessionId = S.sessionId;
  if (S.agentId) frame.agentId = S.agentId;
  if (S.model) frame.model = S.model;
  if (files.length) {
    frame.files = files.map((f) => (f.data ? { filename: f.filename, mimeType: f.mimeType, data: f.data } : { fileId: f.fileId || f.id, filename: f.filename, mimeType: f.mimeType }));
  }
  showEmpty(false);
  $("#messages-inner").append(userBubble(text, files));
  S.pendingTurn = makeTurn(null);
  $("#messages-inner").append(S.pendingTurn.el);
  setRunning(true);
  scrollToEnd(true);
  send(frame);
  return true;
}

function submit() {
  const input = $("#input");
  const files = S.files;
  if (sendChat(input.value, files)) {
    input.value = "";
    S.files = [];
    renderAttachments();
    autosize();
  }
}

function stop() {
  stopSpeech();
  if (!S.running) return;
  send({ type: "stop" });
}

// Drops the last exchange on the server (POST …/retry), then sends `text` (default: the same).
async function retry(text) {
  if (S.running || !S.sessionId) return;
  let message = null;
  let files = [];
  try {
    const res = await api(`/api/sessions/${encodeURIComponent(S.sessionId)}/retry`, { method: "POST" });
    message = res.message;
    files = res.files || [];
  } catch (err) {
    if (!(err instanceof ApiError && err.missing)) {
      toast(`Retry failed: ${err.message}`, "error");
      return;
    }
    // No retry route on this server: resend the last message as a new one.
    const users = document.querySelectorAll("#messages-inner .msg.user");
    message = users.length ? users[users.length - 1].dataset.text : "";
    files = [];
    sendChat(text ?? message, files);
    return;
  }
  // Remove the last exchange from the screen: the last user message and what follows it.
  const users = document.querySelectorAll("#messages-inner .msg.user");
  const last = users[users.length - 1];
  if (last) {
    while (last.nextElementSibling) last.nextElementSibling.remove();
    last.remove();
  }
  sendChat(text ?? message ?? "", files.map((f) => ({ ...f, fileId: f.fileId || f.id })));
}

function editLast(bubble) {
  if (S.running) return;
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

// ------------------------------------------------------------------ approvals

function openApproval(frame) {
  S.approvals.set(frame.requestId, frame);
  renderApproval();
}

function closeApproval(requestId) {
  S.approvals.delete(requestId);
  renderApproval();
}

function renderApproval() {
  const dialog = $("#approval-dialog");
  const next = [...S.approvals.values()][0];
  if (!next) {
    if (dialog.open) dialog.close();
    return;
  }
  const req = next.request || {};
  dialog.dataset.requestId = next.requestId;
  $("#approval-tool").textContent = req.tool || "a tool";
  $("#approval-query").textContent = req.query || "";
  $("#approval-reason").textContent = req.requestReason || next.reasoning || "";
  $("#approval-reason").hidden = !(req.requestReason || next.reasoning);
  $("#approval-count").textContent = S.approvals.size > 1 ? `${S.approvals.size} requests waiting` : "";
  if (!dialog.open) dialog.showModal();
  $("#approval-deny").focus();
}

function answerApproval(requestId, approved) {
  send({ type: "approval_response", requestId, approved });
  for (const view of S.turns.values()) view.approvalResolved(requestId, approved);
  closeApproval(requestId);
}

// ------------------------------------------------------------------ sessions sidebar

let searchTimer = null;

function relTime(iso) {
  if (!iso) return "";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const s = (Date.now() - t) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  if (s < 7 * 86400) return `${Math.floor(s / 86400)} d ago`;
  return new Date(t).toLocaleDateString();
}

async function refreshSessions() {
  const q = $("#session-search").value.trim();
  let sessions;
  try {
    // Archived chats stay out of the sidebar (`status=visible`: active and closed ones).
    sessions = await api(`/api/sessions?limit=100&status=visible&sort=activity${q ? `&q=${encodeURIComponent(q)}` : ""}`);
  } catch (err) {
    if (err.status === 401) return showLogin();
    return;
  }
  renderSessions(sessions, q);
}

function renderSessions(sessions, q) {
  const current = sessions.find((s) => s.id === S.sessionId);
  document.title = current && current.name ? `${current.name} · prismd` : "prismd";
  const list = $("#session-list");
  list.replaceChildren();
  if (!sessions.length) {
    list.append(h("div", { class: "side-empty", text: q ? "No chat matches." : "No chats yet." }));
    return;
  }
  let group = null;
  for (const s of sessions) {
    const label = dayGroup(s.last_turn_at || s.started_at);
    if (label !== group) {
      group = label;
      list.append(h("div", { class: "side-group", text: label }));
    }
    list.append(sessionItem(s));
  }
}

function dayGroup(iso) {
  const t = Date.parse(iso || "");
  if (Number.isNaN(t)) return "Older";
  const days = (new Date().setHours(0, 0, 0, 0) - new Date(t).setHours(0, 0, 0, 0)) / 86400000;
  if (days <= 0) return "Today";
  if (days === 1) return "Yesterday";
  if (days < 7) return "This week";
  return "Older";
}

function sessionTitle(s) {
  return s.name || s.title || "Untitled chat";
}

function sessionItem(s) {
  const title = h("span", { class: "s-title", text: sessionTitle(s) });
  const agent = S.agents.find((a) => a.id === s.agent_id);
  const sub = h("span", { class: "s-sub", text: [agent ? agent.name : s.agent_id, relTime(s.last_turn_at || s.started_at)].filter(Boolean).join(" · ") });
  const del = h("button", { type: "button", class: "icon-btn s-del", title: "Delete chat", "aria-label": "Delete chat", text: "✕" });
  const ren = h("button", { type: "button", class: "icon-btn s-ren", title: "Rename chat", "aria-label": "Rename chat" }, icon("edit", 14));
  const item = h("div", { class: "session-item" + (s.id === S.sessionId ? " active" : ""), role: "button", tabindex: "0", "data-id": s.id },
    h("span", { class: "s-text" }, title, sub), h("span", { class: "s-actions" }, ren, del));
  item.addEventListener("click", (e) => {
    if (e.target.closest(".s-actions") || e.target.closest("input")) return;
    openSession(s.id);
  });
  item.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target === item) openSession(s.id); });
  ren.addEventListener("click", () => renameSession(s, item, title));
  del.addEventListener("click", async () => {
    if (!del.classList.contains("confirm")) {
      del.classList.add("confirm");
      del.textContent = "Delete?";
      setTimeout(() => { del.classList.remove("confirm"); del.textContent = "✕"; }, 3000);
      return;
    }
    try {
      await api(`/api/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" });
    } catch (err) {
      toast(`Could not delete: ${err.message}`, "error");
      return;
    }
    localStorage.removeItem(`prismd.context.${s.id}`);
    if (s.id === S.sessionId) newChat(false);
    refreshSessions();
  });
  return item;
}

function renameSession(s, item, title) {
  const input = h("input", { class: "s-rename", type: "text", "aria-label": "Chat name", maxlength: "200" });
  input.value = sessionTitle(s) === "Untitled chat" ? "" : sessionTitle(s);
  title.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const name = input.value.trim();
    input.replaceWith(title);
    if (!save || !name || name === s.name) return;
    try {
      await api(`/api/sessions/${encodeURIComponent(s.id)}`, { method: "PATCH", body: { name } });
      s.name = name;
      title.textContent = name;
    } catch (err) {
      toast(err.missing ? "Renaming is not available on this server yet." : `Could not rename: ${err.message}`, "error");
    }
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

function openSession(id) {
  closeSidebarOnPhone();
  if (id === S.sessionId && S.shownSession === id) return;
  S.sessionId = id;
  localStorage.setItem(KEY_SESSION, id);
  S.shownSession = null;
  S.lastSeq = 0;
  setRunning(false);
  clearMessages();
  showEmpty(false);
  $("#messages-inner").append(h("div", { class: "loading", text: "Loading…" }));
  for (const el of document.querySelectorAll(".session-item")) el.classList.toggle("active", el.dataset.id === id);
  if (S.ready) startResume(id, "load");
}

function newChat(notify = true) {
  closeSidebarOnPhone();
  if (notify && S.sessionId) send({ type: "new_session" });
  S.sessionId = null;
  S.shownSession = null;
  S.lastSeq = 0;
  localStorage.removeItem(KEY_SESSION);
  setRunning(false);
  clearMessages();
  showEmpty(true);
  for (const el of document.querySelectorAll(".session-item")) el.classList.remove("active");
  $("#input").focus();
}

// ------------------------------------------------------------------ agents and models

async function loadAgents() {
  let agents;
  try { agents = await api("/api/agents"); } catch { $("#agent-picker").hidden = true; return; }
  S.agents = agents;
  const chosen = agents.find((a) => a.default);
  S.defaultAgent = chosen ? chosen.id : null;
  const picker = $("#agent-picker");
  picker.replaceChildren(...S.agents.map((a) => h("option", { value: a.id, text: a.name || a.id, title: a.description || "" })));
  if (!S.agentId || !S.agents.some((a) => a.id === S.agentId)) S.agentId = null;
  picker.value = S.agentId || S.defaultAgent || (S.agents[0] && S.agents[0].id) || "";
  picker.hidden = S.agents.length === 0;
}

function setAgentPicker(agentId) {
  if (!agentId) return;
  S.agentId = agentId;
  $("#agent-picker").value = agentId;
}

function chooseAgent() {
  const id = $("#agent-picker").value;
  S.agentId = id;
  localStorage.setItem(KEY_AGENT, id);
  send({ type: "select_agent", agentId: id });
  const agent = S.agents.find((a) => a.id === id);
  toast(`Agent: ${agent ? agent.name : id}`);
}

async function loadModels() {
  const picker = $("#model-picker");
  picker.hidden = true;
  const providers = await maybe("/api/providers", null).catch(() => null);
  if (!providers || !providers.default) return;
  const current = (providers.providers || []).find((p) => p.kind === providers.default);
  // The offline demo model says what it is, and how to connect a real one.
  $("#model-note").textContent = (current && current.note) || "";
  $("#model-note").hidden = !(current && current.note);
  const models = await maybe(`/api/providers/${encodeURIComponent(providers.default)}/models`, []).catch(() => []);
  const ids = new Set(models.map((m) => m.id));
  if (current && current.model) ids.delete(current.model);
  const label = current && (current.displayName || current.model);
  const options = [h("option", { value: "", text: label || "Default model" })];
  for (const id of [...ids].sort()) options.push(h("option", { value: id, text: id }));
  picker.replaceChildren(...options);
  picker.value = ids.has(S.model) ? S.model : "";
  S.model = picker.value;
  picker.hidden = options.length < 2;
}

// ------------------------------------------------------------------ attachments

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(list) {
  for (const file of list) {
    if (file.size > MAX_FILE_BYTES) {
      toast(`${file.name} is larger than 10 MB.`, "error");
      continue;
    }
    const data = await readBase64(file);
    const entry = {
      filename: file.name || `pasted-${Date.now()}.${(file.type.split("/")[1] || "bin")}`,
      mimeType: file.type || "application/octet-stream",
      size: file.size,
      data,
    };
    if (file.type.startsWith("image/")) entry.previewUrl = URL.createObjectURL(file);
    S.files.push(entry);
  }
  renderAttachments();
  $("#input").focus();
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren(...S.files.map((f, i) => fileChip(f, () => { S.files.splice(i, 1); renderAttachments(); })));
  box.hidden = S.files.length === 0;
}

// ------------------------------------------------------------------ voice

const recorder = new Recorder((frame) => send(frame));
let pressedAt = 0;
let held = false;

async function micDown(event) {
  event.preventDefault();
  if (recorder.active) return micFinish();
  if (S.running) return toast("Wait for the answer to finish, or stop it.", "warn");
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
  setConnNote("Listening… release (or click again) to send");
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
  setConnNote("");
  const sent = await recorder.stop();
  if (sent) {
    showEmpty(false);
    setRunning(true);
  }
}

function setConnNote(text) {
  $("#composer-note").textContent = text;
  $("#composer-note").hidden = !text;
}

// ------------------------------------------------------------------ sidebar, composer, keys

function isPhone() {
  return matchMedia("(max-width: 760px)").matches;
}

function toggleSidebar() {
  if (isPhone()) document.body.classList.toggle("sidebar-open");
  else document.body.classList.toggle("sidebar-collapsed");
}

function closeSidebarOnPhone() {
  document.body.classList.remove("sidebar-open");
}

function autosize() {
  const input = $("#input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function wire() {
  $("#login-form").addEventListener("submit", login);
  $("#setup-recheck").addEventListener("click", recheckSetup);
  $("#setup-skip").addEventListener("click", () => { sessionStorage.setItem("prismd.skipSetup", "1"); startChat(); });
  $("#logout").addEventListener("click", logout);
  $("#new-chat").addEventListener("click", () => newChat(true));
  $("#toggle-sidebar").addEventListener("click", toggleSidebar);
  $("#scrim").addEventListener("click", closeSidebarOnPhone);
  $("#theme-toggle").addEventListener("click", () => {
    const next = effectiveTheme() === "dark" ? "light" : "dark";
    localStorage.setItem(KEY_THEME, next);
    applyTheme(next);
  });
  $("#agent-picker").addEventListener("change", chooseAgent);
  $("#model-picker").addEventListener("change", () => {
    S.model = $("#model-picker").value;
    localStorage.setItem(KEY_MODEL, S.model);
  });
  $("#session-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(refreshSessions, 200);
  });
  const input = $("#input");
  input.addEventListener("input", autosize);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  input.addEventListener("paste", (e) => {
    const files = e.clipboardData && e.clipboardData.files;
    if (files && files.length) {
      e.preventDefault();
      addFiles([...files]);
    }
  });
  $("#send").addEventListener("click", submit);
  $("#stop").addEventListener("click", stop);
  $("#attach").addEventListener("click", () => $("#file-input").click());
  $("#file-input").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  for (const btn of document.querySelectorAll(".suggestion")) {
    btn.addEventListener("click", () => { input.value = btn.dataset.prompt; autosize(); input.focus(); });
  }
  // Drag and drop anywhere on the chat.
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth += 1; $("#drop-overlay").hidden = false; } });
  window.addEventListener("dragleave", (e) => { if (hasFiles(e) && --depth <= 0) { depth = 0; $("#drop-overlay").hidden = true; } });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("#drop-overlay").hidden = true;
    addFiles([...e.dataTransfer.files]);
  });
  // Approval dialog.
  const dialog = $("#approval-dialog");
  $("#approval-approve").addEventListener("click", () => answerApproval(dialog.dataset.requestId, true));
  $("#approval-deny").addEventListener("click", () => answerApproval(dialog.dataset.requestId, false));
  dialog.addEventListener("cancel", (e) => e.preventDefault()); // Esc does not silently dismiss
  // Keys: Esc stops the answer.
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !dialog.open) {
      stopSpeech();
      if (S.running) { e.preventDefault(); stop(); }
      closeSidebarOnPhone();
    }
    if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); newChat(true); }
  });
  // Mic.
  const mic = $("#mic");
  if (micSupported()) {
    mic.hidden = false;
    mic.addEventListener("pointerdown", micDown);
    mic.addEventListener("pointerup", micUp);
    mic.addEventListener("pointerleave", () => { if (held) micUp(); });
    mic.addEventListener("keydown", (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); if (recorder.active) micFinish(); else micDown(e); held = false; } });
  }
  // Keep the socket warm through proxies.
  setInterval(() => { if (S.ready) send({ type: "ping" }); }, 25000);
  addEventListener("online", () => { if (!S.ready) connect(); });
}

wire();
boot().catch((err) => {
  console.error(err);
  toast(`Could not start: ${err.message}`, "error");
});
