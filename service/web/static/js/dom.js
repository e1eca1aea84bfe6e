// Small DOM helpers: build elements from data, never from HTML strings, so user text (labels,
// names, file paths) is always text.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "text") {
      element.textContent = value;
    } else {
      element.setAttribute(name === "className" ? "class" : name, value === true ? "" : value);
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** h("button", {class: "primary", onclick: f}, "Save") → an HTML element. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** s("line", {x1: 0, …}) → an SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

let ids = 0;
/** A fresh id for aria-labelledby / aria-describedby links. */
export function uid(prefix = "id") {
  ids += 1;
  return `${prefix}-${ids}`;
}

export function percent(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value)
    ? `${(value * 100).toFixed(digits)}\u00a0%` : "—";
}

export function number(value, digits = 2) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  return Number.isInteger(value) ? value.toLocaleString("en-US")
    : value.toLocaleString("en-US", {maximumFractionDigits: digits});
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso
    : date.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

/** The status word as a badge; `classifier-status` is a test hook. */
export function statusBadge(status, extra = {}) {
  return h("span", {class: `badge badge-${status}`, "data-testid": "classifier-status", ...extra},
    status);
}

/** A training stage in words: preview, augmented, fine-tuned. */
export function stageName(stage) {
  return String(stage).replace("_", "-");
}

/** " · refining (stage)" after a ready classifier's badge while a later stage trains (null
 * otherwise); `refining` is a test hook. */
export function refiningNote(classifier) {
  if (!classifier?.refining) return null;
  const stage = classifier.progress?.training_stage;
  return h("span", {class: "muted small", "data-testid": "refining"},
    ` · refining${stage ? ` (${stageName(stage)})` : ""}`);
}

/** A definition list from [term, value] pairs; values may be nodes. */
export function facts(pairs, attrs = {}) {
  return h("dl", {class: "facts", ...attrs},
    pairs.filter(Boolean).map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))));
}
