// The app shell: learns what the API key may do (GET /v1/auth), routes #/ and #/classifiers/{id}
// to their views, and asks for a key when the API answers 401.

import {api, apiKey, clearNotices, onUnauthorized} from "./api.js";
import {h} from "./dom.js";
import * as classifierView from "./classifier.js";
import * as keyView from "./key.js";
import * as listView from "./list.js";

const main = document.getElementById("main");
let session = null; // {scope: "admin" | "predict", keys_required: bool}
let unmount = () => {};

const can = {
  create: () => session?.scope === "admin",
  delete: () => session?.scope === "admin",
  export: () => session?.scope === "admin",  // an export is the whole model: admin keys only
};

function renderSession() {
  const box = document.getElementById("session");
  box.replaceChildren();
  if (!session?.keys_required) return;
  const signOut = h("button", {type: "button", class: "link-button", "data-testid": "sign-out"}, "Sign out");
  signOut.addEventListener("click", () => {
    apiKey.clear();
    session = null;
    route();
  });
  box.append(h("span", {class: "muted", "data-testid": "session-scope"},
    session.scope === "admin" ? "Admin key" : "Predict key"), signOut);
}

function show(view, params, message) {
  unmount();
  main.replaceChildren();
  unmount = view.mount(main, {params, session, can, navigate, message}) || (() => {});
  const heading = main.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({preventScroll: true});
  }
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function learnSession() {
  try {
    session = await api("v1/auth", {quiet: [401]});
  } catch (error) {
    session = null;
    if (error.status !== 401) throw error;
  }
  renderSession();
  return session;
}

async function route(message) {
  if (!session) {
    try {
      await learnSession();
    } catch {
      main.replaceChildren(h("h1", {}, "Headstart"),
        h("p", {}, "The service did not answer. Reload the page once it is running."));
      return;
    }
  }
  if (!session) {
    show(keyView, {}, message);
    return;
  }
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/classifiers\/([^/?#]+)$/);
  if (match) show(classifierView, {id: decodeURIComponent(match[1])});
  else show(listView, {});
}

onUnauthorized(() => {
  const hadKey = Boolean(apiKey.get());
  apiKey.clear();
  session = null;
  renderSession();
  clearNotices();
  show(keyView, {}, hadKey ? "That API key is not valid here (any more): enter another one." : null);
});

keyView.onSignedIn(() => {
  session = null;
  route();
});

window.addEventListener("hashchange", () => route());
route();
