"""Staged training: how soon the first head is served, against one backbone pass over the
dataset (issue 14: "the first served head arrives in ≤ 1.5 × the time of one backbone pass").

In process, on one dataset's training images, with the default `TrainingConfig()`:

1. one backbone pass: `extract_features(views=0)` over every image, decoding included (what
   the preview stage runs before its first head), timed on its own after a warm-up;
2. `train_classifier` with every stage: the time from its call to each `on_stage` (a head that
   the service would commit and serve), and to its return (the final head).

The ratio is (time to the first stage) / (one backbone pass). "its backbone s" is the time the
backbone took inside the run up to that stage (cumulative), which shows how much of a stage's
time was extraction on a machine whose load changes. Commit time (a head and a report written
to the store, milliseconds) is not included.

    python -m bench.stages --write
    python -m bench.stages --weights random --image-size 32 --limit-per-label 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.train_speed import read_data  # noqa: E402

#: The issue's bound on the time to the first served head, in backbone passes.
BOUND = 1.5
HEADERS = ["dataset", "px", "images", "one backbone pass s", "stage", "ready after s",
           "× one pass", "its backbone s", "val loss", "val acc", "served"]


def measure(data, backbone) -> tuple[float, float, list[dict]]:
    """(one pass s, whole run s, one row per stage with its time from the start)."""
    from models.features import extract_features
    from models.options import TrainingConfig
    from models.training import train_classifier

    config = TrainingConfig()
    start = time.perf_counter()
    extract_features(data.train_bytes, backbone, views=0, augmentation=config.augmentation,
                     rng=np.random.default_rng(0), batch_size=config.extract_batch_size)
    one_pass = time.perf_counter() - start

    served_at: dict[str, float] = {}
    backbone_s: dict[str, float] = {}
    start = time.perf_counter()

    def on_stage(result) -> None:
        served_at[result.stage] = time.perf_counter() - start
        backbone_s[result.stage] = result.report["timings_s"]["features"]
        print(f"  {result.stage} served after {served_at[result.stage]:.1f} s "
              f"(val loss {result.val_loss:.4f})", file=sys.stderr)

    result = train_classifier(data.train_bytes, data.train_labels, data.label_names, backbone,
                              config, on_stage=on_stage)
    total = time.perf_counter() - start
    stages = [{**summary, "ready_s": served_at.get(summary["stage"], summary["elapsed_s"]),
               "backbone_s": backbone_s.get(summary["stage"])} for summary in result.stages]
    return one_pass, total, stages


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stages",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, datasets=("hymenoptera",))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)

    from models.backbone import load_backbone

    all_rows = []
    for name in common.dataset_names(args.datasets):
        split = common.load_split(name, shared, args.limit_per_label)
        size = args.image_size or split.image_size
        data = read_data(split)
        print(f"{split.description}: {len(data.train_bytes)} training images, {size} px",
              file=sys.stderr)
        backbone = load_backbone(weights, size)
        backbone.warm_up()
        one_pass, total, stages = measure(data, backbone)
        rows = [[split.name, size, len(data.train_bytes), f"{one_pass:.1f}", stage["stage"],
                 f"{stage['ready_s']:.1f}", f"{stage['ready_s'] / one_pass:.2f}",
                 "" if stage["backbone_s"] is None else f"{stage['backbone_s']:.1f}",
                 f"{stage['val_loss']:.4f}", f"{stage['val_accuracy']:.3f}",
                 "yes" if stage["served"] else "no (loss not lower)"] for stage in stages]
        rows.append([split.name, size, len(data.train_bytes), f"{one_pass:.1f}", "(run ends)",
                     f"{total:.1f}", f"{total / one_pass:.2f}", "", "", "", ""])
        all_rows += rows
        first = stages[0]["ready_s"] / one_pass
        verdict = f"first head after {first:.2f} × one backbone pass (bound {BOUND} ×): " \
                  + ("within" if first <= BOUND else "OVER")
        print(verdict, file=sys.stderr)
        if args.write:
            title = f"staged training: {split.name} ({size} px)"
            common.write_section(title, common.section(title, common.markdown_table(
                HEADERS, rows) + f"\n\n{verdict}.", {
                    "data": f"{split.description}; default TrainingConfig; times from the "
                            "train_classifier call, encoded bytes in memory; store writes "
                            "excluded", "weights": weights}))
    print(common.markdown_table(HEADERS, all_rows))


if __name__ == "__main__":
    common.run_main(main)
