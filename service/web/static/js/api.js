// The one way this app talks to the API: relative URLs (so it works behind a path prefix), the
// API key from sessionStorage as a Bearer token, and every problem+json error turned into an
// ApiError that is shown to the person unless the caller says it expects it.

import {h} from "./dom.js";

const KEY = "headstart.api-key";
const listeners = {unauthorized: []};

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

/** Called with the error whenever the API answers 401 (no key, or a key it does not know). */
export function onUnauthorized(callback) {
  listeners.unauthorized.push(callback);
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.errors = problem.errors || [];
  }
}

function problemOf(status, contentType, text) {
  if ((contentType || "").includes("json")) {
    try {
      return JSON.parse(text);
    } catch { /* not JSON after all: fall through */ }
  }
  return {title: `HTTP ${status}`, detail: (text || "").slice(0, 300)};
}

function fail(error, quiet) {
  if (quiet.includes(error.status)) return error;
  if (error.status === 401) listeners.unauthorized.forEach((callback) => callback(error));
  else showError(error);
  return error;
}

function headers(extra = {}) {
  const result = new Headers({Accept: "application/json", ...extra});
  const key = apiKey.get();
  if (key) result.set("Authorization", `Bearer ${key}`);
  return result;
}

/**
 * fetch for the API. Resolves to the parsed JSON (null for 204), or to the Response itself with
 * `raw: true`. Rejects with an ApiError; statuses listed in `quiet` are not shown to the person.
 */
export async function api(path, {method = "GET", body, quiet = [], raw = false, signal,
  headers: extra} = {}) {
  let response;
  try {
    response = await fetch(path, {method, body, headers: headers(extra), signal});
  } catch (cause) {
    if (cause.name === "AbortError") throw cause;
    throw fail(new ApiError(0, {title: "The service did not answer",
      detail: "Check that Headstart is running and reachable, then try again."}), quiet);
  }
  if (!response.ok) {
    const text = await response.text();
    throw fail(new ApiError(response.status,
      problemOf(response.status, response.headers.get("Content-Type"), text)), quiet);
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** POST a FormData with upload progress (fetch has none): onProgress(sentBytes, totalBytes). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    headers().forEach((value, name) => request.setRequestHeader(name, value));
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) {
        resolve({body: JSON.parse(request.responseText || "null"),
          location: request.getResponseHeader("Location")});
      } else {
        reject(fail(new ApiError(request.status, problemOf(request.status,
          request.getResponseHeader("Content-Type"), request.responseText)), []));
      }
    });
    request.addEventListener("error", () => reject(fail(new ApiError(0, {
      title: "The upload did not go through",
      detail: "The connection was lost. Check that Headstart is running, then try again."}), [])));
    request.send(form);
  });
}

/** Save a response's body as the file `filename`, through a hidden link to its blob. */
async function save(response, filename) {
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", {href: url, download: filename, hidden: true});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Fetch with the key, then save the body under `filename` (plain links cannot send a key). */
export async function download(path, filename) {
  await save(await api(path, {raw: true, headers: {Accept: "*/*"}}), filename);
}

/** Download an export: the server answers 202 with Retry-After while it builds the zip. */
export async function downloadExport(path, filename, onWait) {
  for (;;) {
    const response = await api(path, {raw: true, headers: {Accept: "application/zip"}});
    if (response.status !== 202) {
      await save(response, filename);
      return;
    }
    const seconds = Number(response.headers.get("Retry-After") || 5);
    onWait(seconds);
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }
}

// ----------------------------------------------------------------- visible messages

function notice(kind, title, detail) {
  const region = document.getElementById("notices");
  const close = h("button", {class: "icon-button", type: "button", "aria-label": "Dismiss message"},
    "×");
  const item = h("div", {class: `notice notice-${kind}`, role: kind === "error" ? "alert" : "status",
    "data-testid": kind === "error" ? "error-message" : "message"},
  h("div", {}, h("strong", {}, title), detail ? h("span", {}, ` ${detail}`) : null), close);
  close.addEventListener("click", () => item.remove());
  region.append(item);
  if (kind !== "error") setTimeout(() => item.remove(), 6000);
  return item;
}

/** Shows an ApiError (or any Error) where the person will see it. */
export function showError(error) {
  const title = error.title || "Something went wrong";
  const detail = error.detail ?? error.message ?? "";
  const fields = (error.errors || []).map((e) => `${e.field}: ${e.message}`).join("; ");
  return notice("error", `${title}.`, fields && !detail.includes(fields) ? `${detail} (${fields})` : detail);
}

export function showMessage(title, detail = "") {
  return notice("info", title, detail);
}

export function clearNotices() {
  document.getElementById("notices").replaceChildren();
}
