// The list view (#/): every classifier with its status, labels, validation accuracy and creation
// time, refreshed while any of them trains; and, for an admin key, the create panel.

import {api} from "./api.js";
import * as create from "./create.js";
import {h, percent, refiningNote, statusBadge, when} from "./dom.js";

const REFRESH_MS = 2000;
const BUSY = new Set(["queued", "training"]);

function labelsCell(labels) {
  const shown = labels.slice(0, 6);
  return h("ul", {class: "chips"}, shown.map((label) => h("li", {}, label)),
    labels.length > shown.length ? h("li", {class: "more"}, `+${labels.length - shown.length} more`) : null);
}

function row(classifier) {
  const link = h("a", {href: `#/classifiers/${encodeURIComponent(classifier.id)}`, class: "row-link"},
    classifier.name);
  const stage = BUSY.has(classifier.status) && classifier.progress?.stage
    && classifier.progress.stage !== classifier.status ? classifier.progress.stage : null;
  return h("tr", {"data-testid": "classifier-row", "data-id": classifier.id},
    h("th", {scope: "row", "data-col": "Name"}, link, h("div", {class: "muted small mono"}, classifier.id)),
    h("td", {"data-col": "Status"}, statusBadge(classifier.status),
      stage ? h("span", {class: "muted small"}, ` ${stage}`) : null, refiningNote(classifier)),
    h("td", {"data-col": "Labels"}, labelsCell(classifier.labels)),
    h("td", {"data-col": "Validation accuracy", class: "num"}, percent(classifier.metrics?.val_accuracy)),
    h("td", {"data-col": "Created"}, h("time", {datetime: classifier.created_at}, when(classifier.created_at))));
}

function table(classifiers) {
  if (!classifiers.length) {
    return h("div", {class: "empty", "data-testid": "empty-list"},
      h("p", {}, h("strong", {}, "No classifiers yet.")),
      h("p", {class: "muted"}, "A classifier learns from a folder of photos with one subfolder per label, ",
        "for example ", h("code", {}, "photos/cats"), " and ", h("code", {}, "photos/dogs"), "."));
  }
  return h("div", {class: "table-wrap"},
    h("table", {class: "list"},
      h("caption", {class: "visually-hidden"}, "Classifiers, newest first"),
      h("thead", {}, h("tr", {},
        ["Name", "Status", "Labels", "Validation accuracy", "Created"].map((name) =>
          h("th", {scope: "col", class: name === "Validation accuracy" ? "num" : null}, name)))),
      h("tbody", {}, classifiers.map(row))));
}

export function mount(root, ctx) {
  let timer = null;
  let stopped = false;
  const listBox = h("div", {"aria-busy": "true"}, h("p", {class: "muted"}, "Loading classifiers…"));
  const count = h("span", {class: "muted"});
  root.append(
    h("div", {class: "page-head"}, h("h1", {}, "Classifiers"), count),
    ctx.can.create() ? create.panel(ctx) : null,
    h("section", {"aria-label": "All classifiers", class: "card"}, listBox));

  let shown = null;
  async function refresh() {
    try {
      const {classifiers} = await api("v1/classifiers");
      if (stopped) return;
      const snapshot = JSON.stringify(classifiers);
      if (snapshot !== shown) {
        // NB: a redraw must not throw a keyboard user's focus back to the top of the page.
        const focused = document.activeElement?.closest?.("[data-testid=classifier-row]")?.dataset.id;
        listBox.replaceChildren(table(classifiers));
        shown = snapshot;
        if (focused) listBox.querySelector(`[data-id="${CSS.escape(focused)}"] a`)?.focus();
      }
      listBox.setAttribute("aria-busy", "false");
      count.textContent = classifiers.length ? `${classifiers.length} in all` : "";
      if (classifiers.some((c) => BUSY.has(c.status) || c.progress)) timer = setTimeout(refresh, REFRESH_MS);
    } catch {
      if (!stopped) listBox.replaceChildren(h("p", {class: "muted"}, "The list could not be loaded."));
    }
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
