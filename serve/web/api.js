// Thin fetch helpers for the wanrt / Daydream Scope HTTP API (same origin as this page).

export class ApiError extends Error {
  constructor(message, status, kind) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

// A server started with --api-token needs it on every call: open this page once as /#token=TOKEN and it is kept in
// this browser's localStorage (and taken out of the address bar).
const TOKEN_KEY = "wanrt-api-token";
const tokenInFragment = new URLSearchParams(location.hash.slice(1)).get("token");
if (tokenInFragment) {
  localStorage.setItem(TOKEN_KEY, tokenInFragment);
  history.replaceState(null, "", location.pathname + location.search);
}

export async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const init = { method, headers: { ...headers } };
  // Every POST says it is JSON, with `{}` when it has nothing to say: the server refuses state changes without it.
  if (method === "POST" && json === undefined && body === undefined) json = {};
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch (err) {
    throw new ApiError(`network error on ${method} ${path}: ${err.message}`, 0, "NetworkError");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = data && (data.detail || data.message) ? data.detail || data.message : text || response.statusText;
    const kind = data && data.error ? data.error : `HTTP ${response.status}`;
    throw new ApiError(`${kind}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`, response.status, kind);
  }
  return data;
}

/** Saves an API file (a recording) as `filename`. A plain download link sends no token, so a server started with
 * --api-token answered it 401: this fetches it with the token, then saves what came. */
export async function saveFile(path, filename) {
  const token = localStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (!response.ok) throw new ApiError(`HTTP ${response.status} for ${path}`, response.status, `HTTP ${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 60_000); // the download has taken its copy by then
}

export const hasToken = () => Boolean(localStorage.getItem(TOKEN_KEY));

export async function uploadAsset(file) {
  const name = encodeURIComponent(file.name || "upload.bin");
  return api(`/assets?filename=${name}`, {
    method: "POST",
    body: file,
    headers: { "Content-Type": "application/octet-stream" },
  });
}
