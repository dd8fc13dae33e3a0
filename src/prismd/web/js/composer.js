// The composer: the message box, and attachments. Files (paperclip, paste, drop) are uploaded
// at once with `POST /api/upload`, their progress shown on their chip; the chat then sends
// `{fileId}` entries instead of the bytes. A chip removed before sending removes its upload.
import { api, enc, uploadFile } from "./api.js";
import { $, toast, formatBytes } from "./dom.js";
import { fileChip, isImage } from "./view.js";

const MAX_FILE_BYTES = 10 * 1024 * 1024;
const attachments = []; // {key, filename, mimeType, size, previewUrl?, state, progress, fileId?, abort?}
let deps = null;
let counter = 0;

// send(text, files) -> bool: sends a chat (chat.js's sendChat).
export function initComposer(options) {
  deps = options;
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
  $("#attach").addEventListener("click", () => $("#file-input").click());
  $("#file-input").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  for (const btn of document.querySelectorAll(".suggestion")) {
    btn.addEventListener("click", () => { input.value = btn.dataset.prompt; autosize(); input.focus(); });
  }
  // Drag and drop anywhere on the page.
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
}

export function autosize() {
  const input = $("#input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

export function uploading() {
  return attachments.some((a) => a.state === "uploading");
}

function addFiles(list) {
  for (const file of list) {
    if (file.size > MAX_FILE_BYTES) {
      toast(`${file.name} is larger than ${formatBytes(MAX_FILE_BYTES)}.`, "error");
      continue;
    }
    const entry = {
      key: ++counter,
      filename: file.name || `pasted-${Date.now()}.${(file.type.split("/")[1] || "bin")}`,
      mimeType: file.type || "application/octet-stream",
      size: file.size,
      state: "uploading",
      progress: 0,
      steps: 0,
    };
    if (isImage(entry)) entry.previewUrl = URL.createObjectURL(file);
    attachments.push(entry);
    const job = uploadFile(file, entry.filename, (fraction) => {
      entry.progress = fraction;
      entry.steps += 1;
      updateChip(entry);
    });
    entry.abort = job.abort;
    entry.done = job.promise.then((up) => {
      Object.assign(entry, { fileId: up.id, filename: up.filename, mimeType: up.mimeType, size: up.size, state: "ready", progress: 1 });
      entry.abort = null;
      render();
    }, (err) => {
      remove(entry, false);
      if (err.code !== "cancelled") toast(`${entry.filename}: ${err.message}`, "error");
    });
  }
  render();
  $("#input").focus();
}

function chipOf(entry) {
  const chip = fileChip(entry, () => remove(entry, true));
  chip.dataset.key = entry.key;
  chip.dataset.progressSteps = entry.steps;
  return chip;
}

function updateChip(entry) {
  const old = $(`#attachments .file-chip[data-key="${entry.key}"]`);
  if (old) old.replaceWith(chipOf(entry));
}

function render() {
  const box = $("#attachments");
  box.replaceChildren(...attachments.map(chipOf));
  box.hidden = attachments.length === 0;
  $("#send").classList.toggle("waiting", uploading());
}

// Removes an attachment; `discard`: the user took it back, so its upload goes too.
function remove(entry, discard) {
  const i = attachments.indexOf(entry);
  if (i < 0) return;
  attachments.splice(i, 1);
  if (entry.abort) entry.abort();
  if (discard && entry.fileId) api(`/api/uploads/${enc(entry.fileId)}`, { method: "DELETE" }).catch(() => {});
  render();
}

let held = false; // a submit waits for the uploads in progress

// Sends the message and the attachments; while files are still uploading, it waits for them
// (Enter again changes nothing) and then sends what uploaded.
export async function submit() {
  if (held) return;
  if (uploading()) {
    held = true;
    $("#send").classList.add("waiting");
    await Promise.allSettled(attachments.map((a) => a.done));
    held = false;
  }
  const input = $("#input");
  const files = attachments.filter((a) => a.state === "ready");
  if (deps.send(input.value, files)) {
    input.value = "";
    attachments.length = 0;
    render();
    autosize();
  }
}
