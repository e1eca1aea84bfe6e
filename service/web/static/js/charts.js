// Charts drawn as inline SVG (learning curves) and as a table (the confusion matrix heat map, so
// a screen reader can read every count).

import {h, s, uid} from "./dom.js";

function niceTicks(low, high, count = 5) {
  if (!(high > low)) high = low + 1;
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((v) => v >= raw);
  const ticks = [];
  for (let v = Math.floor(low / step) * step; v <= high + step * 1e-9; v += step) {
    ticks.push(Number(v.toFixed(10)));
  }
  if (ticks[ticks.length - 1] < high) ticks.push(Number((ticks[ticks.length - 1] + step).toFixed(10)));
  return ticks;
}

const W = 420;
const H = 250;
const PAD = {left: 52, right: 14, top: 30, bottom: 42};

/**
 * A line chart: series = [{name, cls, points: [[epoch, value], …]}]. yRange fixes the axis
 * (accuracy: [0, 1]); best marks an epoch. Returns an <svg role="img"> with a text summary.
 */
export function lineChart({title, series, xMax, yRange, yFormat = (v) => `${v}`, best, summary}) {
  const values = series.flatMap((line) => line.points.map(([, y]) => y)).filter(Number.isFinite);
  const range = yRange || [0, Math.max(...values, 0) || 1];
  const yTicks = niceTicks(range[0], range[1]);
  const [yLow, yHigh] = [yTicks[0], yTicks[yTicks.length - 1]];
  const maxEpoch = Math.max(2, xMax || 0, ...series.flatMap((line) => line.points.map(([x]) => x)));
  const xTicks = niceTicks(1, maxEpoch, 6).filter((t) => t >= 1 && t <= maxEpoch && Number.isInteger(t));
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const px = (x) => PAD.left + ((x - 1) / (maxEpoch - 1)) * plotW;
  const py = (y) => PAD.top + plotH - ((y - yLow) / (yHigh - yLow)) * plotH;
  const titleId = uid("chart-title");
  const descId = uid("chart-desc");

  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-labelledby": `${titleId} ${descId}`},
  s("title", {id: titleId}, title),
  s("desc", {id: descId}, summary || ""),
  s("text", {x: PAD.left, y: 16, class: "chart-title"}, title));
  for (const tick of yTicks) {
    svg.append(s("line", {x1: PAD.left, x2: W - PAD.right, y1: py(tick), y2: py(tick), class: "grid"}),
      s("text", {x: PAD.left - 6, y: py(tick) + 4, class: "tick", "text-anchor": "end"}, yFormat(tick)));
  }
  for (const tick of xTicks) {
    svg.append(s("text", {x: px(tick), y: H - PAD.bottom + 16, class: "tick", "text-anchor": "middle"}, tick));
  }
  svg.append(s("text", {x: PAD.left + plotW / 2, y: H - 8, class: "axis-label", "text-anchor": "middle"}, "epoch"),
    s("line", {x1: PAD.left, x2: W - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, class: "axis"}));
  if (best) {
    const x = px(best);
    const end = x > PAD.left + plotW * 0.75;
    svg.append(s("line", {x1: x, x2: x, y1: PAD.top, y2: PAD.top + plotH, class: "best"}),
      s("text", {x: end ? x - 4 : x + 4, y: PAD.top + 12, class: "tick", "text-anchor": end ? "end" : "start"},
        `best epoch ${best}`));
  }
  for (const line of series) {
    const points = line.points.filter(([, y]) => Number.isFinite(y));
    if (!points.length) continue;
    svg.append(s("polyline", {class: `series ${line.cls}`,
      points: points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ")}));
    if (points.length <= 25) {
      for (const [x, y] of points) svg.append(s("circle", {class: `dot ${line.cls}`, cx: px(x), cy: py(y), r: 2.6}));
    }
  }
  return svg;
}

export function legend(items) {
  return h("ul", {class: "legend", "aria-hidden": "true"},
    items.map(([name, cls]) => h("li", {}, h("span", {class: `swatch ${cls}`}), name)));
}

const last = (points) => (points.length ? points[points.length - 1][1] : undefined);
const pct = (v) => `${Math.round(v * 100)}%`;

/**
 * Loss and accuracy charts from history rows ({epoch, loss, accuracy, val_loss, val_accuracy});
 * rows may lack some keys (live progress from polling only knows val_accuracy).
 */
export function learningCurves(rows, {maxEpochs, best, note} = {}) {
  const pick = (key) => rows.filter((row) => Number.isFinite(row[key])).map((row) => [row.epoch, row[key]]);
  const loss = [pick("loss"), pick("val_loss")];
  const accuracy = [pick("accuracy"), pick("val_accuracy")];
  const describe = (name, [train, validation], format) => {
    const parts = [];
    if (train.length) parts.push(`training ${format(last(train))}`);
    if (validation.length) parts.push(`validation ${format(last(validation))}`);
    return `${name} after ${rows.length ? rows[rows.length - 1].epoch : 0} epochs: ${parts.join(", ") || "no data yet"}.`;
  };
  const charts = [];
  if (loss[0].length || loss[1].length) {
    charts.push(lineChart({title: "Loss", xMax: maxEpochs, best,
      series: [{name: "training", cls: "train", points: loss[0]}, {name: "validation", cls: "val", points: loss[1]}],
      yFormat: (v) => `${Number(v.toPrecision(3))}`, summary: describe("Loss", loss, (v) => v.toFixed(3))}));
  }
  charts.push(lineChart({title: "Accuracy", xMax: maxEpochs, best, yRange: [0, 1], yFormat: pct,
    series: [{name: "training", cls: "train", points: accuracy[0]}, {name: "validation", cls: "val", points: accuracy[1]}],
    summary: describe("Accuracy", accuracy, pct)}));
  return h("figure", {class: "curves", "data-testid": "learning-curve"},
    h("div", {class: "chart-row"}, charts),
    h("figcaption", {}, legend([
      (loss[0].length || accuracy[0].length) && ["training", "train"],
      (loss[1].length || accuracy[1].length) && ["validation", "val"]].filter(Boolean)),
      note ? h("span", {class: "muted"}, note) : null));
}

/** The confusion matrix as a table whose cells are shaded by their share of the row. */
export function confusionMatrix(labels, matrix) {
  const head = h("tr", {}, h("th", {scope: "col", class: "corner"},
    h("span", {}, "true ↓"), h("span", {}, "predicted →")),
  labels.map((label) => h("th", {scope: "col", title: label}, h("span", {class: "clip"}, label))));
  const body = labels.map((label, i) => {
    const row = matrix[i] || [];
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return h("tr", {}, h("th", {scope: "row", title: label}, h("span", {class: "clip"}, label)),
      row.map((count, j) => {
        const share = count / total;
        return h("td", {class: `heat heat-${Math.round(share * 10)}${i === j ? " diagonal" : ""}`,
          title: `true ${label}, predicted ${labels[j]}: ${count} (${Math.round(share * 100)}% of ${label})`},
        count);
      }));
  });
  return h("div", {},
    h("p", {class: "heatmap-note"}, "Validation images: rows are the true label, columns the predicted one. ",
      "The diagonal is right; the darker a cell, the larger its share of the row."),
    h("div", {class: "table-scroll", tabindex: "0", role: "region", "aria-label": "Confusion matrix"},
      h("table", {class: "heatmap", "data-testid": "confusion-matrix"},
        h("caption", {class: "visually-hidden"}, "Confusion matrix: counts of validation images by true and predicted label"),
        h("thead", {}, head), h("tbody", {}, body))));
}
