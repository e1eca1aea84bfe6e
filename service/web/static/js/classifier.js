// One classifier (#/classifiers/{id}): its status, live progress and learning curves while it
// trains, then "try it" and the training report; delete behind a confirmation.

import {api, showMessage} from "./api.js";
import {learningCurves} from "./charts.js";
import {h, number, refiningNote, statusBadge, uid, when} from "./dom.js";
import {follow} from "./live.js";
import * as reportView from "./report.js";
import * as tryView from "./try.js";
import * as versionsView from "./versions.js";

const STAGES = {
  queued: "Waiting for a training worker",
  extracting: "Extracting features with the backbone",
  training: "Training the head",
  preview: "Training a first head",
  augmented: "Training on augmented images",
  fine_tuned: "Fine-tuning the deepest blocks",
  fine_tuning: "Fine-tuning the deepest blocks",
};

function stageText(progress, status) {
  const stage = progress?.stage || status;
  const parts = [STAGES[stage] || stage];
  if (progress?.training_stage) parts.unshift(STAGES[progress.training_stage] || progress.training_stage);
  if (Number.isFinite(progress?.images_total) && progress.images_total > 0) {
    parts.push(`${number(progress.images_done ?? 0)} of ${number(progress.images_total)} images`);
  }
  if (Number.isFinite(progress?.epoch)) {
    const of = Number.isFinite(progress.max_epochs) ? ` of ${progress.max_epochs}` : "";
    parts.push(`epoch ${progress.epoch}${of}`);
  }
  if (progress?.candidate) parts.push(`head candidate ${progress.candidate}`);
  const accuracy = progress?.val_accuracy ?? progress?.metrics?.val_accuracy;
  if (Number.isFinite(accuracy)) parts.push(`validation accuracy ${Math.round(accuracy * 100)} %`);
  return parts.join(" · ");
}

function confirmDialog({title, text, confirm}) {
  return new Promise((resolve) => {
    const titleId = uid("dialog-title");
    const textId = uid("dialog-text");
    const cancelButton = h("button", {type: "button", class: "secondary"}, "Cancel");
    const confirmButton = h("button", {type: "button", class: "danger", "data-testid": "confirm-delete"}, confirm);
    const dialog = h("dialog", {class: "dialog", "aria-labelledby": titleId, "aria-describedby": textId},
      h("h2", {id: titleId}, title), h("p", {id: textId}, text),
      h("div", {class: "actions end"}, cancelButton, confirmButton));
    cancelButton.addEventListener("click", () => dialog.close("cancel"));
    confirmButton.addEventListener("click", () => dialog.close("confirm"));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "confirm");
    });
    document.body.append(dialog);
    dialog.showModal();
    cancelButton.focus(); // the safe choice is the default one
  });
}

export function mount(root, ctx) {
  const {id} = ctx.params;
  const base = `v1/classifiers/${encodeURIComponent(id)}`;
  let classifier = null;
  let live = []; // history rows seen while training: [{epoch, loss?, accuracy?, val_loss?, val_accuracy}]
  let candidate = null;
  let reportLoaded = null; // what the report shown was loaded for
  let versions = null; // the versions section, once the first version is ready
  let stop = () => {};

  const title = h("h1", {}, "Classifier");
  const badge = h("span", {});
  const meta = h("div", {class: "meta"});
  const actions = h("div", {class: "actions"});
  const liveSection = h("section", {class: "card", "aria-labelledby": "live-title", hidden: true});
  const problem = h("section", {class: "card problem", hidden: true, role: "alert"});
  const trySection = h("section", {class: "card", "aria-labelledby": "try-title", hidden: true});
  const reportSection = h("section", {class: "report", "aria-labelledby": "report-title", hidden: true});
  const versionsBox = h("div", {});
  const stage = h("p", {id: uid("stage"), class: "stage"});
  const bar = h("progress", {"data-testid": "progress", max: "1"});
  bar.setAttribute("aria-labelledby", stage.id);
  const curveBox = h("div", {});
  const labelsBox = h("div", {class: "live-labels"});
  liveSection.append(h("h2", {id: "live-title"}, "Training"), stage, bar, curveBox, labelsBox,
    h("p", {class: "live-note"}, "Headstart decodes every image, runs the backbone once per image and augmented view, ",
      "then trains small heads on the cached features and keeps the best on the validation images. ",
      "The report and “Try it” appear here when it is done; you can leave this page meanwhile."));

  if (ctx.can.delete()) {
    const deleteButton = h("button", {type: "button", class: "danger-outline", "data-testid": "delete-button"},
      "Delete");
    deleteButton.addEventListener("click", async () => {
      const name = classifier?.name || id;
      const sure = await confirmDialog({title: `Delete “${name}”?`, confirm: "Delete classifier",
        text: "This deletes the classifier with its dataset, heads and report, and stops its training "
          + "if it is still running. It cannot be undone."});
      if (!sure) {
        deleteButton.focus();
        return;
      }
      await api(base, {method: "DELETE"});
      showMessage(`Deleted “${name}”.`);
      ctx.navigate("#/");
    });
    actions.append(deleteButton);
  }

  root.append(
    h("p", {class: "back"}, h("a", {href: "#/"}, "← All classifiers")),
    h("div", {class: "page-head"}, h("div", {}, h("div", {class: "title-row"}, title, badge), meta), actions),
    problem, liveSection, trySection, versionsBox, reportSection);

  function drawLive() {
    const note = candidate ? `Head candidate ${candidate}` : null;
    // NB: the axis grows with the run (up to max_epochs): early stopping usually ends it long
    // before max_epochs, and a curve squeezed into the left edge says nothing.
    const seen = live.length ? live[live.length - 1].epoch : 1;
    const maxEpochs = Math.min(classifier?.progress?.max_epochs || Infinity, Math.max(10, Math.ceil(seen * 1.5)));
    curveBox.replaceChildren(live.length && !reportLoaded ? learningCurves(live, {maxEpochs, note}) : []);
  }

  function addRow(row) {
    const lastEpoch = live.length ? live[live.length - 1].epoch : 0;
    if (row.epoch < lastEpoch) live = []; // a new head candidate starts over
    if (row.epoch === lastEpoch && live.length) live[live.length - 1] = {...live[live.length - 1], ...row};
    else if (row.epoch !== lastEpoch || !live.length) live.push(row);
    drawLive();
  }

  function showProgress(progress, status) {
    const busy = status === "queued" || status === "training" || Boolean(progress);
    liveSection.hidden = !busy;
    if (!busy) return;
    stage.textContent = status === "ready"
      ? `Refining (the served head stays until a better one is ready): ${stageText(progress, status)}`
      : stageText(progress, status);
    if (progress?.stage === "extracting" && progress.images_total) {
      bar.max = progress.images_total;
      bar.value = progress.images_done ?? 0;
    } else if (progress?.stage !== "extracting" && Number.isFinite(progress?.epoch) && progress.max_epochs) {
      bar.max = progress.max_epochs;
      bar.value = progress.epoch;
    } else {
      bar.removeAttribute("value"); // indeterminate: nothing to count yet
    }
  }

  function render(next) {
    const moved = classifier && classifier.version !== next.version;
    classifier = next;
    title.textContent = next.name;
    document.title = `${next.name} · Headstart`;
    badge.replaceChildren(...[statusBadge(next.status), refiningNote(next)].filter(Boolean));
    meta.replaceChildren(
      h("span", {class: "mono"}, next.id),
      h("span", {}, `${number(next.dataset?.images)} images · ${next.labels.length} labels`),
      h("span", {}, "created ", h("time", {datetime: next.created_at}, when(next.created_at))),
      next.backbone ? h("span", {}, `${next.backbone.name} (${next.backbone.weights}) at ${next.backbone.image_size} px`) : null);
    showProgress(next.progress, next.status);
    labelsBox.replaceChildren(h("ul", {class: "chips", "aria-label": "Images per label"},
      Object.entries(next.dataset?.per_label || {}).map(([label, n]) => h("li", {}, `${label} · ${n}`))));
    const progress = next.progress;
    if (progress?.stage === "training" && Number.isFinite(progress.epoch)) {
      if (progress.candidate !== candidate) {
        candidate = progress.candidate;
        live = [];
      }
      addRow({epoch: progress.epoch, val_accuracy: progress.val_accuracy});
    }
    problem.hidden = !(next.status === "failed" || next.status === "cancelled");
    if (!problem.hidden) {
      problem.replaceChildren(h("h2", {}, next.status === "failed" ? "Training failed" : "Training was cancelled"),
        next.error ? h("p", {}, h("strong", {}, next.error.title), `: ${next.error.detail}`) : null,
        h("p", {class: "muted"}, "Fix the dataset or the options and create the classifier again."));
    }
    if (next.status === "ready") {
      if (trySection.hidden) {
        trySection.hidden = false;
        tryView.mount(trySection, next);
      }
      if (!versions) {
        versions = versionsView.section(ctx, base);
        versionsBox.append(versions.element);
      } else if (moved) {
        versions.refresh();
      }
      // NB: a new key when another stage is served or the refinement ends, not per progress write
      const key = `${next.version ?? ""}|${next.stage ?? ""}|${Boolean(next.refining)}|${next.metrics?.val_loss ?? ""}`;
      if (reportLoaded !== key) loadReport(key);
    }
  }

  async function loadReport(key) {
    reportLoaded = key;
    try {
      const report = await api(`${base}/report`, {quiet: [409]});
      reportSection.hidden = false;
      reportSection.replaceChildren(reportView.render(report, classifier, {base, canExport: ctx.can.export()}));
      drawLive();
    } catch (error) {
      if (error.status === 409) reportLoaded = null; // not written yet: try on the next update
    }
  }

  stop = follow(id, {
    resource: render,
    progress: (progress) => {
      showProgress(progress, classifier?.status || "training");
      if (classifier?.refining) badge.replaceChildren(statusBadge(classifier.status), refiningNote({...classifier, progress}));
      if (progress.stage === "training" && progress.candidate && progress.candidate !== candidate) {
        candidate = progress.candidate;
        live = [];
      }
    },
    epoch: addRow,
    finished: () => {},
    missing: () => {
      stop();
      title.textContent = "Classifier not found";
      badge.replaceChildren();
      meta.replaceChildren(h("p", {}, `There is no classifier ${id}: it may have been deleted.`));
      actions.replaceChildren();
      [liveSection, trySection, reportSection].forEach((section) => { section.hidden = true; });
      versions?.stop();
      versionsBox.replaceChildren();
    },
  });

  return () => {
    stop();
    versions?.stop();
    document.title = "Headstart";
  };
}
