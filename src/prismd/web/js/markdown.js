// Safe markdown: marked renders, raw HTML in model output is shown as text (never parsed),
// DOMPurify sanitises what marked produced, highlight.js colours code blocks.
import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.mjs";
import hljs from "../vendor/hljs/core.js";
import { LANGUAGES } from "../vendor/languages.js";

const ALIASES = { sh: "bash", zsh: "bash", js: "javascript", ts: "typescript", py: "python",
  html: "xml", yml: "yaml", rs: "rust", golang: "go", "c++": "cpp", cs: "csharp", text: "plaintext",
  txt: "plaintext", console: "shell", toml: "ini", docker: "dockerfile", kt: "kotlin", rb: "ruby" };
const loading = new Map();

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML written by the model is text, not markup.
    html(token) {
      return escapeHtml(token.raw ?? token.text ?? "");
    },
    // Remote images would be a request to another origin (and are blocked by the CSP): a link.
    image(token) {
      const label = escapeHtml(token.text || token.title || token.href || "image");
      if (/^data:image\/(png|jpe?g|gif|webp);/i.test(token.href || "")) {
        return `<img src="${escapeHtml(token.href)}" alt="${label}">`;
      }
      return `<a href="${escapeHtml(token.href || "")}">🖼 ${label}</a>`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (!/^(https?:|mailto:|#)/i.test(href)) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
  FORBID_ATTR: ["style", "class", "id"],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ["data-lang", "target"],
};

export function renderMarkdown(el, text) {
  const html = marked.parse(text);
  el.replaceChildren(DOMPurify.sanitize(html, { ...PURIFY, RETURN_DOM_FRAGMENT: true }));
  for (const pre of el.querySelectorAll("pre")) decorateCode(pre);
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  if (!code) return;
  const wrap = document.createElement("div");
  wrap.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const lang = document.createElement("span");
  lang.className = "code-lang";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(code.textContent, copy));
  bar.append(lang, copy);
  pre.replaceWith(wrap);
  wrap.append(bar, pre);
  const name = ALIASES[code.dataset.lang] || code.dataset.lang || "";
  lang.textContent = code.dataset.lang || "text";
  highlight(code, name);
}

async function highlight(code, name) {
  if (!name || !LANGUAGES.includes(name)) return;
  if (!hljs.getLanguage(name)) {
    if (!loading.has(name)) {
      loading.set(name, import(`../vendor/hljs/languages/${name}.js`).then((m) => hljs.registerLanguage(name, m.default)));
    }
    try { await loading.get(name); } catch { return; }
  }
  if (!code.isConnected && !code.parentNode) return;
  const result = hljs.highlight(code.textContent, { language: name, ignoreIllegals: true });
  // hljs escapes the code text; its output only has <span class="hljs-…">: sanitised anyway.
  code.replaceChildren(DOMPurify.sanitize(result.value, { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"], RETURN_DOM_FRAGMENT: true }));
  code.classList.add("hljs");
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const old = button.textContent;
    button.textContent = "Copied";
    button.classList.add("done");
    setTimeout(() => { button.textContent = old; button.classList.remove("done"); }, 1200);
  }
}

// Keep the fence language through sanitising: marked's class attribute is dropped by DOMPurify
// (we forbid class on model output), so the language goes into a data attribute we set ourselves.
marked.use({
  renderer: {
    code(token) {
      const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase().replace(/[^\w+#-]/g, "");
      return `<pre><code data-lang="${escapeHtml(lang)}">${escapeHtml(token.text)}</code></pre>`;
    },
  },
});
