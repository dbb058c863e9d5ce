// Requests to this node's API. When the node asks for an API key (401), the key form opens; the key is kept
// in localStorage and sent as `Authorization: Bearer` from then on.

import { $ } from "./dom.js";

const KEY_STORE = "exo.apiKey";
let pageKey = "";  // where the key lives when localStorage is unavailable

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || pageKey; } catch { return pageKey; }
}

/** The error message of an OpenAI-style error body, or of whatever else came back. */
export async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    return body?.error?.message ?? body?.detail ?? text;
  } catch {
    return text || `${response.status} ${response.statusText}`;
  }
}

/** fetch() with the API key, throwing HttpError for any answer other than 2xx or one of `accept`. */
export async function api(path, init = {}, accept = []) {
  const headers = new Headers(init.headers);
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...init, headers });
  if (response.ok || accept.includes(response.status)) return response;
  const message = await errorMessage(response);
  if (response.status === 401) askForKey(key ? "The node refused the stored API key." : message);
  throw new HttpError(response.status, message || `${response.status} ${response.statusText}`);
}

export const getJSON = async (path, accept = []) =>
  (await api(path, { signal: AbortSignal.timeout(4000), cache: "no-store" }, accept)).json();

function askForKey(reason) {
  const form = $("auth");
  $("auth-reason").textContent = reason || "This cluster needs an API key.";
  if (form.hidden) {
    form.hidden = false;
    $("auth-key").focus();
  }
}

export function setupKeyForm(onKey) {
  const form = $("auth");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("auth-key").value.trim();
    if (!key) return;
    pageKey = key;
    try { localStorage.setItem(KEY_STORE, key); } catch { /* private mode: the key lasts for this page only */ }
    $("auth-key").value = "";
    form.hidden = true;
    onKey();
  });
  $("auth-forget").addEventListener("click", () => {
    pageKey = "";
    try { localStorage.removeItem(KEY_STORE); } catch { /* nothing stored */ }
    form.hidden = true;
    onKey();
  });
}
