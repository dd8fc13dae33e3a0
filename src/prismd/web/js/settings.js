// The settings page: your account (password, API tokens, where you are signed in), usage
// (tokens, cost and turns from the stored turns; uploads and today's chat budget against
// their limits), and for admins the users, every API token and who is signed in.
// Every change goes through the REST routes of server/routes/users.py, which close the
// affected sockets at once.
import { api, enc } from "./api.js";
import { $, $$, h, toast, formatBytes, formatCost, formatCount, dateTime, relTime, confirmButton } from "./dom.js";
import { copyText } from "./markdown.js";

const TABS = ["account", "usage", "admin"];
const page = { tab: "account", usageUser: "", seq: 0 };
let deps = null;

// user(): the caller ({id, name, admin}) or null; authRequired(): whether users exist;
// close(): back to the chat; renewLogin(): the next revocation of this browser's socket is a
// password change of ours (the server signs this browser in again).
export function initSettings(options) {
  deps = options;
  $("#settings-open").addEventListener("click", () => openSettings());
  $("#settings-back").addEventListener("click", () => closeSettings());
  for (const tab of $$("#settings-view .tab")) tab.addEventListener("click", () => openSettings(tab.dataset.tab));
  addEventListener("hashchange", fromHash);
}

// `#settings/<tab>` opens the page (reload keeps it open).
export function fromHash() {
  const m = /^#settings(?:\/(\w+))?$/.exec(location.hash);
  if (m) openSettings(m[1] || "account", false);
  else if (!$("#settings-view").hidden) closeSettings(false);
}

export function settingsOpen() {
  return !$("#settings-view").hidden;
}

export function openSettings(tab = page.tab, push = true) {
  const user = deps.user();
  const admin = !!(user && user.admin);
  if (!TABS.includes(tab) || (tab === "admin" && !admin)) tab = "account";
  page.tab = tab;
  if (push && location.hash !== `#settings/${tab}`) history.replaceState(null, "", `#settings/${tab}`);
  $("#chat-main").hidden = true;
  $("#settings-view").hidden = false;
  document.body.classList.remove("sidebar-open");
  for (const el of $$("#settings-view .tab")) {
    el.hidden = el.dataset.tab === "admin" && !admin;
    el.classList.toggle("active", el.dataset.tab === tab);
    el.setAttribute("aria-selected", String(el.dataset.tab === tab));
  }
  const body = $("#settings-body");
  body.replaceChildren(h("div", { class: "loading", text: "Loading…" }));
  // Built apart, shown only if no other tab was opened meanwhile.
  const seq = ++page.seq;
  const built = h("div");
  const render = { account: renderAccount, usage: renderUsage, admin: renderAdmin }[tab];
  render(built).then(() => {
    if (seq === page.seq) body.replaceChildren(...built.childNodes);
  }, (err) => {
    if (seq !== page.seq) return;
    if (err.status === 401) return deps.signedOut();
    body.replaceChildren(h("p", { class: "form-error", text: `Could not load this page: ${err.message}` }));
  });
}

export function closeSettings(push = true) {
  $("#settings-view").hidden = true;
  $("#chat-main").hidden = false;
  if (push && location.hash.startsWith("#settings")) history.replaceState(null, "", location.pathname + location.search);
}

// ------------------------------------------------------------------ small builders

function card(title, ...children) {
  return h("section", { class: "card settings-card" }, h("h2", { text: title }), ...children);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted small", text: empty });
  return h("div", { class: "table-wrap" }, h("table", { class: "data" },
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { text: t })))),
    h("tbody", {}, rows)));
}

function field(label, input) {
  return h("label", { class: "field" }, h("span", { text: label }), input);
}

function input(attrs) {
  return h("input", { class: "text-input", ...attrs });
}

// Runs a form's action with its button disabled; errors go to the form's error line.
function submitter(form, action) {
  const error = h("p", { class: "form-error", role: "alert" });
  form.append(error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    error.textContent = "";
    try {
      await action();
    } catch (err) {
      error.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function dangerButton(label, confirmLabel, act) {
  return confirmButton(h("button", { type: "button", class: "btn small danger", text: label }), confirmLabel, act);
}

// ------------------------------------------------------------------ account

async function renderAccount(body) {
  const user = deps.user();
  const hasUser = deps.authRequired() && user && user.id !== "local";
  const cards = [];
  if (!hasUser) {
    cards.push(card("Your account",
      h("p", { class: "muted", text: "prismd is open on this machine: it has no users, so nobody signs in. Add a user under “Users & tokens” to require signing in (the first one is an admin)." })));
    body.replaceChildren(...cards);
    return;
  }
  cards.push(card("Your account", h("p", {},
    h("strong", { text: user.name }), h("span", { class: "muted", text: user.admin ? " · admin" : " · user" }))));

  const current = input({ id: "pw-current", type: "password", autocomplete: "current-password", required: true });
  const fresh = input({ id: "pw-new", type: "password", autocomplete: "new-password", required: true, minlength: "8" });
  const again = input({ id: "pw-repeat", type: "password", autocomplete: "new-password", required: true });
  const form = h("form", { id: "password-form", class: "stack" },
    field("Current password", current), field("New password (8 characters or more)", fresh), field("New password again", again),
    h("div", { class: "row" }, h("button", { type: "submit", class: "btn primary", text: "Change password" })));
  submitter(form, async () => {
    if (fresh.value !== again.value) throw new Error("The two new passwords differ.");
    deps.renewLogin();
    await api("/api/account/password", { method: "POST", body: { currentPassword: current.value, newPassword: fresh.value } });
    form.reset();
    toast("Password changed: your other sign-ins ended.");
    openSettings("account", false);
  });
  cards.push(card("Change password", h("p", { class: "muted small", text: "Every other browser signed in as you is signed out." }), form));

  const tokens = await api("/api/account/tokens");
  const name = input({ id: "token-name", placeholder: "What it is for (e.g. laptop script)", maxlength: "100" });
  const shown = h("div", { id: "new-token", class: "new-token", hidden: true });
  const tokenForm = h("form", { id: "token-form", class: "row" }, name,
    h("button", { type: "submit", class: "btn", text: "Create token" }));
  submitter(tokenForm, async () => {
    const made = await api("/api/account/tokens", { method: "POST", body: { name: name.value.trim() } });
    const value = h("code", { class: "token-value", text: made.token });
    shown.replaceChildren(
      h("p", { text: "Your new token — copy it now, it is shown only once:" }),
      h("div", { class: "row" }, value, h("button", { type: "button", class: "btn small", text: "Copy", onclick: (e) => copyText(made.token, e.currentTarget) })),
      h("p", { class: "muted small", text: "Send it as “Authorization: Bearer …”, or ?token=… on /ws." }));
    shown.hidden = false;
    name.value = "";
    $("#my-tokens").replaceWith(tokenTable(await api("/api/account/tokens"), false));
  });
  cards.push(card("API tokens", h("p", { class: "muted small", text: "Tokens let scripts and other clients act as you." }),
    tokenTable(tokens, false), tokenForm, shown));

  const logins = await api("/api/account/logins");
  cards.push(card("Where you are signed in", loginTable(logins, false)));
  body.replaceChildren(...cards);
}

function tokenTable(tokens, all) {
  const rows = tokens.map((t) => h("tr", { "data-id": t.id },
    h("td", { text: t.name || "–" }),
    all ? h("td", { text: t.userName || t.userId }) : null,
    h("td", { text: dateTime(t.createdAt) }),
    h("td", { text: t.lastUsedAt ? relTime(t.lastUsedAt) : "never" }),
    h("td", { class: "actions" }, dangerButton("Revoke", "Revoke?", async () => {
      await api(all ? `/api/admin/tokens/${enc(t.id)}` : `/api/account/tokens/${enc(t.id)}`, { method: "DELETE" });
      toast("Token revoked: it no longer works.");
      openSettings(page.tab, false);
    }))));
  const headers = all ? ["Name", "User", "Created", "Last used", ""] : ["Name", "Created", "Last used", ""];
  const box = h("div", { id: all ? "all-tokens" : "my-tokens" }, table(headers, rows, "No tokens."));
  return box;
}

function loginTable(logins, all) {
  const rows = logins.map((x) => h("tr", { "data-id": x.id, class: x.current ? "current" : "" },
    all ? h("td", { text: x.userName || x.userId }) : null,
    h("td", { text: x.createdAt ? dateTime(x.createdAt) : "–" }),
    h("td", { text: dateTime(x.expiresAt) }),
    h("td", { text: x.current ? "this browser" : "" }),
    h("td", { class: "actions" }, x.current ? null : dangerButton("Sign out", "Sure?", async () => {
      await api(all ? `/api/admin/logins/${enc(x.id)}` : `/api/account/logins/${enc(x.id)}`, { method: "DELETE" });
      toast("That sign-in ended.");
      openSettings(page.tab, false);
    }))));
  const headers = all ? ["User", "Signed in", "Expires", "", ""] : ["Signed in", "Expires", "", ""];
  return h("div", { id: all ? "all-logins" : "my-logins" }, table(headers, rows, "No sign-ins (API tokens do not sign in)."));
}

// ------------------------------------------------------------------ usage

function figure(label, value, title) {
  return h("div", { class: "figure", title: title || "" }, h("span", { class: "figure-value", text: value }), h("span", { class: "figure-label", text: label }));
}

function totals(title, t) {
  const cost = formatCost(t.costUsd) + (t.costKnown ? "" : "+");
  return h("div", { class: "totals" }, h("h3", { text: title }),
    h("div", { class: "figures" },
      figure("turns", formatCount(t.turns)),
      figure("tokens in", formatCount(t.tokensIn)),
      figure("tokens out", formatCount(t.tokensOut)),
      figure("cost", cost, t.costKnown ? "" : `${t.unpricedTurns} turn(s) used a model with no known price`),
      figure("chats", formatCount(t.sessions))));
}

function gauge(label, used, max, format) {
  const bar = h("progress", { class: "gauge", max: String(max || 1), "aria-label": label });
  bar.value = max ? Math.min(used, max) : 0;
  const text = max ? `${format(used)} of ${format(max)}` : `${format(used)} (no limit)`;
  return h("div", { class: "gauge-row" }, h("span", { class: "gauge-label", text: label }), max ? bar : null, h("span", { class: "gauge-text", text }));
}

async function renderUsage(body) {
  const user = deps.user();
  const admin = !!(user && user.admin);
  const query = page.usageUser ? `?user=${enc(page.usageUser)}` : "";
  const report = await api(`/api/usage${query}`);
  const cards = [];
  if (admin) {
    const users = await api("/api/admin/users").catch(() => []);
    const select = h("select", { id: "usage-user", "aria-label": "Whose usage" },
      h("option", { value: "", text: "Mine" }), h("option", { value: "all", text: "Everyone" }),
      users.filter((u) => u.id !== user.id).map((u) => h("option", { value: u.id, text: u.name })));
    select.value = page.usageUser;
    select.addEventListener("change", () => { page.usageUser = select.value; openSettings("usage", false); });
    cards.push(h("div", { class: "row settings-tools" }, h("label", { class: "field inline" }, h("span", { text: "Usage of" }), select)));
  }
  cards.push(card("Tokens, cost and turns", totals("All time", report.total), totals(`Last ${report.days} days`, report.recent)));
  if (report.uploads && report.today) {
    const u = report.uploads;
    const d = report.today;
    cards.push(card("Storage and today's budget",
      gauge("Uploads", u.bytes, u.maxBytes, formatBytes),
      gauge("Uploaded files", u.files, u.maxFiles, formatCount),
      gauge("Sent today", d.bytes, d.maxBytes, formatBytes),
      gauge("Files sent today", d.files, d.maxFiles, formatCount),
      h("p", { class: "muted small", text: u.maxAgeDays
        ? `Uploads no chat uses are removed after ${u.maxAgeDays} days; a deleted chat's files go with it. The daily budget starts again at 00:00 UTC.`
        : "A deleted chat's files go with it. The daily budget starts again at 00:00 UTC." })));
  }
  if (!page.usageUser) {
    const sessions = await api("/api/sessions?limit=50&sort=activity");
    const rows = sessions.filter((s) => s.turn_count).map((s) => h("tr", {},
      h("td", { class: "name", text: s.name || "Untitled chat" }),
      h("td", { class: "num", text: formatCount(s.turn_count) }),
      h("td", { class: "num", text: formatCount(s.tokens_in + s.tokens_out) }),
      h("td", { class: "num", text: formatCost(s.cost_usd) + (s.cost_known ? "" : "+") }),
      h("td", { text: relTime(s.last_turn_at || s.started_at) })));
    cards.push(card("Per chat", table(["Chat", "Turns", "Tokens", "Cost", "Last activity"], rows, "No turns yet.")));
  }
  body.replaceChildren(...cards);
}

// ------------------------------------------------------------------ admin

async function renderAdmin(body) {
  const me = deps.user();
  const [users, tokens, logins] = await Promise.all([
    api("/api/admin/users"), api("/api/admin/tokens"), api("/api/admin/logins"),
  ]);
  const rows = users.map((u) => {
    const row = h("tr", { "data-id": u.id, "data-name": u.name },
      h("td", { class: "name", text: u.name }),
      h("td", { text: u.admin ? "admin" : "user" }),
      h("td", { text: dateTime(u.createdAt) }),
      h("td", { class: "num", text: formatCount(u.tokens) }),
      h("td", { class: "num", text: formatCount(u.logins) }),
      h("td", { class: "num", text: formatCount(u.usage.turns) }),
      h("td", { class: "num", text: formatCost(u.usage.costUsd) + (u.usage.costKnown ? "" : "+") }),
      h("td", { class: "actions" },
        h("button", { type: "button", class: "btn small reset-btn", text: "Reset password", onclick: () => resetRow(row, u) }),
        u.id === me.id ? null : dangerButton("Remove", "Remove?", async () => {
          await api(`/api/admin/users/${enc(u.id)}`, { method: "DELETE" });
          toast(`${u.name} removed: their sign-ins and tokens ended (their chats are kept).`);
          openSettings("admin", false);
        })));
    return row;
  });
  const name = input({ id: "new-user-name", placeholder: "letters, digits, _ . @ -", required: true, maxlength: "64", autocomplete: "off" });
  const password = input({ id: "new-user-password", type: "password", required: true, minlength: "8", autocomplete: "new-password" });
  const admin = h("input", { id: "new-user-admin", type: "checkbox" });
  const addForm = h("form", { id: "add-user-form", class: "stack" },
    h("div", { class: "row" }, field("Name", name), field("Password", password)),
    h("label", { class: "check" }, admin, h("span", { text: "Admin (sees everyone's chats, manages users)" })),
    h("div", { class: "row" }, h("button", { type: "submit", class: "btn primary", text: "Add user" })));
  submitter(addForm, async () => {
    const made = await api("/api/admin/users", { method: "POST", body: { name: name.value.trim(), password: password.value, admin: admin.checked } });
    toast(`${made.name} added.`);
    if (!deps.authRequired()) return location.reload(); // the open mode ended: sign in
    openSettings("admin", false);
  });
  body.replaceChildren(
    card("Users", table(["Name", "Role", "Created", "Tokens", "Sign-ins", "Turns", "Cost", ""], rows, "No users yet: prismd is open on this machine."), addForm),
    card("API tokens", tokenTable(tokens, true)),
    card("Signed in", loginTable(logins, true)));
}

function resetRow(row, user) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("reset-row")) return next.querySelector("input").focus();
  const password = input({ type: "password", required: true, minlength: "8", autocomplete: "new-password", "aria-label": `New password for ${user.name}` });
  const form = h("form", { class: "row" }, password,
    h("button", { type: "submit", class: "btn small primary", text: "Set password" }),
    h("button", { type: "button", class: "btn small", text: "Cancel", onclick: () => holder.remove() }));
  const holder = h("tr", { class: "reset-row" }, h("td", { colspan: "8" }, form));
  submitter(form, async () => {
    await api(`/api/admin/users/${enc(user.id)}/password`, { method: "POST", body: { password: password.value } });
    toast(`${user.name}'s password was set: their sign-ins ended.`);
    holder.remove();
  });
  row.after(holder);
  password.focus();
}
