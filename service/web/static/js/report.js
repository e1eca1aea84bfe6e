// The training report: m, d, d/m and the diagnosis in words, learning curves, the confusion
// matrix, per-label scores, dataset health, skipped files, timings and the backbone. Fields a
// newer server adds (fine_tuned, calibration, health, final) are shown when present.

import {download, downloadExport, showMessage} from "./api.js";
import {confusionMatrix, learningCurves} from "./charts.js";
import {facts, h, number, percent, stageName} from "./dom.js";

function table(caption, columns, rows, attrs = {}) {
  return h("div", {class: "table-scroll", tabindex: "0", role: "region", "aria-label": caption},
    h("table", {class: "data", ...attrs},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, columns.map(([name, cls]) => h("th", {scope: "col", class: cls}, name)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell, i) =>
        i === 0 ? h("th", {scope: "row"}, cell) : h("td", {class: columns[i][1]}, cell)))))));
}

function loss(value) {
  if (!Number.isFinite(value)) return "—";
  return value !== 0 && Math.abs(value) < 1e-3 ? value.toExponential(1) : number(value, 4);
}

function section(title, ...children) {
  return h("section", {class: "card"}, h("h3", {}, title), ...children);
}

function plain(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return number(value, 4);
  if (typeof value === "object") return h("code", {class: "json"}, JSON.stringify(value));
  return String(value);
}

/** Rows of objects (health entries and the like) as a table of their keys. */
function objects(caption, items) {
  const keys = [...new Set(items.flatMap((item) => Object.keys(item)))];
  return table(caption, keys.map((key) => [key.replaceAll("_", " ")]),
    items.map((item) => keys.map((key) => plain(item[key]))));
}

function diagnosis(report) {
  return h("section", {class: "card diagnosis", "data-testid": "diagnosis", "aria-labelledby": "diagnosis-title"},
    h("h3", {id: "diagnosis-title"}, "Diagnosis"),
    h("div", {class: "ratio"},
      h("div", {class: "ratio-value"},
        h("span", {class: "ratio-name"}, "d/m"), h("strong", {}, number(report.d_over_m, 2))),
      h("p", {}, h("strong", {}, `d = ${number(report.d)}`),
        report.fine_tuned ? " trainable parameters in the head and the fine-tuned blocks, "
          : " trainable parameters in the head, ",
        h("strong", {}, `m = ${number(report.m?.train_after_augmentation)}`), " training examples after augmentation (",
        `${number(report.m?.train)} images). `,
        "The smaller d/m, the less room the head has to memorise its training images instead of learning the labels.")),
    report.diagnosis?.length
      ? h("ul", {class: "diagnosis-list"}, report.diagnosis.map((line) => h("li", {}, line)))
      : h("p", {}, "Nothing to flag: the head is small for its data and validation agrees with training."));
}

function perLabel(report) {
  const scores = report.validation?.per_label || {};
  const counts = report.m?.per_label || {};
  return table("Per label: images in each split and validation precision, recall and F1",
    [["Label"], ["m train", "num"], ["m validation", "num"], ["Precision", "num"], ["Recall", "num"], ["F1", "num"]],
    report.labels.map((label) => [label, number(counts[label]?.train), number(counts[label]?.validation),
      percent(scores[label]?.precision), percent(scores[label]?.recall), percent(scores[label]?.f1)]),
    {"data-testid": "per-label"});
}

function paths(list) {
  return h("span", {class: "paths"}, (list || []).map((path, i) => [i ? ", " : "", h("code", {}, path)]));
}

function leakage(entry) {
  if (entry.across_split) return "yes: in training and validation";
  return entry.conflicting_labels ? "no, but under different labels" : "no";
}

function health(report) {
  const found = report.health;
  if (!found) return null;
  const parts = [];
  if (found.warnings?.length) {
    parts.push(h("ul", {class: "warnings", "data-testid": "health-warnings"}, found.warnings.map((w) => h("li", {}, w))));
  }
  if (found.duplicates?.length) {
    parts.push(table("Duplicates: files with the same bytes", [["Files"], ["Labels"], ["Leakage"]],
      found.duplicates.map((d) => [paths(d.paths), d.labels.join(", "), leakage(d)]),
      {"data-testid": "health-duplicates"}));
  }
  if (found.near_duplicates?.length) {
    parts.push(table("Near duplicates: nearly the same picture", [["Files"], ["Labels"], ["Similarity", "num"], ["Leakage"]],
      found.near_duplicates.map((d) => [paths(d.paths), d.labels.join(", "), number(d.similarity, 3), leakage(d)]),
      {"data-testid": "health-near-duplicates"}));
  }
  if (found.suspected_mislabels?.length) {
    parts.push(table("Suspected mislabels: the classifier, not trained on them, disagrees with their folder",
      [["File"], ["In folder"], ["Looks like"], ["Confidence", "num"]],
      found.suspected_mislabels.map((m) => [h("code", {}, m.path), m.given, m.predicted, percent(m.confidence)]),
      {"data-testid": "health-mislabels"}));
  }
  const balance = found.imbalance;
  if (balance?.per_label) {
    parts.push(facts([["Images per label", Object.entries(balance.per_label).map(([label, n]) => `${label} ${number(n)}`).join(", ")],
      ["Largest / smallest", balance.ratio == null ? "a label has no images" : `${number(balance.ratio, 2)}×`]],
    {"data-testid": "health-imbalance"}));
  }
  if (!found.duplicates?.length && !found.near_duplicates?.length && !found.suspected_mislabels?.length) {
    parts.push(h("p", {}, "No duplicates, leaks or suspected mislabels found."));
  }
  return h("section", {class: "card", "data-testid": "health", "aria-labelledby": "health-title"},
    h("h3", {id: "health-title"}, "Dataset health"), ...parts);
}

const REJECTION = {below_threshold: "below the threshold", out_of_distribution: "unlike the training images"};

function calibration(report) {
  const c = report.calibration;
  if (!c) return null;
  const ood = report.ood || {};
  const rejection = report.rejection || {};
  return h("section", {class: "card", "data-testid": "calibration", "aria-labelledby": "calibration-title"},
    h("h3", {id: "calibration-title"}, "Calibrated scores and rejection"),
    facts([["Temperature", number(c.temperature, 3)],
      ["Log loss before → after", c.nll_before == null ? "—" : `${number(c.nll_before, 3)} → ${number(c.nll_after, 3)}`],
      ["Expected calibration error before → after", `${percent(c.ece_before)} → ${percent(c.ece_after)}`],
      ["Default threshold", report.threshold == null ? "—" : number(report.threshold, 3)],
      rejection.target_precision != null ? ["Chosen for precision", `${percent(rejection.target_precision)} (out of fold: ${percent(rejection.validation_precision)}, answering ${percent(rejection.validation_coverage)})`] : null,
      ["Out-of-distribution check", ood.enabled ? `${ood.method}, rejects images ${REJECTION.out_of_distribution}` : "off"]]),
    h("p", {class: "muted small"}, "Scores are the head's logits divided by the temperature, fitted on the out-of-fold scores: ",
      `it minimises their log loss (with a prior that keeps it near 1 on few images); the calibration error, a coarser measure over ${c.images ?? "these"} images, may move either way. `,
      `A prediction ${REJECTION.below_threshold} or ${REJECTION.out_of_distribution} answers "not recognised".`));
}

function fineTuned(report) {
  const f = report.fine_tuned;
  if (f === undefined) return null;
  const why = report.fine_tuning?.reason;
  if (f === null) return section("Fine-tuning", h("p", {}, "Not fine-tuned: the backbone stayed frozen."),
    why ? h("p", {class: "muted small", "data-testid": "fine-tuning-why"}, `Why: ${why}.`) : null);
  return section("Fine-tuning",
    facts([["Blocks trained", plain(f.blocks)], ["L2-SP α", plain(f.l2_sp)]]),
    f.relative_shift ? table("How far each trained layer moved from its ImageNet weights (‖w − w⁰‖ / ‖w⁰‖)",
      [["Layer"], ["Relative shift", "num"]],
      Object.entries(f.relative_shift).map(([layer, shift]) => [layer, number(shift, 4)])) : null);
}

function skipped(classifier) {
  const files = classifier?.dataset?.skipped || [];
  return section("Skipped files", files.length
    ? table(`${files.length} file${files.length === 1 ? "" : "s"} in the upload could not be used`,
      [["File"], ["Reason"]], files.map((file) => [h("code", {}, file.path), file.reason]))
    : h("p", {}, "None: every file in the upload was used."));
}

function details(report) {
  const timings = Object.entries(report.timings_s || {});
  const backbone = report.backbone || {};
  return section("Run details",
    facts([
      ["Epochs", `${report.history?.length ?? "—"} run by most folds, best ${report.best_epoch ?? "—"}${report.stopped_early ? ", stopped early" : ""}`],
      ["Head", report.head ? `${report.head.hidden_units ? `${report.head.hidden_units} hidden units` : "linear"}, dropout ${report.head.dropout}, L2 ${report.head.l2}` : "—"],
      ["Backbone", `${backbone.name ?? "—"} (${backbone.weights ?? "—"}), ${backbone.image_size ?? "—"} px`],
      backbone.features ? ["Features", h("code", {}, backbone.features)] : null,
      backbone.fingerprint ? ["Backbone fingerprint", h("code", {class: "wrap"}, backbone.fingerprint)] : null,
      report.device ? ["Device", `${report.device}${report.precision ? `, ${report.precision}` : ""}`] : null,
      report.features ? ["Backbone passes", `${number(report.features.computed)} (image, view) features computed, ${number(report.features.from_cache)} read from the classifier's cache${report.features.note ? ` (${report.features.note})` : ""}`] : null,
      ...timings.map(([stage, seconds]) => [`Time: ${stage}`, `${number(seconds, 2)} s`]),
    ]),
    report.stages?.length ? table("Training stages (a later stage is served only when its validation loss is lower)",
      [["Stage"], ["Validation loss", "num"], ["Validation accuracy", "num"], ["Ready after", "num"], ["Served"]],
      report.stages.map((s) => [stageName(s.stage), loss(s.val_loss), percent(s.val_accuracy),
        `${number(s.elapsed_s, 1)} s`, s.stage === report.stage ? "✓ now" : (s.served ? "until replaced" : "")])) : null,
    report.selection?.candidates?.length ? table(
      `Heads cross-validated (${report.selection.k} folds; the lowest loss along each L2 path, then the smallest within one standard error of the best, trained on augmented views only where they beat the originals alone by more than a paired standard error; refitted on every image)`,
      [["Head"], ["Trained on"], ["d", "num"], ["Validation loss (mean ± SE)", "num"], ["Validation accuracy (mean)", "num"], ["Best epoch", "num"], ["Chosen"]],
      report.selection.candidates.map((c, i) => [c.head.hidden_units ? `${c.head.hidden_units} hidden, L2 ${c.head.l2}` : `linear, L2 ${c.head.l2}`,
        c.trained_on === "original" ? "originals only" : "augmented views", number(c.d), `${loss(c.val_loss_mean)} ± ${loss(c.val_loss_se)}`, percent(c.val_accuracy_mean), number(c.best_epoch),
        i === report.selection.chosen ? "✓" : ""])) : null,
    augmentationVerdict(report.selection?.augmentation
      ?? report.stages?.find((s) => s.augmentation)?.augmentation),
    report.candidates?.length ? table("Head candidates tried (the lowest validation loss is served)",
      [["Head"], ["d", "num"], ["Best validation loss", "num"], ["Best epoch", "num"], ["Epochs", "num"]],
      report.candidates.map((c) => [c.head ? (c.head.hidden_units ? `${c.head.hidden_units} hidden, L2 ${c.head.l2}` : `linear, L2 ${c.head.l2}`) : "—",
        number(c.d), loss(c.best_val_loss), number(c.best_epoch), number(c.epochs)])) : null,
    h("details", {}, h("summary", {}, "Options used"), h("pre", {class: "json"}, JSON.stringify(report.options, null, 2))));
}

function augmentationVerdict(a) {
  if (!a) return null;
  const gain = `${a.gain >= 0 ? "lowered" : "raised"} the validation loss per image by ${loss(Math.abs(a.gain))} (standard error ${loss(a.gain_se)})`;
  return h("p", {class: "muted small", "data-testid": "augmentation-verdict"}, a.earned
    ? `Augmented views ${gain} against the same head trained on the original images only, so the head trained on them is served.`
    : `Augmented views ${gain} against the same head trained on the original images only: not more than a standard error, so the head trained on the originals (the linear probe) is served.`);
}

function exportControls(report, base) {
  const format = h("select", {"aria-label": "Export format", "data-testid": "export-format"},
    h("option", {value: "savedmodel"}, "SavedModel (TensorFlow)"),
    h("option", {value: "tflite"}, "TFLite"),
    h("option", {value: "onnx"}, "ONNX"));
  const button = h("button", {type: "button", class: "secondary small", "data-testid": "export-button"},
    "Export model");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await downloadExport(`${base}/export?format=${format.value}`,
        `${report.classifier_id}-${format.value}.zip`,
        (seconds) => showMessage("Building the export", `checking again in ${seconds} s…`));
    } finally {
      button.disabled = false;
    }
  });
  return [format, button];
}

export function render(report, classifier, {base, canExport = false}) {
  const validation = report.validation || {};
  const saveCurves = h("button", {type: "button", class: "secondary small"}, "Curves (SVG)");
  const saveMatrix = h("button", {type: "button", class: "secondary small"}, "Confusion matrix (SVG)");
  const saveJson = h("button", {type: "button", class: "secondary small"}, "Report (JSON)");
  saveCurves.addEventListener("click", () => download(`${base}/report/curves.svg`, `${report.classifier_id}-curves.svg`));
  saveMatrix.addEventListener("click", () => download(`${base}/report/confusion.svg`, `${report.classifier_id}-confusion.svg`));
  saveJson.addEventListener("click", () => download(`${base}/report`, `${report.classifier_id}-report.json`));

  return h("div", {class: "report-body"},
    h("div", {class: "section-head"}, h("h2", {id: "report-title"}, "Training report"),
      report.final === false ? h("span", {class: "badge badge-training badge-wrap", "data-testid": "report-preliminary"},
        `preliminary (${stageName(report.stage)} stage): a better head may still replace it`) : null,
      h("div", {class: "actions", role: "group", "aria-label": "Download"}, h("span", {class: "muted small"}, "Download:"),
        saveCurves, saveMatrix, saveJson, ...(canExport ? exportControls(report, base) : []))),
    h("div", {class: "stats"},
      stat("Validation accuracy", percent(validation.accuracy)),
      stat("Training accuracy", percent(report.train_accuracy)),
      stat("Images (train / validation)", `${number(report.m?.train)} / ${number(report.m?.validation)}`),
      stat("Best epoch", `${number(report.best_epoch)} of ${number(report.history?.length)}`)),
    diagnosis(report),
    section("Learning curves", learningCurves(report.history || [], {best: report.best_epoch,
      note: report.stopped_early ? "Early stopping ended the run; the head from the best epoch is served." : null})),
    h("div", {class: "two"},
      section("Confusion matrix", confusionMatrix(report.labels, validation.confusion_matrix || [])),
      section("Per label", perLabel(report))),
    health(report), calibration(report), fineTuned(report),
    skipped(classifier),
    details(report));
}

function stat(label, value) {
  return h("div", {class: "stat"}, h("div", {class: "stat-value"}, value), h("div", {class: "stat-label"}, label));
}
