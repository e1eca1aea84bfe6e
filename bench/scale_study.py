"""The backbone's input size as a lever for the frozen features, and the test images no size
fixes (issue 12: hymenoptera ≥ 0.95 needs 146 of 153 right).

Per dataset, the images are resized (squashed, as the service does) to each of `--sizes` and
passed once through the frozen backbone at that size (it is fully convolutional, the pooled
features are 2048-d at any size); the default head candidates are cross-validated on the
originals (views 0) and the chosen head refitted, per size and for the mean of two sizes'
features. Reports test images right, the out-of-fold loss and accuracy the selection saw, the
chosen head, the feature time relative to the dataset's own size, and the test images that every
variant gets wrong, with the score each gave their true label. In process, nothing cached: about
six minutes for hymenoptera at 224, 288 and 352 px on two cores with bfloat16.

    python -m bench.scale_study --shared ../shared --write
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, datasets=("hymenoptera",))
    parser.add_argument("--sizes", default="224,288,352",
                        help="comma-separated backbone input sizes; the first is the baseline")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    from bench.train_speed import read_data
    from models.backbone import load_backbone
    from models.options import TrainingOptions
    from models.precision import resolve
    from models.prediction import apply_head
    from models.preprocessing import decode_image, resize_pixels
    from models.training import TrainingConfig, train_on_features

    sizes = [int(size) for size in args.sizes.split(",")]
    precision = resolve("auto")
    config = TrainingConfig.of(TrainingOptions(augmentation={"views": 0}))
    for name in common.dataset_names(args.datasets):
        split = common.load_split(name, shared, args.limit_per_label)
        data = read_data(split)
        features, seconds = {}, {}
        for size in sizes:
            backbone = load_backbone(weights, size, precision=precision)
            backbone.features(np.zeros((16, size, size, 3), np.uint8))  # traced outside the clock
            started = time.perf_counter()
            features[size] = tuple(_features(backbone, blobs, size, decode_image, resize_pixels)
                                   for blobs in (data.train_bytes, data.test_bytes))
            seconds[size] = time.perf_counter() - started
            print(f"{name}: features at {size} px in {seconds[size]:.0f} s", flush=True)

        variants = [(f"{size} px", (size,)) for size in sizes]
        variants += [(f"mean of {a} and {b} px", (a, b))
                     for i, a in enumerate(sizes) for b in sizes[i + 1:]]
        rows, wrong = [], {}
        for label, used in variants:
            train, test = (np.mean([features[size][part] for size in used], axis=0)
                           for part in (0, 1))
            result = train_on_features(train[:, None], data.train_labels, data.label_names,
                                       config)
            scores = apply_head(result.head, test)
            missed = np.flatnonzero(scores.argmax(1) != data.test_labels)
            wrong[label] = {int(i): float(scores[i, data.test_labels[i]]) for i in missed}
            validation, head = result.report["validation"], result.report["head"]
            rows.append([label, f"{len(test) - len(missed)}/{len(test)}",
                         f"{validation['loss']:.3f}", f"{validation['accuracy']:.3f}",
                         f"L2 {head['l2']:g}" if not head["hidden_units"]
                         else f"{head['hidden_units']} hidden",
                         f"{sum(seconds[size] for size in used) / seconds[sizes[0]]:.2f}×"])
            print(" | ".join(rows[-1]), flush=True)
        always = sorted(set.intersection(*(set(missed) for missed in wrong.values())))
        if len(data.test_bytes) != len(split.test):  # files the service would skip: no names
            always = []
        body = _body(split, rows, always, wrong)
        print(body)
        if args.write:
            heading = (f"Scale study: {name}, backbone input {', '.join(map(str, sizes))} px "
                       f"(views 0)")
            common.write_section(heading, common.section(heading, body,
                                                         {"precision": precision.policy}))
    print(f"command: {common.command_line()}", file=sys.stderr)


def _features(backbone, blobs, size: int, decode_image, resize_pixels) -> np.ndarray:
    pixels = np.stack([resize_pixels(np.asarray(decode_image(blob), np.uint8), size)
                       for blob in blobs])
    return np.concatenate([backbone.features(pixels[i:i + 16])
                           for i in range(0, len(pixels), 16)])


def _body(split, rows, always, wrong) -> str:
    table = common.markdown_table(
        ["backbone input", "test right", "out-of-fold loss", "out-of-fold accuracy",
         "chosen head", "feature time"], rows)
    if not always:
        return table + "\n\nNo test image is wrong under every variant.\n"
    lines = [f"- {split.test[i][0]} `{split.test[i][1].name}`: score of the true label "
             + ", ".join(f"{score:.3f}" for score in (wrong[label][i] for label in wrong))
             for i in always]
    return (table + f"\n\n{len(always)} test images are wrong under every variant (scores in "
            "the table's order):\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    common.run_main(main)
