"""The training report as pictures a person can take away: standalone SVG documents drawn from the
report's JSON, without a plotting library. Every text that comes from a user (labels, names) is
escaped, so a label cannot inject markup into the picture.

    curves_svg(report)     train and validation loss and accuracy per epoch, best epoch marked
    confusion_svg(report)  the validation confusion matrix as a heat map
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
TRAIN, VALIDATION, BEST = "#2563eb", "#ea580c", "#6b7280"
#: Heat-map colours, from an empty cell to a full row.
LOW, HIGH = (248, 250, 252), (49, 46, 129)
MAX_LABEL_CHARS = 24
# XML 1.0 forbids these characters even when escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def text(value: Any) -> str:
    """A value as SVG text content or attribute value: escaped, without characters XML forbids."""
    return escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def short(label: str) -> str:
    """A label cut to fit beside a heat map; the full one goes in the cell's tooltip."""
    return label if len(label) <= MAX_LABEL_CHARS else label[:MAX_LABEL_CHARS - 1] + "…"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high], about `count` of them (1, 2 or 5 times 10^k)."""
    if not high > low:
        high = low + 1
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e4 else f"{value:.3g}"


def _document(width: int, height: int, title: str, body: Iterable[str]) -> str:
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="{FONT}" role="img">'),
        f"<title>{text(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        *body,
        "</svg>", ""])


def _panel(x0: float, y0: float, width: float, height: float, title: str,
           series: Sequence[tuple[str, str, list[tuple[float, float]]]], x_max: int,
           y_range: tuple[float, float] | None, best_epoch: int | None,
           y_format=_number) -> list[str]:
    """One line chart: axes, grid, one polyline per (name, colour, points) series."""
    values = [y for _, _, points in series for _, y in points]
    if y_range is None:
        top = max(values, default=1.0)
        y_range = (0.0, top if top > 0 else 1.0)
    y_ticks = nice_ticks(*y_range)
    y_low, y_high = y_ticks[0], y_ticks[-1]
    x_ticks = [int(t) for t in nice_ticks(1, max(2, x_max), 6) if 1 <= t <= max(1, x_max)]
    x_span = max(1, x_max - 1)

    def px(epoch: float) -> float:
        return x0 + (epoch - 1) / x_span * width

    def py(value: float) -> float:
        return y0 + height - (value - y_low) / (y_high - y_low) * height

    out = [(f'<text x="{x0}" y="{y0 - 14}" font-size="14" font-weight="600" fill="{INK}">'
            f"{text(title)}</text>")]
    for tick in y_ticks:
        y = py(tick)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" '
                   f'stroke="{GRID}"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" fill="{MUTED}" '
                   f'text-anchor="end">{text(y_format(tick))}</text>')
    for tick in x_ticks:
        x = px(tick)
        out.append(f'<text x="{x:.1f}" y="{y0 + height + 16}" font-size="11" fill="{MUTED}" '
                   f'text-anchor="middle">{tick}</text>')
    out.append(f'<text x="{x0 + width / 2}" y="{y0 + height + 34}" font-size="12" '
               f'fill="{MUTED}" text-anchor="middle">epoch</text>')
    out.append(f'<line x1="{x0}" y1="{y0 + height}" x2="{x0 + width}" y2="{y0 + height}" '
               f'stroke="{MUTED}"/>')
    if best_epoch is not None and 1 <= best_epoch <= max(1, x_max):
        x = px(best_epoch)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + height}" '
                   f'stroke="{BEST}" stroke-dasharray="4 3"/>')
        anchor = "end" if x > x0 + width * 0.8 else "start"
        dx = -4 if anchor == "end" else 4
        out.append(f'<text x="{x + dx:.1f}" y="{y0 + 12}" font-size="11" fill="{MUTED}" '
                   f'text-anchor="{anchor}">best epoch {best_epoch}</text>')
    for _, colour, points in series:
        if not points:
            continue
        coords = " ".join(f"{px(e):.1f},{py(v):.1f}" for e, v in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                   'stroke-width="2" stroke-linejoin="round" stroke-linecap="round"/>')
        if len(points) <= 20:
            out += [f'<circle cx="{px(e):.1f}" cy="{py(v):.1f}" r="2.5" fill="{colour}"/>'
                    for e, v in points]
    return out


def _points(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for row in history:
        value, epoch = row.get(key), row.get("epoch")
        if isinstance(value, (int, float)) and isinstance(epoch, (int, float)) \
                and math.isfinite(value):
            points.append((float(epoch), float(value)))
    return points


def curves_svg(report: dict[str, Any], name: str | None = None) -> str:
    """Train and validation loss (left) and accuracy (right) per epoch, best epoch marked.

    Args:
        report: a training report as JSON (`history` rows with epoch, loss, accuracy,
            val_loss, val_accuracy; optional `best_epoch` and `classifier_id`).
        name: the classifier's name, for the title (default: its id).
    Returns:
        A standalone SVG document.
    """
    history = report.get("history") or []
    best = report.get("best_epoch")
    x_max = int(max((row.get("epoch", 0) for row in history), default=1) or 1)
    width, height = 760, 330
    name = name or report.get("classifier_id") or "classifier"
    title = f"Learning curves: {name}"
    body = [(f'<text x="24" y="28" font-size="16" font-weight="600" fill="{INK}">'
             f"{text(title)}</text>")]
    legend_x = width - 250
    for i, (label, colour) in enumerate((("training", TRAIN), ("validation", VALIDATION))):
        x = legend_x + i * 110
        body.append(f'<line x1="{x}" y1="23" x2="{x + 20}" y2="23" stroke="{colour}" '
                    'stroke-width="3"/>')
        body.append(f'<text x="{x + 26}" y="27" font-size="12" fill="{INK}">{label}</text>')
    if not history:
        body.append(f'<text x="{width / 2}" y="{height / 2}" font-size="14" fill="{MUTED}" '
                    'text-anchor="middle">No epochs recorded</text>')
        return _document(width, height, title, body)
    losses = (("training loss", TRAIN, _points(history, "loss")),
              ("validation loss", VALIDATION, _points(history, "val_loss")))
    accuracies = (("training accuracy", TRAIN, _points(history, "accuracy")),
                  ("validation accuracy", VALIDATION, _points(history, "val_accuracy")))
    body += _panel(64, 76, 290, 190, "Loss", losses, x_max, None, best)
    body += _panel(446, 76, 290, 190, "Accuracy", accuracies, x_max, (0.0, 1.0), best,
                   y_format=lambda v: f"{v:.0%}")
    return _document(width, height, title, body)


def _mix(fraction: float) -> str:
    fraction = min(1.0, max(0.0, fraction))
    return "#" + "".join(f"{round(lo + (hi - lo) * fraction):02x}" for lo, hi in zip(LOW, HIGH))


def confusion_svg(report: dict[str, Any], name: str | None = None) -> str:
    """The validation confusion matrix as a heat map: rows are true labels, columns predicted
    ones; a cell's shade is its share of the row (the recall of the row's label on the diagonal).

    Args:
        report: a training report as JSON (`labels`, `validation.confusion_matrix` as a list of
            rows of counts).
        name: the classifier's name, for the title (default: its id).
    Returns:
        A standalone SVG document.
    """
    labels = [str(label) for label in report.get("labels") or []]
    matrix = (report.get("validation") or {}).get("confusion_matrix") or []
    n = len(labels)
    cell = max(18, min(56, 420 // max(1, n)))
    label_width = 14 + 7 * max((len(short(label)) for label in labels), default=4)
    left, top = 40 + label_width, 70 + int(label_width * 0.72)
    width = max(360, left + n * cell + int(label_width * 0.8) + 24)
    height = top + n * cell + 60
    name = name or report.get("classifier_id") or "classifier"
    title = f"Confusion matrix: {name}"
    body = [(f'<text x="24" y="28" font-size="16" font-weight="600" fill="{INK}">'
             f"{text(title)}</text>"),
            (f'<text x="24" y="48" font-size="12" fill="{MUTED}">Validation images; rows: true '
             "label, columns: predicted label; shade: share of the row</text>")]
    if n == 0 or len(matrix) != n:
        body.append(f'<text x="{width / 2}" y="{height / 2}" font-size="14" fill="{MUTED}" '
                    'text-anchor="middle">No confusion matrix in this report</text>')
        return _document(width, height, title, body)
    for j, label in enumerate(labels):
        x = left + j * cell + cell / 2
        body.append(f'<text x="{x:.1f}" y="{top - 8}" font-size="12" fill="{INK}" '
                    f'transform="rotate(-40 {x:.1f} {top - 8})">{text(short(label))}</text>')
    for i, (label, row) in enumerate(zip(labels, matrix)):
        y = top + i * cell
        total = sum(row) or 1
        body.append(f'<text x="{left - 8}" y="{y + cell / 2 + 4:.1f}" font-size="12" '
                    f'fill="{INK}" text-anchor="end">{text(short(label))}</text>')
        for j, count in enumerate(row):
            share = count / total
            x = left + j * cell
            tip = f"true {label}, predicted {labels[j]}: {count} ({share:.0%} of {label})"
            body.append(f'<g><title>{text(tip)}</title><rect x="{x}" y="{y}" width="{cell}" '
                        f'height="{cell}" fill="{_mix(share)}" stroke="#ffffff"/>')
            if cell >= 24:
                ink = "#ffffff" if share > 0.5 else INK
                body.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                            f'font-size="12" fill="{ink}" text-anchor="middle">{count}</text>')
            body.append("</g>")
    body.append(f'<text x="{left + n * cell / 2:.1f}" y="{top + n * cell + 28}" font-size="12" '
                f'fill="{MUTED}" text-anchor="middle">predicted label</text>')
    body.append(f'<text x="16" y="{top + n * cell / 2:.1f}" font-size="12" fill="{MUTED}" '
                f'text-anchor="middle" transform="rotate(-90 16 {top + n * cell / 2:.1f})">'
                "true label</text>")
    return _document(width, height, title, body)
