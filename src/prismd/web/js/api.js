// REST helpers. A route that does not exist (404 `not_found`, a 404 with no error code, or 405)
// is reported as `missing` so the app can hide the feature instead of failing.
import { ERROR } from "./protocol.js";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || (status ? `HTTP ${status}` : "Network error"));
    this.status = status;
    this.code = body && body.code;
    // An unknown route answers 404 `not_found`; a missing object has its own code
    // (session_not_found, agent_not_found…).
    const code = body && body.code;
    this.missing = status === 405 || (status === 404 && (!code || code === "not_found"));
    this.unauthorized = status === 401 || (status === 403 && code === ERROR.UNAUTHORIZED);
  }
}

export async function api(path, { method = "GET", body, form, signal } = {}) {
  const init = { method, credentials: "same-origin", headers: {}, signal };
  if (form) {
    init.body = form;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 204) return null;
  let data = null;
  const type = res.headers.get("content-type") || "";
  if (type.includes("json")) {
    try { data = await res.json(); } catch { data = null; }
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// Like api() but answers `fallback` when the route is not there (or auth is not built yet).
export async function maybe(path, fallback, options) {
  try {
    return await api(path, options);
  } catch (err) {
    if (err instanceof ApiError && err.missing) return fallback;
    throw err;
  }
}

export const enc = encodeURIComponent;

// POST /api/upload (multipart) with XMLHttpRequest, whose upload progress fetch() cannot
// report: `onProgress(fraction)` as the bytes leave. Returns {promise, abort}; the promise
// resolves to the upload ({id, filename, mimeType, size}) or rejects with an ApiError (its
// message is the server's: the quota, the size limit…).
export function uploadFile(file, name, onProgress) {
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open("POST", "/api/upload");
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300 && xhr.response) resolve(xhr.response);
      else reject(new ApiError(xhr.status, xhr.response));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, { error: "The upload failed (network)" })));
    xhr.addEventListener("abort", () => reject(new ApiError(0, { error: "Cancelled", code: "cancelled" })));
    const form = new FormData();
    form.append("file", file, name);
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}
