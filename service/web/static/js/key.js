// The key prompt: shown when the server asks for an API key. The key is kept in sessionStorage,
// so it lasts as long as this tab and is never written to disk by the app.

import {api, apiKey} from "./api.js";
import {h} from "./dom.js";

let signedIn = () => {};

export function onSignedIn(callback) {
  signedIn = callback;
}

export function mount(root, {message}) {
  const error = h("p", {id: "key-error", class: "field-error", role: "alert"}, message || "");
  const input = h("input", {id: "key-input", type: "password", name: "key", required: true,
    autocomplete: "off", spellcheck: "false", "data-testid": "key-input",
    "aria-describedby": "key-hint key-error"});
  const button = h("button", {type: "submit", class: "primary", "data-testid": "key-button"}, "Continue");
  const form = h("form", {class: "card key-card", novalidate: true},
    h("h1", {}, "Enter your API key"),
    h("p", {}, "This Headstart asks for an API key. Whoever runs it can give you one: ",
      "an admin key may create and delete classifiers, a predict key may look at them and try them."),
    h("label", {for: "key-input"}, "API key"),
    input,
    h("p", {id: "key-hint", class: "hint"}, "Kept in this browser tab only (sessionStorage) and sent as ",
      h("code", {}, "Authorization: Bearer …"), "."),
    error,
    h("div", {class: "actions"}, button));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Enter a key first.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    button.disabled = true;
    apiKey.set(key);
    try {
      await api("v1/auth", {quiet: [401]});
      signedIn();
    } catch (problem) {
      apiKey.clear();
      error.textContent = problem.status === 401 ? "That key is not valid here. Check it and try again."
        : problem.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  root.append(form);
}
