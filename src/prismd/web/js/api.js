// REST helpers. A route that does not exist (404 `not_found`, a 404 with no error code, or 405)
// is reported as `missing` so the app can hide the feature instead of failing.
export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    // An unknown route answers 404 `not_found`; a missing object has its own code
    // (session_not_found, agent_not_found…).
    const code = body && body.code;
    this.missing = status === 405 || (status === 404 && (!code || code === "not_found"));
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
