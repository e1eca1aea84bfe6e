// The create panel of the list view: a folder (picked or dropped; zipped here in the browser) or
// a .zip, an optional name and training options, then an upload with progress.

import {ApiError, showError, upload} from "./api.js";
import {bytes, h, uid} from "./dom.js";
import {zipFiles} from "./zip.js";

const IMAGE = /\.(jpe?g|png|gif|bmp|webp)$/i;
const HIDDEN = (part) => part.startsWith(".") || part === "__MACOSX";

/** [{path, file}] from a picked or dropped folder → zip entries, without the picked folder's
 * own name when everything is inside it, and without hidden files. */
export function folderEntries(items) {
  const visible = items.filter(({path}) => !path.split("/").some(HIDDEN));
  const roots = new Set(visible.map(({path}) => path.split("/")[0]));
  const strip = roots.size === 1 && visible.every(({path}) => path.includes("/"));
  return {
    root: strip ? [...roots][0] : null,
    entries: visible.map(({path, file}) => ({name: strip ? path.slice(path.indexOf("/") + 1) : path, file})),
  };
}

/** What the server will see: labels (top folders, under one wrapping folder if there is one). */
export function summarise(entries) {
  const parts = entries.map(({name}) => name.split("/"));
  const tops = new Set(parts.map((p) => p[0]));
  const wrapped = tops.size === 1 && parts.every((p) => p.length >= 3);
  const perLabel = new Map();
  let images = 0;
  let other = 0;
  for (const p of parts) {
    const inLabel = wrapped ? p.length >= 3 : p.length >= 2;
    if (!inLabel || !IMAGE.test(p[p.length - 1])) {
      other += 1;
      continue;
    }
    const label = wrapped ? p[1] : p[0];
    perLabel.set(label, (perLabel.get(label) || 0) + 1);
    images += 1;
  }
  return {perLabel, images, other, bytes: entries.reduce((sum, {file}) => sum + file.size, 0)};
}

async function droppedItems(dataTransfer) {
  const roots = [...dataTransfer.items].filter((item) => item.kind === "file")
    .map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (roots.length === 1 && roots[0].isFile && /\.zip$/i.test(roots[0].name)) {
    return {zip: dataTransfer.files[0]};
  }
  const items = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      items.push({path: prefix + entry.name, file: await new Promise((ok, no) => entry.file(ok, no))});
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, no) => reader.readEntries(ok, no));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  }
  for (const root of roots) await walk(root, "");
  return {items};
}

function fileButton(input, text, cls) {
  return [input, h("label", {for: input.id, class: `button ${cls}`}, text)];
}

export function panel(ctx) {
  let dataset = null; // {kind: "folder", entries, root} | {kind: "zip", file}
  const folderInput = h("input", {type: "file", id: uid("dataset"), class: "file-input",
    webkitdirectory: true, multiple: true, "data-testid": "dataset-input"});
  const zipInput = h("input", {type: "file", id: uid("zip"), class: "file-input",
    accept: ".zip,application/zip", "data-testid": "zip-input"});
  const chosen = h("div", {class: "chosen", id: uid("chosen"), "aria-live": "polite"},
    h("span", {class: "muted"}, "Nothing chosen yet."));
  const datasetError = h("p", {class: "field-error", id: uid("dataset-error")});
  const nameInput = h("input", {type: "text", id: uid("name"), name: "name", maxlength: "200",
    autocomplete: "off", placeholder: "default: its labels, e.g. cats-vs-dogs"});
  const optionsInput = h("textarea", {id: uid("options"), name: "options", rows: "4", spellcheck: "false",
    "data-testid": "options-input", placeholder: '{"max_epochs": 50, "augmentation": {"views": 4}}'});
  const optionsError = h("p", {class: "field-error", id: uid("options-error")});
  optionsInput.setAttribute("aria-describedby", `${optionsError.id} options-help`);
  const createButton = h("button", {type: "submit", class: "primary", "data-testid": "create-button"},
    "Create classifier");
  const progress = h("progress", {max: "1", value: "0", hidden: true, "data-testid": "upload-progress",
    "aria-label": "Upload progress"});
  const progressText = h("span", {class: "muted", "aria-live": "polite"});
  const drop = h("div", {class: "dropzone", "data-testid": "dataset-drop"},
    h("p", {class: "dropzone-title"}, "Drop a folder of labelled photos here"),
    h("p", {class: "muted"}, "One subfolder per label (", h("code", {}, "cats/"), ", ", h("code", {}, "dogs/"),
      " …), at least 2 labels with 2 images each. Or drop a .zip with the same layout."),
    h("div", {class: "actions"}, fileButton(folderInput, "Choose a folder", "primary-outline"),
      fileButton(zipInput, "Choose a .zip", "secondary")),
    chosen, datasetError);

  function choose(next) {
    dataset = next;
    datasetError.textContent = "";
    if (!next) {
      chosen.replaceChildren(h("span", {class: "muted"}, "Nothing chosen yet."));
      return;
    }
    if (next.kind === "zip") {
      chosen.replaceChildren(h("strong", {}, next.file.name), ` (${bytes(next.file.size)})`);
      return;
    }
    const {perLabel, images, other, bytes: size} = summarise(next.entries);
    const labels = [...perLabel.entries()].sort(([a], [b]) => a.localeCompare(b));
    chosen.replaceChildren(
      h("div", {}, h("strong", {}, next.root || "Folder"), ": ",
        `${images} image${images === 1 ? "" : "s"} in ${labels.length} label${labels.length === 1 ? "" : "s"}`,
        ` (${bytes(size)})`),
      h("ul", {class: "chips"}, labels.map(([label, n]) => h("li", {}, `${label} · ${n}`))),
      other ? h("p", {class: "muted small"}, `${other} other file${other === 1 ? "" : "s"}: the server checks `,
        "them and lists what it cannot read.") : null,
      labels.length < 2 ? h("p", {class: "warning"}, "A classifier needs at least 2 label folders.") : null);
  }

  folderInput.addEventListener("change", () => {
    zipInput.value = "";
    const items = [...folderInput.files].map((file) => ({path: file.webkitRelativePath || file.name, file}));
    choose(items.length ? {kind: "folder", ...folderEntries(items)} : null);
  });
  zipInput.addEventListener("change", () => {
    folderInput.value = "";
    choose(zipInput.files[0] ? {kind: "zip", file: zipInput.files[0]} : null);
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const {zip, items} = await droppedItems(event.dataTransfer);
    if (zip) choose({kind: "zip", file: zip});
    else if (items.length) choose({kind: "folder", ...folderEntries(items)});
  });

  function options() {
    optionsError.textContent = "";
    optionsInput.removeAttribute("aria-invalid");
    let parsed = {};
    const raw = optionsInput.value.trim();
    if (raw) {
      try {
        parsed = JSON.parse(raw);
      } catch (error) {
        parsed = null;
        optionsError.textContent = `Not valid JSON: ${error.message}`;
      }
      if (parsed !== null && (typeof parsed !== "object" || Array.isArray(parsed))) {
        parsed = null;
        optionsError.textContent = 'Options are a JSON object, e.g. {"max_epochs": 50}.';
      }
    }
    if (parsed === null) {
      optionsInput.setAttribute("aria-invalid", "true");
      details.open = true;
      optionsInput.focus();
      return null;
    }
    const name = nameInput.value.trim();
    if (name && parsed.name === undefined) parsed.name = name;
    return parsed;
  }

  const details = h("details", {class: "options"},
    h("summary", {}, "Training options (optional)"),
    h("label", {for: optionsInput.id}, "Options as JSON"),
    optionsInput, optionsError,
    h("p", {id: "options-help", class: "hint"}, "Every field is optional: ",
      h("code", {}, "max_epochs"), ", ", h("code", {}, "patience"), ", ", h("code", {}, "validation_split"), ", ",
      h("code", {}, "augmentation"), " {", h("code", {}, "views"), ", ", h("code", {}, "flip"), ", ",
      h("code", {}, "rotation"), " …}, ", h("code", {}, "head"), ". The ",
      h("a", {href: "docs"}, "API docs"), " list them all (TrainingOptions)."));

  const form = h("form", {class: "card create", "aria-labelledby": "create-title", novalidate: true},
    h("h2", {id: "create-title"}, "New classifier"),
    drop,
    h("div", {class: "field"}, h("label", {for: nameInput.id}, "Name ", h("span", {class: "muted"}, "(optional)")),
      nameInput),
    details,
    h("div", {class: "actions"}, createButton, progress, progressText));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!dataset) {
      datasetError.textContent = "Choose a folder or a .zip first.";
      folderInput.focus();
      return;
    }
    const chosenOptions = options();
    if (chosenOptions === null) return;
    createButton.disabled = true;
    progress.hidden = false;
    progress.removeAttribute("value");
    try {
      let archive = dataset.file;
      if (dataset.kind === "folder") {
        archive = await zipFiles(dataset.entries, (done, total) => {
          progressText.textContent = `Packing ${done} of ${total} files…`;
        });
      }
      const body = new FormData();
      body.append("dataset", archive, dataset.kind === "zip" ? dataset.file.name : `${dataset.root || "dataset"}.zip`);
      if (Object.keys(chosenOptions).length) body.append("options", JSON.stringify(chosenOptions));
      const {body: classifier} = await upload("v1/classifiers", body, (sent, total) => {
        progress.max = total;
        progress.value = sent;
        progressText.textContent = sent < total ? `Uploading ${bytes(sent)} of ${bytes(total)}…`
          : "Checking the images…";
      });
      ctx.navigate(`#/classifiers/${encodeURIComponent(classifier.id)}`);
    } catch (error) {
      if (!(error instanceof ApiError)) showError(error); // the zip writer's own errors
      progress.hidden = true;
      progressText.textContent = "";
      createButton.disabled = false;
    }
  });
  return form;
}
