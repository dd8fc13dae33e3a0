"""A page written only against CortexPrism's shapes (PROTOCOL.md A and D), not prismd's app:
chat, reload (the history comes back over REST) and the history list, in Chromium.

The page is defined here and served by the test on prismd's origin (Playwright answers its URL),
so it reaches /api and /ws as CortexPrism's own page reaches its server. It reads the bodies as
CortexPrism's page does (`for (const m of await res.json())`, `m.token_count`, `s.turn_count`,
`config.providers[kind].model`, …); a wrapped or renamed body throws, and every error is shown
in #errors and fails the test.
"""

from __future__ import annotations

from playwright.sync_api import Page, Route, expect

from prismd.testing.fake_models import FakeModelServer, Reply
from tests.conftest import PrismdServer

CLIENT = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>CortexPrism-shaped client</title></head>
<body>
<header>
  <span id="model-label">…</span>
  <select id="agent-select"></select>
  <span id="agent-name"></span>
  <select id="model-select"></select>
  <span id="panels"></span>
  <span id="ws-state">connecting</span>
</header>
<main id="chat"><div id="log"></div>
  <textarea id="input"></textarea><button id="send">Send</button>
  <div id="context"></div>
</main>
<section id="history">
  <button id="open-history">History</button>
  <div id="sidebar"></div>
  <div id="sessions-table"></div>
  <div id="detail">
    <h2 id="detail-title"></h2><div id="detail-stats"></div><div id="detail-log"></div>
  </div>
</section>
<pre id="errors"></pre>
<script>
const BASE = location.origin;
let ws = null, sessionId = localStorage.getItem("cortex_session_id"), bubble = null, named = false;

function fail(where, err) {
  const text = (err && err.message) || err;
  document.getElementById("errors").textContent += where + ": " + text + "\n";
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function json(path, init) {
  const res = await fetch(BASE + path, init);
  if (!res.ok) throw new Error(path + " answered " + res.status);
  return res.json();
}
function appendBubble(role, text) {
  const b = el("div", "bubble " + role, text);
  document.getElementById("log").appendChild(b);
  return b;
}
function appendMeta(text) { document.getElementById("log").appendChild(el("div", "meta", text)); }
function firstUserText() { return document.querySelector("#log .bubble.user").textContent; }

async function loadDaemonStatus() {
  const st = await json("/api/status");
  const on = ["validator", "executor", "scheduler"].filter((k) => st.daemons[k]);
  const label = `${st.provider} / ${st.model}` + (on.length ? " +" + on : "");
  document.getElementById("model-label").textContent = label;
}
async function loadAgentSelector() {
  const agents = await json("/api/agents");
  const current = await json("/api/agents/current");
  const sel = document.getElementById("agent-select");
  sel.innerHTML = "";
  for (const a of agents) {
    const o = el("option", "", a.name + (a.builtin ? "" : " *"));
    o.value = a.id;
    o.selected = a.id === current.id;
    sel.appendChild(o);
  }
  document.getElementById("agent-name").textContent = current.name;
}
async function loadModelSelector() {
  const config = await json("/api/config");
  const kind = config.defaultProvider;
  const current = config.providers[kind].model;
  const models = await json("/api/providers/" + kind + "/models");
  const sel = document.getElementById("model-select");
  sel.innerHTML = "";
  sel.appendChild(Object.assign(el("option", "", "Default (" + current + ")"), { value: "" }));
  for (const m of models) {
    sel.appendChild(Object.assign(el("option", "", m.name || m.id), { value: m.id }));
  }
}
async function loadPluginPanels() {
  const panels = await json("/api/plugins/panels");
  const titles = panels.map((p) => p.title).join(", ");
  document.getElementById("panels").textContent = titles || "no panels";
}
async function restoreSession() {
  if (!sessionId) return;
  const path = "/api/sessions/" + encodeURIComponent(sessionId);
  const resumed = await json(path + "/resume", { method: "POST" });
  if (resumed.ok !== true) throw new Error("resume did not answer {ok: true}");
  const msgs = await json(path + "/messages");
  for (const m of msgs) {
    if (m.role === "user") appendBubble("user", m.content);
    else if (m.role === "assistant") {
      const calls = m.tool_calls ? JSON.parse(m.tool_calls) : [];
      for (const c of calls) appendBubble("tool", "⚙ " + c.name);
      if (m.content) appendBubble("agent", m.content);
      if (m.token_count) appendMeta(m.token_count + " tokens");
    }
  }
  named = true;
}
async function loadSessionsSidebar() {
  const sessions = await json("/api/sessions?limit=15");
  const side = document.getElementById("sidebar");
  side.innerHTML = "";
  for (const s of sessions) {
    const time = new Date(s.started_at);
    if (isNaN(time)) throw new Error("started_at is not a date: " + s.started_at);
    const label = `${s.name || s.id.slice(-12)} · ${s.turn_count} turns`;
    side.appendChild(el("div", "sess-item", label));
  }
}
async function loadSessionsList() {
  const tree = await json("/api/sessions/enriched?limit=50");
  const table = document.getElementById("sessions-table");
  table.innerHTML = "";
  for (const p of tree) {
    for (const s of [p, ...p.children]) {
      const row = el("div", "sess-row");
      row.dataset.id = s.id;
      row.textContent = `${s.name || s.id.slice(-16)} | ${s.status} | ${s.turn_count} turns | ` +
        `${s.total_tokens} tokens | ${s.llm_calls} calls | ${s.tool_calls} tools | ` +
        `$${s.cost_usd.toFixed(6)} | ${s.child_count} sub-agents`;
      row.onclick = () => openSession(s.id).catch((e) => fail("openSession", e));
      table.appendChild(row);
    }
  }
}
async function openSession(id) {
  const [session, msgs, children, stats] = await Promise.all([
    json("/api/sessions/" + encodeURIComponent(id)),
    json("/api/sessions/" + encodeURIComponent(id) + "/messages"),
    json("/api/sessions/" + encodeURIComponent(id) + "/children"),
    json("/api/sessions/" + encodeURIComponent(id) + "/stats"),
  ]);
  document.getElementById("detail-title").textContent = session.name || session.id;
  document.getElementById("detail-stats").textContent =
    `${stats.total_tokens} tokens · ${stats.llm_calls} calls · ${stats.tool_calls} tools · ` +
    `${children.length} sub-agents`;
  const log = document.getElementById("detail-log");
  log.innerHTML = "";
  for (const m of msgs.filter((m) => m.role === "user" || m.role === "assistant")) {
    log.appendChild(el("div", "detail-" + m.role, m.content));
  }
}
function connect() {
  ws = new WebSocket(BASE.replace(/^http/, "ws") + "/ws");
  ws.onopen = () => { document.getElementById("ws-state").textContent = "open"; };
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    switch (msg.type) {
      case "session":
        sessionId = msg.sessionId;
        localStorage.setItem("cortex_session_id", sessionId);
        break;
      case "start":
        bubble = appendBubble("agent", "");
        bubble.classList.add("streaming");
        break;
      case "chunk":
        bubble.textContent += msg.delta;
        break;
      case "done":
        bubble.classList.remove("streaming");
        appendMeta(`${msg.durationMs}ms · ${msg.tokensIn} in / ${msg.tokensOut} out · ` +
          msg.model);
        if (!named && sessionId) {
          named = true;
          json("/api/sessions/" + encodeURIComponent(sessionId), {
            method: "PATCH",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ name: firstUserText().slice(0, 60) }),
          }).then((r) => { if (r.ok !== true) throw new Error("PATCH did not answer {ok: true}"); })
            .catch((e) => fail("rename", e));
        }
        break;
      case "context_usage":
        const used = `${msg.usedTokens} / ${msg.maxContext} tokens`;
        document.getElementById("context").textContent = used;
        break;
      case "error":
        fail("ws", msg.error);
        break;
    }
  };
}
function send() {
  const input = document.getElementById("input");
  const text = input.value.trim();
  if (!text) return;
  appendBubble("user", text);
  const agentId = document.getElementById("agent-select").value;
  ws.send(JSON.stringify({ type: "chat", message: text, sessionId, agentId }));
  input.value = "";
}
document.getElementById("send").onclick = send;
document.getElementById("open-history").onclick = () => {
  loadSessionsList().catch((e) => fail("loadSessionsList", e));
  loadSessionsSidebar().catch((e) => fail("loadSessionsSidebar", e));
};
const loaders = {
  loadDaemonStatus, loadAgentSelector, loadModelSelector, loadPluginPanels, restoreSession,
};
for (const [name, load] of Object.entries(loaders)) load().catch((e) => fail(name, e));
connect();
</script>
</body></html>
"""


def serve_client(page: Page, server: PrismdServer) -> str:
    """The client page at a URL of prismd's origin, answered by the test itself."""
    url = server.url + "/cortex-client.html"

    def answer(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html; charset=utf-8", body=CLIENT)

    page.route(url, answer)
    # A page Playwright answers has no network address, so Chromium takes it for a public site
    # and its Local Network Access check blocks the WebSocket to 127.0.0.1; a user of a page
    # really served by prismd is never asked. Grant what that user would have.
    page.context.grant_permissions(["local-network-access"])
    return url


def no_errors(page: Page) -> None:
    expect(page.locator("#errors")).to_have_text("")


def test_a_cortexprism_client_chats_reloads_and_lists_history(
    page: Page, web_server: PrismdServer, fake_openai: FakeModelServer
) -> None:
    fake_openai.script(Reply(text=["Hello ", "from ", "prismd."]), match="first question")
    url = serve_client(page, web_server)
    page.goto(url)
    expect(page.locator("#ws-state")).to_have_text("open")
    # The selectors fill from /api/status, /api/agents, /api/agents/current, /api/config and
    # /api/providers/:kind/models; the plugin panels are an empty list.
    expect(page.locator("#model-label")).to_have_text("openai / gpt-4o-mini")
    expect(page.locator("#agent-select option")).to_have_text(["Assistant", "Coder"])
    expect(page.locator("#agent-select")).to_have_value("assistant")
    expect(page.locator("#agent-name")).to_have_text("Assistant")
    expect(page.locator("#model-select option")).to_have_text(
        ["Default (gpt-4o-mini)", "fake-model"]
    )
    expect(page.locator("#panels")).to_have_text("no panels")
    no_errors(page)

    # Chat: the answer streams into its bubble, the done figures and the context arrive.
    page.locator("#input").fill("first question")
    page.locator("#send").click()
    expect(page.locator(".bubble.agent")).to_have_text(["Hello from prismd."])
    expect(page.locator(".bubble.agent.streaming")).to_have_count(0)
    expect(page.locator(".meta")).to_contain_text(["3 out · gpt-4o-mini"])
    expect(page.locator("#context")).to_contain_text(" tokens")
    page.locator("#input").fill("second question")
    page.locator("#send").click()
    expect(page.locator(".bubble.agent")).to_have_text(
        ["Hello from prismd.", "You said: second question"]
    )
    expect(page.locator(".bubble.agent.streaming")).to_have_count(0)
    session_id = page.evaluate("localStorage.getItem('cortex_session_id')")
    assert session_id and session_id.startswith("sess_")

    # Reload: the history comes back from GET /api/sessions/:id/messages.
    page.reload()
    expect(page.locator("#ws-state")).to_have_text("open")
    expect(page.locator(".bubble.user")).to_have_text(["first question", "second question"])
    expect(page.locator(".bubble.agent")).to_have_text(
        ["Hello from prismd.", "You said: second question"]
    )
    expect(page.locator(".meta")).to_have_text(["3 tokens", "4 tokens"])  # token_count
    no_errors(page)

    # The same session goes on after the reload.
    page.locator("#input").fill("third question")
    page.locator("#send").click()
    expect(page.locator(".bubble.agent")).to_have_count(3)
    expect(page.locator(".bubble.agent.streaming")).to_have_count(0)
    assert page.evaluate("localStorage.getItem('cortex_session_id')") == session_id

    # The history list: enriched rows, then one session's detail.
    page.locator("#open-history").click()
    row = page.locator(f'.sess-row[data-id="{session_id}"]')
    expect(row).to_contain_text("first question | active | 3 turns | ")
    expect(row).to_contain_text("3 calls | 0 tools | $")
    expect(page.locator(".sess-item").first).to_have_text("first question · 3 turns")
    row.click()
    expect(page.locator("#detail-title")).to_have_text("first question")
    expect(page.locator("#detail-stats")).to_contain_text("3 calls · 0 tools · 0 sub-agents")
    expect(page.locator("#detail-log .detail-user")).to_have_text(
        ["first question", "second question", "third question"]
    )
    expect(page.locator("#detail-log .detail-assistant")).to_have_count(3)
    no_errors(page)
