// The versions of one classifier (a section of its page): every version with its status, images,
// validation accuracy and aliases; "Make production" moves the alias (a rollback is the same
// move back); "Add images" trains a new version from a folder or a .zip added to production's.

import {api, ApiError, showError, showMessage, upload} from "./api.js";
import {folderEntries} from "./create.js";
import {h, number, percent, statusBadge, uid, when} from "./dom.js";
import {zipFiles} from "./zip.js";

const POLL_MS = 1500;
const ACTIVE = new Set(["queued", "training"]);

function promotionText(promotion) {
  if (!promotion) return "";
  return `${promotion.promoted ? "took production" : "kept out of production"}: ${promotion.reason}`;
}

/** The section, `refresh()` for when the classifier changed (an alias moved elsewhere), `stop()`. */
export function section(ctx, base) {
  const titleId = uid("versions-title");
  const body = h("tbody", {});
  const table = h("table", {class: "versions", "data-testid": "versions"},
    h("caption", {class: "visually-hidden"}, "Versions, newest first"),
    h("thead", {}, h("tr", {}, ["Version", "Status", "Images", "Validation accuracy", "Aliases", "Created", ""]
      .map((text) => h("th", {scope: "col"}, text)))), body);
  const element = h("section", {class: "card", "aria-labelledby": titleId},
    h("h2", {id: titleId}, "Versions"),
    h("p", {class: "muted"}, "Each training run is a version. Production answers predictions; ",
      "a new version takes it only if it is right on more of its new images than production (unless you choose)."),
    h("div", {class: "table-scroll"}, table));
  let timer = null;
  let stopped = false;

  async function makeProduction(version, button) {
    button.disabled = true;
    try {
      await api(`${base}/aliases/production`, {method: "PUT", body: JSON.stringify({version}),
        headers: {"Content-Type": "application/json"}});
      showMessage(`Version ${version} is production now.`);
    } finally {
      button.disabled = false;
    }
    await refresh();
  }

  function row(version) {
    const production = version.aliases.includes("production");
    const cells = [
      h("th", {scope: "row"}, `v${version.version}`),
      h("td", {}, statusBadge(version.status, {"data-testid": "version-status"})),
      h("td", {}, number(version.dataset.images), " ",
        h("span", {class: "muted small"}, `(${version.labels.length} labels)`)),
      h("td", {}, version.metrics ? percent(version.metrics.val_accuracy) : "–"),
      h("td", {}, version.aliases.length
        ? h("ul", {class: "chips", "aria-label": `Aliases of version ${version.version}`},
          version.aliases.map((name) => h("li", {"data-testid": "version-alias"}, name)))
        : "–",
      version.promotion ? h("p", {class: "muted small"}, promotionText(version.promotion)) : null),
      h("td", {}, h("time", {datetime: version.created_at}, when(version.created_at))),
    ];
    const action = h("td", {});
    if (ctx.can.delete() && version.status === "ready" && !production) {
      const button = h("button", {type: "button", class: "secondary", "data-testid": "make-production",
        "aria-label": `Make version ${version.version} production`}, "Make production");
      button.addEventListener("click", () => makeProduction(version.version, button).catch(() => {}));
      action.append(button);
    }
    return h("tr", {"data-testid": "version-row", "data-version": String(version.version),
      "data-status": version.status}, cells, action);
  }

  async function refresh() {
    clearTimeout(timer);
    if (stopped) return;
    const {versions} = await api(`${base}/versions`, {quiet: [404]});
    body.replaceChildren(...versions.map(row));
    // NB: the classifier's own events follow production; a version training beside it is polled
    if (versions.some((v) => ACTIVE.has(v.status) || (v.version > 1 && v.status === "ready" && !v.promotion))) {
      timer = setTimeout(() => refresh().catch(() => {}), POLL_MS);
    }
  }

  if (ctx.can.create()) element.append(addForm(base, () => refresh()));
  refresh().catch(() => {});
  return {
    element,
    refresh: () => refresh().catch(() => {}),
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

function addForm(base, onAdded) {
  let dataset = null; // {kind: "folder", entries, root} | {kind: "zip", file}
  const folderInput = h("input", {type: "file", id: uid("version-folder"), class: "file-input",
    webkitdirectory: true, multiple: true, "data-testid": "version-dataset-input"});
  const zipInput = h("input", {type: "file", id: uid("version-zip"), class: "file-input",
    accept: ".zip,application/zip", "data-testid": "version-zip-input"});
  const chosen = h("p", {class: "chosen", "aria-live": "polite"}, h("span", {class: "muted"},
    "No images chosen: the new version retrains production's."));
  const promote = h("select", {id: uid("promote"), "data-testid": "promote-select"},
    h("option", {value: "if_better"}, "if it is better"),
    h("option", {value: "always"}, "always"),
    h("option", {value: "never"}, "never (I move it myself)"));
  const button = h("button", {type: "submit", class: "primary", "data-testid": "add-version-button"},
    "Train a new version");
  const status = h("span", {class: "muted", "aria-live": "polite"});

  folderInput.addEventListener("change", () => {
    zipInput.value = "";
    const items = [...folderInput.files].map((file) => ({path: file.webkitRelativePath || file.name, file}));
    dataset = items.length ? {kind: "folder", ...folderEntries(items)} : null;
    chosen.textContent = dataset ? `${dataset.entries.length} files from ${dataset.root || "a folder"}` : "";
  });
  zipInput.addEventListener("change", () => {
    folderInput.value = "";
    dataset = zipInput.files[0] ? {kind: "zip", file: zipInput.files[0]} : null;
    chosen.textContent = dataset ? dataset.file.name : "";
  });

  const form = h("form", {class: "add-version", novalidate: true, "aria-label": "Add images as a new version"},
    h("h3", {}, "Add images"),
    h("p", {class: "muted"}, "Label folders as when you created it; new labels are welcome. ",
      "They join production's images in a new version."),
    h("div", {class: "actions"},
      folderInput, h("label", {for: folderInput.id, class: "button primary-outline"}, "Choose a folder"),
      zipInput, h("label", {for: zipInput.id, class: "button secondary"}, "Choose a .zip")),
    chosen,
    h("div", {class: "field"}, h("label", {for: promote.id}, "Make it production"), promote),
    h("div", {class: "actions"}, button, status));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      const body = new FormData();
      if (dataset) {
        const archive = dataset.kind === "zip" ? dataset.file
          : await zipFiles(dataset.entries, (done, total) => { status.textContent = `Packing ${done} of ${total} files…`; });
        body.append("dataset", archive, dataset.kind === "zip" ? dataset.file.name : "images.zip");
      }
      body.append("options", JSON.stringify({promote: promote.value}));
      const {body: version} = await upload(`${base}/versions`, body, (sent, total) => {
        status.textContent = sent < total ? `Uploading ${sent} of ${total} bytes…` : "Checking the images…";
      });
      status.textContent = `Version ${version.version} is queued.`;
      onAdded();
    } catch (error) {
      if (!(error instanceof ApiError)) showError(error);
      status.textContent = "";
    } finally {
      button.disabled = false;
    }
  });
  return form;
}
