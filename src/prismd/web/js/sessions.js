// The sessions sidebar: the chats (newest activity first, grouped by day), search, rename,
// archive, delete; and the archived chats, with restore and delete.
import { api, enc } from "./api.js";
import { $, $$, h, icon, toast, relTime, confirmButton } from "./dom.js";
import { agentName } from "./agents.js";

const list = { archived: false, searchTimer: null };
let deps = null;

// current() -> the session id on screen; open(id); forget(id): a deleted chat is no longer
// on screen; leave() -> a promise: the chat on screen is left for a new one; signedOut().
export function initSessions(options) {
  deps = options;
  $("#session-search").addEventListener("input", () => {
    clearTimeout(list.searchTimer);
    list.searchTimer = setTimeout(refreshSessions, 200);
  });
  $("#show-archived").addEventListener("click", () => showArchived(!list.archived));
}

function showArchived(on) {
  list.archived = on;
  document.body.classList.toggle("archive-open", on);
  $("#show-archived").setAttribute("aria-pressed", String(on));
  $("#show-archived-label").textContent = on ? "Back to chats" : "Archived chats";
  $("#side-title").hidden = !on;
  refreshSessions();
}

export async function refreshSessions() {
  const q = $("#session-search").value.trim();
  // Archived chats stay out of the main list (`status=visible`: active and closed ones).
  const status = list.archived ? "archived" : "visible";
  let sessions;
  try {
    sessions = await api(`/api/sessions?limit=100&status=${status}&sort=activity${q ? `&q=${enc(q)}` : ""}`);
  } catch (err) {
    if (err.status === 401) return deps.signedOut();
    return;
  }
  render(sessions, q);
}

function render(sessions, q) {
  const currentId = deps.current();
  const current = sessions.find((s) => s.id === currentId);
  if (!list.archived) document.title = current && current.name ? `${current.name} · prismd` : "prismd";
  const box = $("#session-list");
  box.replaceChildren();
  if (!sessions.length) {
    const none = list.archived ? "No archived chats." : "No chats yet.";
    box.append(h("div", { class: "side-empty", text: q ? "No chat matches." : none }));
    return;
  }
  let group = null;
  for (const s of sessions) {
    const label = dayGroup(s.last_turn_at || s.started_at);
    if (label !== group) {
      group = label;
      box.append(h("div", { class: "side-group", text: label }));
    }
    box.append(list.archived ? archivedItem(s) : sessionItem(s, currentId));
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

export function markActive(id) {
  for (const el of $$(".session-item")) el.classList.toggle("active", el.dataset.id === id);
}

function itemShell(s, active, actions) {
  const title = h("span", { class: "s-title", text: sessionTitle(s) });
  const sub = h("span", { class: "s-sub", text: [agentName(s.agent_id), relTime(s.last_turn_at || s.started_at)].filter(Boolean).join(" · ") });
  const item = h("div", { class: "session-item" + (active ? " active" : ""), role: "button", tabindex: "0", "data-id": s.id },
    h("span", { class: "s-text" }, title, sub), h("span", { class: "s-actions" }, ...actions));
  item.addEventListener("click", (e) => {
    if (e.target.closest(".s-actions") || e.target.closest("input")) return;
    deps.open(s.id);
  });
  item.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target === item) deps.open(s.id); });
  return { item, title };
}

async function act(path, method, failure) {
  try {
    await api(path, { method });
    return true;
  } catch (err) {
    toast(`${failure}: ${err.message}`, "error");
    return false;
  }
}

function deleteButton(s) {
  const del = h("button", { type: "button", class: "icon-btn s-del", title: "Delete chat", "aria-label": "Delete chat", text: "✕" });
  return confirmButton(del, "Delete?", async () => {
    if (!(await act(`/api/sessions/${enc(s.id)}`, "DELETE", "Could not delete"))) return;
    deps.forget(s.id);
    refreshSessions();
  });
}

function sessionItem(s, currentId) {
  const ren = h("button", { type: "button", class: "icon-btn s-ren", title: "Rename chat", "aria-label": "Rename chat" }, icon("edit", 14));
  const arc = h("button", { type: "button", class: "icon-btn s-arc", title: "Archive chat", "aria-label": "Archive chat" }, icon("archive", 14));
  const { item, title } = itemShell(s, s.id === currentId, [ren, arc, deleteButton(s)]);
  ren.addEventListener("click", () => renameSession(s, title));
  arc.addEventListener("click", async () => {
    if (s.id === deps.current()) await deps.leave(); // unbound first: it stays archived
    if (!(await act(`/api/sessions/${enc(s.id)}/archive`, "POST", "Could not archive"))) return;
    toast("Chat archived: find it under Archived chats.");
    refreshSessions();
  });
  return item;
}

function archivedItem(s) {
  const restore = h("button", { type: "button", class: "icon-btn s-restore", title: "Restore chat", "aria-label": "Restore chat" }, icon("restore", 14));
  const { item } = itemShell(s, s.id === deps.current(), [restore, deleteButton(s)]);
  item.classList.add("archived");
  restore.addEventListener("click", async () => {
    if (!(await act(`/api/sessions/${enc(s.id)}/resume`, "POST", "Could not restore"))) return;
    toast("Chat restored.");
    refreshSessions();
  });
  return item;
}

function renameSession(s, title) {
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
      await api(`/api/sessions/${enc(s.id)}`, { method: "PATCH", body: { name } });
      s.name = name;
      title.textContent = name;
    } catch (err) {
      toast(`Could not rename: ${err.message}`, "error");
    }
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}
