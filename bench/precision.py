"""Mixed precision for training: backbone speed and accuracy per compute precision.

For each precision (float32, mixed_bfloat16, and mixed_float16 when a GPU is present): train a
head in process on hymenoptera's train split with that backbone (no augmentation, so the
backbone dominates), then classify the test split as the API serves it, through the float32
backbone. Records the training wall time, the backbone's images/s during feature extraction,
and the test accuracy, so a precision is kept only where it is faster and costs at most
0.5 points.

    python -m bench.precision --write
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import common
from bench.train_speed import PREDICT_BATCH, decode_all, read_data

HEADERS = ["precision", "device", "training wall s", "backbone images/s", "test accuracy",
           "change vs float32 (points)"]


def train_and_test(data, weights: str, size: int, precision: str, served) -> dict:
    from models.augmentation import Augmentation
    from models.backbone import device_name, load_backbone
    from models.prediction import class_scores
    from models.training import TrainingConfig, train_classifier

    backbone = load_backbone(weights, size, precision=precision)
    backbone.warm_up()
    started = time.perf_counter()
    result = train_classifier(data.train_bytes, data.train_labels, data.label_names, backbone,
                              TrainingConfig(augmentation=Augmentation(views=0)))
    wall = time.perf_counter() - started
    pixels = decode_all(data.test_bytes, size)
    scores = np.concatenate([class_scores(served, result.head, pixels[i:i + PREDICT_BATCH])
                             for i in range(0, len(pixels), PREDICT_BATCH)])
    return {"precision": precision, "device": device_name(), "wall_s": wall,
            "images_per_s": len(data.train_bytes) / result.report["timings_s"]["features"],
            "test_accuracy": float((scores.argmax(axis=1) == data.test_labels).mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.set_defaults(datasets="hymenoptera")
    args = parser.parse_args(argv)
    shared, weights = common.prepare(args)
    split = common.load_split("hymenoptera", shared, args.limit_per_label)
    size = args.image_size or split.image_size
    data = read_data(split)

    import tensorflow as tf

    from models.backbone import load_backbone

    precisions = ["float32", "mixed_bfloat16"]
    if tf.config.list_physical_devices("GPU"):
        precisions.append("mixed_float16")
    served = load_backbone(weights, size)  # the API's float32 backbone
    runs = []
    for precision in precisions:
        runs.append(train_and_test(data, weights, size, precision, served))
        print(runs[-1], file=sys.stderr)
    reference = runs[0]["test_accuracy"]
    rows = [[run["precision"], run["device"], f"{run['wall_s']:.1f}",
             f"{run['images_per_s']:.2f}", f"{run['test_accuracy']:.3f}",
             f"{(run['test_accuracy'] - reference) * 100:+.1f}"] for run in runs]
    table = common.markdown_table(HEADERS, rows)
    print(table)
    if args.write:
        device = runs[0]["device"]
        heading = f"Mixed precision: hymenoptera training, {size} px, {device}"
        common.write_section(heading, common.section(heading, table, {
            "data": f"{split.description}; heads trained without augmentation on each "
                    "precision's features, test images classified through the float32 backbone "
                    "(as the API serves)", "weights": weights}))


if __name__ == "__main__":
    common.run_main(main)
