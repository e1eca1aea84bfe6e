// "Try it": drop, pick or paste an image, see the top labels with their calibrated scores. A
// prediction the classifier refuses (below its threshold, or unlike its training images) shows as
// "Not recognised" with the reason, and still lists its top labels. An optional threshold
// overrides the classifier's default for the request (?threshold=).

import {api} from "./api.js";
import {h, percent, uid} from "./dom.js";

function bars(topK) {
  return h("ol", {class: "bars", "aria-label": "Top labels"}, topK.map(({label, score}) => {
    const fill = h("span", {class: "bar-fill"});
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`; // CSSOM: allowed by the CSP
    return h("li", {"data-testid": "prediction", "data-label": label, "data-score": String(score)},
      h("span", {class: "bar-label"}, label),
      h("span", {class: "bar-track", "aria-hidden": "true"}, fill),
      h("span", {class: "bar-score"}, percent(score)));
  }));
}

/** What a rejection's machine-readable reason means, in words. */
const REASONS = {
  below_threshold: "its top score is below the threshold",
  out_of_distribution: "it is unlike every training image",
};

export function result(prediction) {
  const rejected = prediction.rejected === true || prediction.label === null;
  const reason = prediction.reason;
  const headline = rejected
    ? h("p", {class: "verdict unknown", "data-testid": "verdict", "data-reason": reason || ""},
      h("strong", {}, "Not recognised"),
      `: ${reason ? `${reason} (${REASONS[reason] || "rejected"})` : "rejected"}`)
    : h("p", {class: "verdict", "data-testid": "verdict"}, h("strong", {}, prediction.label),
      ` · ${percent(prediction.score)}`);
  return [headline, bars(prediction.top_k || [])];
}

export function mount(section, classifier) {
  const input = h("input", {type: "file", id: uid("try"), class: "file-input", accept: "image/*",
    "data-testid": "try-input"});
  const preview = h("img", {class: "preview", alt: "", hidden: true});
  const threshold = h("input", {type: "number", id: uid("threshold"), min: "0", max: "1",
    step: "0.01", inputmode: "decimal", class: "threshold-input", "data-testid": "threshold-input",
    placeholder: classifier.threshold != null ? String(classifier.threshold) : "default"});
  const output = h("div", {class: "try-result", "aria-live": "polite"},
    h("p", {class: "muted"}, "The top labels and their scores appear here."));
  const zone = h("div", {class: "dropzone try-zone"},
    h("p", {class: "dropzone-title"}, "Drop an image here, paste one, or"),
    h("div", {class: "actions"}, input, h("label", {for: input.id, class: "button primary-outline"}, "Choose an image")),
    h("div", {class: "field inline"}, h("label", {for: threshold.id}, "Threshold (0–1, optional)"), threshold));
  let previewUrl = null;

  async function classify(file) {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `The image sent: ${file.name || "pasted image"}`;
    preview.hidden = false;
    output.setAttribute("aria-busy", "true");
    output.replaceChildren(h("p", {class: "muted"}, "Classifying…"));
    const body = new FormData();
    body.append("image", file, file.name || "pasted.png");
    try {
      const query = threshold.value.trim() ? `&threshold=${encodeURIComponent(threshold.value.trim())}` : "";
      const answer = await api(`v1/classifiers/${encodeURIComponent(classifier.id)}/predict?top_k=5${query}`,
        {method: "POST", body});
      output.replaceChildren(...result(answer.predictions[0]));
    } catch (error) {
      output.replaceChildren(h("p", {class: "field-error"}, error.message));
    } finally {
      output.setAttribute("aria-busy", "false");
    }
  }

  input.addEventListener("change", () => classify(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    classify([...event.dataTransfer.files].find((file) => file.type.startsWith("image/")));
  });
  const onPaste = (event) => {
    if (!section.isConnected) {
      document.removeEventListener("paste", onPaste);
      return;
    }
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      classify(file);
    }
  };
  document.addEventListener("paste", onPaste);

  section.append(h("h2", {id: "try-title"}, "Try it"),
    h("p", {class: "muted"}, `Send an image and see which of ${classifier.labels.length} labels it gets.`),
    h("div", {class: "try"}, zone, h("div", {class: "try-output"}, preview, output)));
}
