"""Classifier quality through the real service, over HTTP, against a cross-validated linear probe.

For each dataset: start the service (gunicorn, as deployed) at the dataset's image size, POST the
training images as a dataset zip, poll until the classifier is ready, read its report, POST the
held-out test images to /predict in batches, and measure test accuracy and predict throughput.
Then, in this process with the service stopped, the linear probe (`bench.probe`: logistic
regression on the same pooled features, C by 5-fold cross-validation) on the same split, and the
difference in test accuracy.

    python -m bench.quality --write
    python -m bench.quality --datasets hymenoptera --views 0,2,4,8 --write
    python -m bench.quality --weights random --image-size 32 --limit-per-label 4 --datasets hymenoptera

With `--cache-dir DIR` the classifier is trained in this process instead, on features cached in
DIR (`bench.cache`: the backbone runs once per (image, view), under the product's feature keys): `models.training.train_on_features`, the service's own path after the backbone,
then the test images' cached features through the refitted head. The probe then runs on the
very same features (view 0), so the comparison is paired.

    python -m bench.quality --cache-dir var/bench-cache --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.common import BenchError, Client, Part, ServiceError, Split

FINAL_STATUSES = ("ready", "failed", "cancelled")
#: Issue 12's data sets: the two benchmarks and a few-shot split of hymenoptera.
QUALITY_DATASETS = ("hymenoptera", "flowers5", f"hymenoptera-{common.FEW_SHOT_PER_LABEL}")


@dataclass
class Run:
    """One classifier trained through the service and evaluated on the test images."""

    dataset: str
    image_size: int
    options: dict
    status: str = "not started"
    error: str | None = None
    report: dict = field(default_factory=dict)
    wall_s: float | None = None           # POST /v1/classifiers → status ready
    test_correct: int = 0
    test_total: int = 0
    predict_s: float = 0.0                # summed wall time of the predict requests

    @property
    def test_accuracy(self) -> float | None:
        return self.test_correct / self.test_total if self.test_total else None

    @property
    def predict_images_per_s(self) -> float | None:
        return self.test_total / self.predict_s if self.predict_s else None


def train(client: Client, split: Split, run: Run, *, poll_s: float, timeout_s: float) -> None:
    """Creates the classifier and waits for its last stage (a ready classifier may still be
    refining), printing progress as it changes."""
    parts = [Part("dataset", common.dataset_zip(split.train), f"{split.name}.zip",
                  "application/zip")]
    if run.options:
        parts.append(Part("options", json.dumps(run.options).encode()))
    tag = f"[{split.name} {json.dumps(run.options) if run.options else 'defaults'}]"
    started = time.perf_counter()
    classifier = client.post_multipart("/v1/classifiers", parts)
    skipped = classifier["dataset"]["skipped"]
    print(f"{tag} created {classifier['id']}: {classifier['dataset']['images']} images "
          f"{classifier['dataset']['per_label']}" + (f", skipped {skipped}" if skipped else ""),
          file=sys.stderr)
    last_line = None
    while classifier["status"] not in FINAL_STATUSES or classifier.get("refining"):
        if time.perf_counter() - started > timeout_s:
            raise BenchError(f"{tag} {classifier['id']} not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)
        classifier = client.get(f"/v1/classifiers/{classifier['id']}")
        line = _progress_line(classifier)
        if line != last_line:
            print(f"{tag} {time.perf_counter() - started:7.1f} s  {line}", file=sys.stderr)
            last_line = line
    run.wall_s = time.perf_counter() - started
    run.status = classifier["status"]
    if run.status != "ready":
        run.error = json.dumps(classifier.get("error"))
        print(f"{tag} {run.status}: {run.error}", file=sys.stderr)
        return
    run.report = client.get(f"/v1/classifiers/{classifier['id']}/report")
    run.report["classifier_id"] = classifier["id"]


def train_in_process(split: Split, run: Run, backbone, cache_dir: Path):
    """Trains `run` in this process on cached features (see the module docstring) and counts
    its correct test images. Returns (the cached features, the decoded data)."""
    from bench import cache as cache_lib
    from bench.train_speed import read_data
    from models.backbone import device_name
    from models.options import TrainingOptions
    from models.prediction import apply_head
    from models.training import TrainingConfig, train_on_features

    config = TrainingConfig.of(TrainingOptions(**run.options))
    data = read_data(split)
    features = cache_lib.load_or_extract(split.name, data, backbone, config, cache_dir)
    started = time.perf_counter()
    result = train_on_features(features.train, data.train_labels, data.label_names, config,
                               timings=dict(features.timings))
    run.wall_s = time.perf_counter() - started
    run.status = "ready"
    run.report = {**result.report, "backbone": features.backbone, "device": device_name(),
                  "features": (f"{features.computed} (image, view) rows computed in this run, "
                               "the others read from the cache" if features.computed else
                               "every row read from the cache")}
    predicted = apply_head(result.head, features.test).argmax(axis=1)
    run.test_correct = int((predicted == data.test_labels).sum())
    run.test_total = len(data.test_labels)
    print(f"[{split.name}] test accuracy {run.test_correct}/{run.test_total} = "
          f"{run.test_accuracy:.3f} (in process, chosen {describe_head(result.report['head'])})",
          file=sys.stderr)
    return features, data


def _progress_line(classifier: dict) -> str:
    progress = classifier.get("progress") or {}
    bits = [classifier["status"], progress.get("stage") or ""]
    if progress.get("images_total"):
        bits.append(f"{progress['images_done']}/{progress['images_total']} images")
    if progress.get("candidate"):
        bits.append(f"head {progress['candidate']}")
    if progress.get("epoch"):
        limit = f"/{progress['max_epochs']}" if progress.get("max_epochs") else ""
        bits.append(f"epoch {progress['epoch']}{limit}")
    if progress.get("val_accuracy") is not None:
        bits.append(f"val_accuracy {progress['val_accuracy']:.3f}")
    return "  ".join(bit for bit in bits if bit)


def evaluate(client: Client, split: Split, run: Run, batch_size: int) -> None:
    """Predicts the test images through the API in batches and counts correct top-1 labels."""
    classifier_id = run.report["classifier_id"]
    for start in range(0, len(split.test), batch_size):
        batch = split.test[start:start + batch_size]
        parts = [Part("image", path.read_bytes(), path.name, "application/octet-stream")
                 for _, path in batch]
        began = time.perf_counter()
        answer = client.post_multipart(f"/v1/classifiers/{classifier_id}/predict?top_k=1", parts)
        run.predict_s += time.perf_counter() - began
        predictions = answer["predictions"]
        if len(predictions) != len(batch):
            raise BenchError(f"predict answered {len(predictions)} predictions for {len(batch)} "
                             "images")
        # NB: the best label, rejected or not: rejection is measured by bench.trust_wired
        run.test_correct += sum(p["top_k"][0]["label"] == label
                                for p, (label, _) in zip(predictions, batch))
        run.test_total += len(batch)
    print(f"[{split.name}] test accuracy {run.test_correct}/{run.test_total} = "
          f"{run.test_accuracy:.3f}, {run.predict_images_per_s:.1f} images/s", file=sys.stderr)


# ---------------------------------------------------------------- output


HEADERS = ["dataset", "px", "options", "m images", "m aug", "d", "d/m", "head (k folds)",
           "best/epochs", "val acc (out of fold)", "test acc", "probe test acc", "Δ vs probe",
           "decode s", "features s", "selection s", "head s", "selection share", "wall s",
           "predict img/s"]


def describe_head(head: dict, selection: dict | None = None) -> str:
    if not head:
        return ""
    kind = f"{head['hidden_units']} hidden" if head["hidden_units"] else "linear"
    text = f"{kind}, dropout {head['dropout']:g}, l2 {head['l2']:g}"
    if selection:
        text += f" (k = {selection['k']}, {len(selection['candidates'])} tried)"
    return text


def describe_probes(probes: list) -> str:
    """"0.941 (C 0.03 by cv loss) / 0.948 (C 0.1 by cv accuracy)"."""
    return " / ".join(f"{p.test_accuracy:.3f} (C {p.c:g} by {p.criterion})" for p in probes)


def row(run: Run, probes: list | None = None) -> list:
    options = json.dumps(run.options, separators=(",", ":")) if run.options else "defaults"
    if run.status != "ready":
        return [run.dataset, run.image_size, options, f"**{run.status}**: {run.error}"] + \
            [""] * (len(HEADERS) - 4)
    report = run.report
    m, timings = report["m"], report["timings_s"]
    total = sum(timings.get(key, 0) for key in ("decode", "features", "selection", "head"))
    best_probe = max((p.test_accuracy for p in probes), default=None) if probes else None
    return [
        run.dataset, run.image_size, f"`{options}`", m["train"],
        m["train_after_augmentation"], report["d"], f"{report['d_over_m']:.3g}",
        describe_head(report["head"], report.get("selection")),
        f"{report['best_epoch']}/{len(report['history'])}",
        f"{report['validation']['accuracy']:.3f}",
        f"{run.test_accuracy:.3f} ({run.test_correct}/{run.test_total})",
        describe_probes(probes) if probes else "not run",
        f"{100 * (run.test_accuracy - best_probe):+.1f} points" if best_probe is not None else "",
        f"{timings.get('decode', 0):.1f}", f"{timings.get('features', 0):.1f}",
        f"{timings.get('selection', 0):.1f}", f"{timings.get('head', 0):.1f}",
        f"{timings.get('selection', 0) / total:.0%}" if total else "",
        f"{run.wall_s:.1f}",
        f"{run.predict_images_per_s:.2f}" if run.predict_images_per_s else "in process",
    ]


def heading(split: Split, image_size: int, args: argparse.Namespace) -> str:
    text = f"quality: {split.name} ({image_size} px)"
    if args.views:
        text += ", augmentation views sweep"
    if args.options:
        text += f", options {json.dumps(json.loads(args.options), sort_keys=True)}"
    return text


# ---------------------------------------------------------------- main


def run_options(base: dict, views: list[int] | None) -> list[dict]:
    """One options object per classifier to train: the base, or the base with each views value."""
    if not views:
        return [base]
    return [{**base, "augmentation": {**base.get("augmentation", {}), "views": v}} for v in views]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, datasets=QUALITY_DATASETS)
    parser.add_argument("--options", default=None, metavar="JSON",
                        help='training options sent with each classifier, e.g. '
                             '\'{"augmentation": {"views": 4}}\'')
    parser.add_argument("--views", default=None, metavar="LIST",
                        help="sweep augmentation views: one classifier per value, e.g. 0,2,4,8")
    parser.add_argument("--predict-batch", type=int, default=16, metavar="N",
                        help="images per predict request (default %(default)s)")
    parser.add_argument("--poll", type=float, default=1.0, metavar="S",
                        help="seconds between status polls (default %(default)s)")
    parser.add_argument("--train-timeout", type=float, default=7200.0, metavar="S",
                        help="give up on a classifier after this long (default %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                        help="wait this long for the service's /readyz (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="train in this process on backbone features cached in DIR "
                             "(bench.cache) instead of through the service over HTTP")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip the cross-validated linear probe (bench.probe)")
    return parser.parse_args(argv)


def over_http(split: Split, size: int, weights: str, base: dict, views: list[int] | None,
              args: argparse.Namespace, caches: dict) -> tuple[list[Run], list | None]:
    """Each classifier trained and evaluated through the service, then the probe on the
    probe's own feature cache (view 0, float32)."""
    runs = []
    with common.running_service(weights, size, ready_timeout_s=args.ready_timeout) as client:
        for options in run_options(base, views):
            run = Run(split.name, size, options)
            runs.append(run)
            try:
                train(client, split, run, poll_s=args.poll, timeout_s=args.train_timeout)
                if run.status == "ready":
                    evaluate(client, split, run, args.predict_batch)
            except ServiceError as error:
                run.status, run.error = "error", str(error)
                print(f"[{split.name}] {error}", file=sys.stderr)
    if args.no_probe or weights == "imagenet":
        return runs, None
    # NB: TensorFlow, imported once the service has stopped.
    from bench import probe as probe_lib

    if size not in caches:
        caches[size] = probe_lib.FeatureCache(weights, size)
    probes = probe_lib.run(split, caches[size])
    print(f"[{split.name}] probe: {describe_probes(probes)}", file=sys.stderr)
    return runs, probes


def in_process(split: Split, size: int, weights: str, base: dict, views: list[int] | None,
               args: argparse.Namespace, backbones: dict) -> tuple[list[Run], list | None]:
    """Each classifier trained in this process on cached features (`train_in_process`), then
    the probe on the first run's features: the same view-0 vectors the pipeline trained on."""
    from bench import probe as probe_lib
    from models.backbone import load_backbone
    from models.precision import resolve

    if weights == "imagenet":
        raise BenchError("--cache-dir needs a weights file (or random), not 'imagenet'")
    if size not in backbones:
        backbones[size] = load_backbone(weights, size, precision=resolve("auto"))
    runs, probes = [], None
    for options in run_options(base, views):
        run = Run(split.name, size, options)
        runs.append(run)
        features, data = train_in_process(split, run, backbones[size], Path(args.cache_dir))
        if probes is None and not args.no_probe:
            probes = probe_lib.probe(features.train[:, 0], data.train_labels, features.test,
                                     data.test_labels, len(data.label_names))
            print(f"[{split.name}] probe (same features): {describe_probes(probes)}",
                  file=sys.stderr)
    return runs, probes


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    try:
        base = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as error:
        raise BenchError(f"--options is not valid JSON: {error}") from None
    if not isinstance(base, dict):
        raise BenchError("--options must be a JSON object")
    try:
        views = [int(v) for v in args.views.split(",")] if args.views else None
    except ValueError:
        raise BenchError(f"--views must be comma-separated integers. Received: {args.views}") from None

    all_rows, caches, summary = [], {}, []
    for name in common.dataset_names(args.datasets):
        split = common.load_split(name, shared, args.limit_per_label)
        size = args.image_size or split.image_size
        print(f"{split.description}: {len(split.train)} train, {len(split.test)} test images, "
              f"{size} px", file=sys.stderr)
        runs = []
        if args.cache_dir:
            runs, probes = in_process(split, size, weights, base, views, args, caches)
        else:
            runs, probes = over_http(split, size, weights, base, views, args, caches)
        rows = [row(run, probes) for run in runs]
        all_rows += rows
        for run in runs:
            if run.test_accuracy is not None:
                line = f"{name}: pipeline {run.test_accuracy:.3f}"
                if probes:
                    best = max(p.test_accuracy for p in probes)
                    line += (f", probe {describe_probes(probes)}: "
                             f"{100 * (run.test_accuracy - best):+.1f} points")
                summary.append(line)
        if args.write:
            device = next((r.report.get("device") for r in runs if r.report), "unknown")
            extra = {"data": f"{split.description}; {len(split.train)} training images "
                             f"(uploaded), {len(split.test)} test images",
                     "weights": weights, "training device (report)": device}
            if args.cache_dir:
                backbone = runs[0].report.get("backbone", {})
                extra["how"] = (
                    "in process (`--cache-dir`): backbone features extracted once by "
                    "`models.features.extract_features` as a training job does, "
                    f"{runs[0].report.get('features')}; then `train_on_features`, then the "
                    "test images' cached view-0 features through the refitted head; precision "
                    f"{backbone.get('precision')} ({backbone.get('precision_reason')})")
            if base:
                extra["options"] = f"`{json.dumps(base)}`"
            if probes:
                from bench import probe as probe_lib

                extra["probe"] = ("logistic regression on the same pooled features (view 0), "
                                  "z-scored, C by stratified 5-fold CV from "
                                  f"{min(probe_lib.C_GRID):g}-{max(probe_lib.C_GRID):g}, "
                                  "by cv loss and by cv accuracy; Δ is against the better")
            common.write_section(heading(split, size, args), common.section(
                heading(split, size, args), common.markdown_table(HEADERS, rows), extra))
    print(common.markdown_table(HEADERS, all_rows))
    print("\n".join(summary))


if __name__ == "__main__":
    common.run_main(main)
