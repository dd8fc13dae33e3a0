// The agent and model pickers of the top bar: which agent and model the next chats use.
import { api, maybe, enc } from "./api.js";
import { $, h, toast } from "./dom.js";
import { CLIENT } from "./protocol.js";

const KEY_AGENT = "prismd.agentId";
const KEY_MODEL = "prismd.model";

export const picks = {
  agents: [],
  defaultAgent: null,
  agentId: localStorage.getItem(KEY_AGENT) || null, // chosen by the user (else the default)
  model: localStorage.getItem(KEY_MODEL) || "", // "" = the provider's default
};

let send = () => false;

export function initPickers(sendFrame) {
  send = sendFrame;
  $("#agent-picker").addEventListener("change", chooseAgent);
  $("#model-picker").addEventListener("change", () => {
    picks.model = $("#model-picker").value;
    localStorage.setItem(KEY_MODEL, picks.model);
  });
}

export function agentName(id) {
  const agent = picks.agents.find((a) => a.id === id);
  return agent ? agent.name : id;
}

export async function loadAgents() {
  let agents;
  try { agents = await api("/api/agents"); } catch { $("#agent-picker").hidden = true; return; }
  picks.agents = agents;
  const chosen = agents.find((a) => a.default);
  picks.defaultAgent = chosen ? chosen.id : null;
  const picker = $("#agent-picker");
  picker.replaceChildren(...agents.map((a) => h("option", { value: a.id, text: a.name || a.id, title: a.description || "" })));
  if (!picks.agentId || !agents.some((a) => a.id === picks.agentId)) picks.agentId = null;
  picker.value = picks.agentId || picks.defaultAgent || (agents[0] && agents[0].id) || "";
  picker.hidden = agents.length === 0;
}

// The session's agent (from a `session` frame) becomes the picker's.
export function showAgent(agentId) {
  if (!agentId) return;
  picks.agentId = agentId;
  $("#agent-picker").value = agentId;
}

// Sent again on every new connection: `select_agent` applies to the connection.
export function announceAgent() {
  if (picks.agentId) send({ type: CLIENT.SELECT_AGENT, agentId: picks.agentId });
}

function chooseAgent() {
  const id = $("#agent-picker").value;
  picks.agentId = id;
  localStorage.setItem(KEY_AGENT, id);
  send({ type: CLIENT.SELECT_AGENT, agentId: id });
  toast(`Agent: ${agentName(id)}`);
}

export async function loadModels() {
  const picker = $("#model-picker");
  picker.hidden = true;
  const providers = await maybe("/api/providers", null).catch(() => null);
  if (!providers || !providers.default) return;
  const current = (providers.providers || []).find((p) => p.kind === providers.default);
  // The offline demo model says what it is, and how to connect a real one.
  $("#model-note").textContent = (current && current.note) || "";
  $("#model-note").hidden = !(current && current.note);
  const models = await maybe(`/api/providers/${enc(providers.default)}/models`, []).catch(() => []);
  const ids = new Set(models.map((m) => m.id));
  if (current && current.model) ids.delete(current.model);
  const label = current && (current.displayName || current.model);
  const options = [h("option", { value: "", text: label || "Default model" })];
  for (const id of [...ids].sort()) options.push(h("option", { value: id, text: id }));
  picker.replaceChildren(...options);
  picker.value = ids.has(picks.model) ? picks.model : "";
  picks.model = picker.value;
  picker.hidden = options.length < 2;
}
