"""Fine-tuning: frozen against fine-tuned classifiers, trained and served through HTTP.

In one run of the real service (gunicorn, real weights) per dataset:
1. a frozen classifier (`fine_tune: "off"`) and one per `--blocks` value, fine-tuned with the
   given epochs (`fine_tune: {"blocks": b, "max_epochs": …}`), on the training images; their
   test accuracy through POST …/predict, training wall time, and what the report says
   (kept or not, validation loss against the frozen head's on the same held-out images,
   relative shift per layer);
2. predict latency at concurrency 1, one image per request, frozen and fine-tuned classifiers
   alternating (`--rounds` rounds of `--seconds` each; medians of the p50s);
3. throughput of eight fine-tuned classifiers against eight frozen ones at concurrency 8 (small
   classifiers, 4 images per label, two fine-tuning epochs at η 1e-4: they only need to exist; the table
   says how many of the eight the stage kept fine-tuned).

The issue's targets: flowers5 fine-tuned ≥ frozen + 5 points; hymenoptera fine-tuned ≥ 0.95;
fine-tuned p50 ≤ 1.15 × frozen; eight fine-tuned ≥ 0.9 × the throughput of eight frozen.

    python -m bench.finetune --datasets hymenoptera --views 0 --epochs 4 --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench import common
from bench.common import ServiceError
from bench.quality import Run, evaluate, train
from bench.serve import create_classifiers, load

HEADING = ("Fine-tuning: frozen vs fine-tuned ({dataset}, {size} px, views {views}, "
           "η {learning_rate:g}, α {l2_sp:g})")


def fine_tune_options(blocks: int, args: argparse.Namespace) -> dict:
    return {"blocks": blocks, "max_epochs": args.epochs, "patience": args.patience,
            "learning_rate": args.learning_rate, "l2_sp": args.l2_sp}


def latency(client: common.Client, ids: dict[str, str], images: list[bytes], *, rounds: int,
            seconds: float) -> dict[str, float]:
    """Median over rounds of the p50 at concurrency 1, the classifiers alternating."""
    p50s: dict[str, list[float]] = {name: [] for name in ids}
    for _ in range(rounds):
        for name, classifier_id in ids.items():
            p50s[name].append(load(client, [classifier_id], images, 1, seconds)["p50_s"])
    print(f"p50 latency per round: {p50s}", file=sys.stderr)
    return {name: statistics.median(values) for name, values in p50s.items()}


def describe(run: Run) -> dict:
    report = run.report
    tuning = report.get("fine_tuning") or {}
    shift = (report.get("fine_tuned") or {}).get("relative_shift") or {}
    return {
        "test": f"{run.test_accuracy:.3f} ({run.test_correct}/{run.test_total})"
        if run.test_accuracy is not None else run.status,
        "kept": "yes" if report.get("fine_tuned") else ("no" if tuning.get("ran") else "—"),
        "val": (f"{tuning['val_loss']:.4f} vs frozen {tuning['frozen_val_loss']:.4f} "
                f"on {tuning['held_out_images']} ({tuning.get('folds', 1)} "
                f"fold{'s' if tuning.get('folds', 1) > 1 else ''})")
        if "val_loss" in tuning else "—",
        "shift": ", ".join(f"{name.split('_')[0][-1]}.{name[-1]} {value:.2%}"
                           for name, value in shift.items()) or "—",
        "best": ", ".join(str(t["best_epoch"]) for t in tuning.get("tried", [])) or "—",
        "wall": f"{run.wall_s:.0f}" if run.wall_s else "—",
        "fine_s": f"{tuning['seconds']:.0f}" if "seconds" in tuning else "—",
        "d": report.get("d", "—"),
    }


def run_dataset(name: str, shared, weights: str, args: argparse.Namespace) -> str:
    split = common.load_split(name, shared, args.limit_per_label)
    size = args.image_size or 224
    print(f"{split.description}: {len(split.train)} train, {len(split.test)} test, {size} px",
          file=sys.stderr)
    views = {"augmentation": {"views": args.views}}
    runs = [Run(name, size, {**views, "fine_tune": "off"})]
    runs += [Run(name, size, {**views, "fine_tune": fine_tune_options(b, args)})
             for b in args.blocks]
    throughput = {}
    budget = {"HEADSTART_FINE_TUNE_BUDGET_S": str(args.fine_tune_budget)} \
        if args.fine_tune_budget else None
    with common.running_service(weights, size, ready_timeout_s=args.ready_timeout,
                                extra_env=budget) as client:
        for run in runs:
            try:
                train(client, split, run, poll_s=2.0, timeout_s=args.train_timeout)
                if run.status == "ready":
                    evaluate(client, split, run, 16)
            except ServiceError as error:
                run.status, run.error = "error", str(error)
                print(f"[{name}] {error}", file=sys.stderr)
        ready = {("frozen" if r.options["fine_tune"] == "off" else
                  f"blocks {r.options['fine_tune']['blocks']}"): r.report["classifier_id"]
                 for r in runs if r.status == "ready"}
        images = [path.read_bytes() for _, path in split.test[:16]]
        p50 = latency(client, ready, images, rounds=args.rounds, seconds=args.seconds) \
            if args.seconds else {}
        if args.throughput_seconds and 1 in args.blocks:
            frozen8 = create_classifiers(client, split, 8, {"fine_tune": "off"})
            tuned8 = create_classifiers(client, split, 8, {"fine_tune": {
                "blocks": 1, "max_epochs": 2, "patience": 1, "learning_rate": 1e-4}})
            kept = sum(client.get(f"/v1/classifiers/{i}")["fine_tuned"] is not None
                       for i in tuned8)
            rates = {"frozen": [], "fine-tuned": []}
            for _ in range(args.rounds):
                rates["frozen"].append(load(client, frozen8, images, 8,
                                            args.throughput_seconds)["images_per_s"])
                rates["fine-tuned"].append(load(client, tuned8, images, 8,
                                                args.throughput_seconds)["images_per_s"])
            print(f"throughput per round: {rates}", file=sys.stderr)
            throughput = {key: statistics.median(v) for key, v in rates.items()}
            throughput["kept"] = kept

    rows = []
    frozen = runs[0]
    for run in runs:
        label = "frozen" if run is frozen else f"blocks {run.options['fine_tune']['blocks']}"
        info = describe(run)
        delta = (f"{(run.test_accuracy - frozen.test_accuracy) * 100:+.1f}"
                 if run.test_accuracy is not None and frozen.test_accuracy is not None
                 and run is not frozen else "—")
        ratio = (f"{p50[label] * 1000:.0f} ms ({p50[label] / p50['frozen']:.2f}×)"
                 if label in p50 and "frozen" in p50 else "not measured")
        rows.append([label, info["test"], delta, info["kept"], info["val"], info["best"],
                     info["shift"], info["d"], info["wall"], info["fine_s"], ratio])
    table = common.markdown_table(
        ["classifier", "test accuracy", "Δ points", "kept fine-tuned", "val loss (held-out images)",
         "best epoch", "relative shift (block.conv)", "d", "train wall s", "fine-tuning s",
         "predict p50, c=1"], rows)
    notes = [f"- options: augmentation views {args.views}; fine-tuning max_epochs {args.epochs}, "
             f"patience {args.patience}, learning_rate {args.learning_rate:g}, l2_sp "
             f"{args.l2_sp:g}; head \"auto\"."]
    if throughput:
        notes.append(
            f"- 8 classifiers at concurrency 8, one image per request: frozen "
            f"{throughput['frozen']:.2f} images/s, fine-tuned {throughput['fine-tuned']:.2f} "
            f"images/s ({throughput['fine-tuned'] / throughput['frozen']:.2f}×); "
            f"{throughput['kept']} of the 8 small fine-tuned classifiers kept their blocks "
            "(4 images per label, 2 epochs at η 1e-4; the others serve frozen).")
    else:
        notes.append("- throughput of 8 fine-tuned vs 8 frozen classifiers: not measured.")
    for run in runs[1:]:  # the report's own words on the decision (each fold's best epoch)
        reason = (run.report.get("fine_tuning") or {}).get("reason")
        if reason:
            notes.append(f"- blocks {run.options['fine_tune']['blocks']}: {reason}.")
    body = table + "\n\n" + "\n".join(notes)
    print(body)
    heading = HEADING.format(dataset=split.description, size=size, views=args.views,
                             learning_rate=args.learning_rate, l2_sp=args.l2_sp)
    if args.fine_tune_budget:  # NB: another section than the one-split runs'
        heading += f", budget {args.fine_tune_budget:g} s"
    return common.section(heading,
                          body,
                          {"rounds": f"{args.rounds} × {args.seconds:g} s latency, "
                                     f"{args.throughput_seconds:g} s throughput"})


SERVING_HEADING = "Fine-tuning: serving path in process ({size} px, {precision})"


def serving_in_process(shared, weights: str, args: argparse.Namespace) -> str:
    """The serving path without HTTP: the service's batcher (its default settings) and
    `mixed_pass`, real weights, eight distinct fine-tuned block5 sets (the pretrained kernels
    times 1 ± 1 %, one per classifier) against eight frozen classifiers, each with its own
    linear head; closed loop, one image per request. p50 at concurrency 1 (the two alternating,
    medians over rounds) and images/s at concurrency 8 over the eight classifiers."""
    import threading

    import numpy as np

    from models.backbone import load_backbone
    from models.finetune import ServedBlocks, pretrained_weights
    from models.heads import HeadSpec, build_head
    from models.precision import resolve
    from models.prediction import apply_head
    from models.preprocessing import load_image
    from service.config import Settings
    from service.serving.backbone import batching_options
    from service.serving.batching import FeatureBatcher

    size = args.image_size or 224
    backbone = load_backbone(weights, size, precision=resolve("auto"))
    backbone.warm_up()
    split = common.load_split("hymenoptera", shared)
    images = [load_image(path.read_bytes(), size)[None] for _, path in split.test[:16]]
    rng = np.random.default_rng(0)
    heads, uppers = [], []
    base = pretrained_weights(backbone, 1)
    for _ in range(8):
        head = build_head(HeadSpec(hidden_units=0, dropout=0.0, l2=1.0), backbone.feature_dim, 2)
        head.get_layer("head_standardize").adapt(rng.normal(size=(4, backbone.feature_dim)))
        heads.append(head)
        uppers.append(ServedBlocks(1, backbone.activation_shape("block4_pool"),
                                   {name: (k * rng.uniform(0.99, 1.01, k.shape), b)
                                    for name, (k, b) in base.items()}, backbone.precision))
    batcher = FeatureBatcher(backbone, **batching_options(Settings())).start()
    for head, upper in zip(heads, uppers):  # compile every path once
        batcher.features(images[0], lambda f, h=head: apply_head(h, f), upper=upper)
        batcher.features(images[0], lambda f, h=head: apply_head(h, f))

    def closed_loop(concurrency: int, tuned: bool, seconds: float) -> tuple[float, float]:
        latencies, stop_at = [], time.monotonic() + seconds
        lock = threading.Lock()

        def user(index: int) -> None:
            n = index
            while time.monotonic() < stop_at:
                which = n % 8
                started = time.perf_counter()
                batcher.features(images[n % len(images)],
                                 lambda f, h=heads[which]: apply_head(h, f),
                                 upper=uppers[which] if tuned else None)
                with lock:
                    latencies.append(time.perf_counter() - started)
                n += concurrency

        threads = [threading.Thread(target=user, args=(i,)) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return float(np.percentile(latencies, 50)), len(latencies) / seconds

    p50 = {"frozen": [], "fine-tuned": []}
    rate = {"frozen": [], "fine-tuned": []}
    for _ in range(args.rounds):
        for name, tuned in (("frozen", False), ("fine-tuned", True)):
            p50[name].append(closed_loop(1, tuned, args.seconds)[0])
            rate[name].append(closed_loop(8, tuned, args.throughput_seconds)[1])
    print(f"in process: p50 {p50}, images/s {rate}", file=sys.stderr)
    median = {name: (statistics.median(p50[name]), statistics.median(rate[name]))
              for name in p50}
    rows = [[name, f"{median[name][0] * 1000:.0f}", f"{median[name][1]:.2f}",
             ", ".join(f"{v * 1000:.0f}" for v in p50[name]),
             ", ".join(f"{v:.2f}" for v in rate[name])] for name in p50]
    ratio_p50 = median["fine-tuned"][0] / median["frozen"][0]
    ratio_rate = median["fine-tuned"][1] / median["frozen"][1]
    body = common.markdown_table(
        ["8 classifiers", "p50 ms, c=1 (median)", "images/s, c=8 (median)", "p50 per round",
         "images/s per round"], rows) + (
        f"\n\n- fine-tuned / frozen: p50 {ratio_p50:.2f}× (target ≤ 1.15×), throughput "
        f"{ratio_rate:.2f}× (target ≥ 0.9×).\n- the batcher with the service's default "
        "settings; heads untrained (their cost is negligible); hymenoptera val images.")
    print(body)
    return common.section(SERVING_HEADING.format(size=size, precision=backbone.precision), body,
                          {"rounds": f"{args.rounds} × {args.seconds:g} s latency, "
                                     f"{args.throughput_seconds:g} s throughput"})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, datasets=("hymenoptera", "flowers5"))
    parser.add_argument("--blocks", default="1", help="comma-separated: 1, 2 or 1,2")
    parser.add_argument("--views", type=int, default=4, help="augmented views per image")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning max_epochs")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="fine-tuning η")
    parser.add_argument("--l2-sp", type=float, default=0.01, help="fine-tuning α")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="latency seconds per classifier and round (0: skip)")
    parser.add_argument("--throughput-seconds", type=float, default=20.0,
                        help="throughput seconds per set and round (0: skip)")
    parser.add_argument("--serving-only", action="store_true",
                        help="only the in-process serving measurement (no training)")
    parser.add_argument("--fine-tune-budget", type=float, default=0.0,
                        help="the service's HEADSTART_FINE_TUNE_BUDGET_S: past the first split, "
                             "the folds it allows cross-validate the candidates (0: one split)")
    parser.add_argument("--train-timeout", type=float, default=4 * 3600.0)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    if args.serving_only:
        text = serving_in_process(shared, weights, args)
        if args.write:
            common.write_section(text.splitlines()[0].removeprefix("## "), text)
        return
    for name in common.dataset_names(args.datasets):
        text = run_dataset(name, shared, weights, args)
        if args.write:
            heading = text.splitlines()[0].removeprefix("## ")
            common.write_section(heading, text)


if __name__ == "__main__":
    common.run_main(main)
