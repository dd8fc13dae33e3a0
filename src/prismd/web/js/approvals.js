// Tool approvals: the dialog that asks about one pending `approval_request` at a time (and
// says how many wait), and the answer sent back (`approval_response`).
import { $ } from "./dom.js";
import { CLIENT } from "./protocol.js";

const open = new Map(); // requestId -> approval_request frame
let deps = null;

// send(frame); resolved(requestId, approved): mark the answer on the tool cards.
export function initApprovals({ send, resolved }) {
  deps = { send, resolved };
  const dialog = $("#approval-dialog");
  $("#approval-approve").addEventListener("click", () => answerApproval(dialog.dataset.requestId, true));
  $("#approval-deny").addEventListener("click", () => answerApproval(dialog.dataset.requestId, false));
  dialog.addEventListener("cancel", (e) => e.preventDefault()); // Esc does not silently dismiss
}

export function dialogOpen() {
  return $("#approval-dialog").open;
}

export function openApproval(frame) {
  open.set(frame.requestId, frame);
  render();
}

export function closeApproval(requestId) {
  open.delete(requestId);
  render();
}

export function closeApprovalsOf(turnId) {
  for (const [id, frame] of open) if (frame.turnId === turnId) open.delete(id);
  render();
}

export function closeAllApprovals() {
  open.clear();
  render();
}

export function answerApproval(requestId, approved) {
  deps.send({ type: CLIENT.APPROVAL_RESPONSE, requestId, approved });
  deps.resolved(requestId, approved);
  closeApproval(requestId);
}

function render() {
  const dialog = $("#approval-dialog");
  const next = [...open.values()][0];
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
  $("#approval-count").textContent = open.size > 1 ? `${open.size} requests waiting` : "";
  if (!dialog.open) dialog.showModal();
  $("#approval-deny").focus();
}
