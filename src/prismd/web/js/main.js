// The prismd web app: sign-in, the setup screen, the theme, and the wiring of its parts —
// connection.js (the socket), chat.js (the session on screen), sessions.js (the sidebar),
// composer.js (message box and uploads), voice.js (push-to-talk, hands-free), approvals.js,
// agents.js (pickers), settings.js (account, usage, admin). The protocol's names come from
// protocol.js, which the server generates from its own definitions.
import { api, maybe, ApiError } from "./api.js";
import { $, toast, isPhone, closeDrawer } from "./dom.js";
import { Connection } from "./connection.js";
import {
  chat, initChat, onConnected, onFrame, openSession, newChat, forgetSession, leaveSession, sendChat, stop, markStarted,
  resolvedApproval, showEmpty,
} from "./chat.js";
import { initSessions, refreshSessions, markActive } from "./sessions.js";
import { initComposer } from "./composer.js";
import { initVoice, handsFree, handsFreeActive, voiceRunningChanged, voiceDebug } from "./voice.js";
import { initApprovals, dialogOpen } from "./approvals.js";
import { picks, initPickers, loadAgents, loadModels } from "./agents.js";
import { initSettings, fromHash, settingsOpen, closeSettings } from "./settings.js";
import { stopSpeech } from "./speech.js";

const KEY_THEME = "prismd.theme";
const auth = { user: null, required: false, renewingUntil: 0 };
let started = false;

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

// ------------------------------------------------------------------ the socket

function setConn(state, text) {
  const el = $("#conn");
  el.className = `conn ${state}`;
  el.title = text;
  $("#conn-text").textContent = text;
}

const conn = new Connection({
  onFrame(frame) {
    if (handsFree.onFrame(frame)) return;
    onFrame(frame);
  },
  onReady() {
    setConn("up", "Connected");
    onConnected();
    handsFree.onConnected();
  },
  onDown(delay) {
    setConn("down", `Disconnected — retrying in ${Math.round(delay / 1000)} s`);
  },
  async beforeRetry(attempt) {
    if (attempt < 2 || !auth.required) return true;
    // A refused upgrade looks like a closed socket: check whether the login expired.
    const status = await maybe("/api/auth/status", null).catch(() => null);
    if (status && status.authRequired && !status.user) {
      showLogin("Your session ended: sign in again.");
      return false;
    }
    return true;
  },
});

// ------------------------------------------------------------------ screens

function show(view) {
  for (const id of ["#login-view", "#setup-view", "#chat-view"]) $(id).hidden = id !== view;
  document.body.classList.remove("booting");
}

function showLogin(message) {
  handsFree.stop();
  show("#login-view");
  $("#login-error").textContent = message || "";
  $("#login-user").focus();
}

// A socket's credential was revoked, or a request got 401.
function signedOut(message) {
  if (Date.now() < auth.renewingUntil) return; // our own password change: a new login is coming
  showLogin(message);
}

async function boot() {
  let status = { authRequired: false, user: null };
  try {
    status = await maybe("/api/auth/status", status);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) console.warn("auth status", err);
    else status = { authRequired: true, user: null };
  }
  auth.required = !!status.authRequired;
  auth.user = status.user || null;
  if (auth.required && !auth.user) {
    showLogin();
    return;
  }
  await enter();
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
    auth.user = res && res.user;
    auth.required = true;
    $("#login-pass").value = "";
    if (started) return location.reload(); // signed out and in again: start clean
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
  $("#user-name").textContent = auth.user ? auth.user.name : "";
  $("#user-box").hidden = !(auth.user && auth.required);
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
  if (started) return;
  started = true;
  loadAgents();
  loadModels();
  refreshSessions();
  if (!chat.sessionId) showEmpty(true);
  conn.connect();
  fromHash();
  if (!settingsOpen()) $("#input").focus();
}

// ------------------------------------------------------------------ wiring

function toggleSidebar() {
  if (isPhone()) document.body.classList.toggle("sidebar-open");
  else document.body.classList.toggle("sidebar-collapsed");
}

function wire() {
  initChat({
    conn,
    sessionsChanged: refreshSessions,
    signedOut,
    setupNeeded: () => show("#setup-view"),
    runningChanged: voiceRunningChanged,
    handsFreeActive,
    sessionChanged(id) {
      markActive(id);
      if (settingsOpen()) closeSettings();
      handsFree.retarget();
    },
  });
  initApprovals({ send: (frame) => conn.send(frame), resolved: resolvedApproval });
  initPickers((frame) => conn.send(frame));
  initSessions({
    current: () => chat.sessionId,
    open: openSession,
    forget: forgetSession,
    leave: leaveSession,
    signedOut,
  });
  initComposer({ send: sendChat });
  initVoice({
    conn,
    chat: () => chat,
    agent: () => picks,
    started: markStarted,
  });
  initSettings({
    user: () => auth.user,
    authRequired: () => auth.required,
    signedOut,
    renewLogin: () => { auth.renewingUntil = Date.now() + 10000; },
  });

  $("#login-form").addEventListener("submit", login);
  $("#setup-recheck").addEventListener("click", recheckSetup);
  $("#setup-skip").addEventListener("click", () => { sessionStorage.setItem("prismd.skipSetup", "1"); startChat(); });
  $("#logout").addEventListener("click", logout);
  $("#new-chat").addEventListener("click", () => newChat(true));
  $("#toggle-sidebar").addEventListener("click", toggleSidebar);
  $("#scrim").addEventListener("click", closeDrawer);
  $("#theme-toggle").addEventListener("click", () => {
    const next = effectiveTheme() === "dark" ? "light" : "dark";
    localStorage.setItem(KEY_THEME, next);
    applyTheme(next);
  });
  $("#stop").addEventListener("click", stop);
  // Keys: Esc stops the answer (and the speaker); Ctrl+Shift+O starts a new chat.
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !dialogOpen()) {
      stopSpeech();
      if (chat.running) { e.preventDefault(); stop(); }
      closeDrawer();
    }
    if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); newChat(true); }
  });
}

// Handy in the console, and for the browser tests.
window.prismd = {
  get ws() { return conn.ws; },
  set ws(value) { conn.ws = value; },
  get ready() { return conn.ready; },
  set ready(value) { conn.ready = value; },
  get sessionId() { return chat.sessionId; },
  get running() { return chat.running; },
  get voice() { return voiceDebug(); },
};

wire();
boot().catch((err) => {
  console.error(err);
  toast(`Could not start: ${err.message}`, "error");
});
