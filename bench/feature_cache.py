"""The feature cache at real size: what a second training run of a classifier costs.

In process, with the service's own cache (`service.storage.features.StoredFeatureCache` over a
local store in a temporary folder) and `HEADSTART_PRECISION=auto`'s precision: extraction of
hymenoptera `train` (run 1), the same images plus the first `--added` images of `val` (run 2:
a new version with 20 more images), and run 2's dataset again (run 3: a requeued job). For each:
images sent through the backbone (what `/metrics` `headstart_backbone_images_total` counts),
(image, view) features from the cache and computed, extraction wall time, and the cache
object's size.

Then the numbers behind not persisting fine-tuning activations: bytes per view of the cached
float16 activations (`block4_pool` for `blocks: 1`, `block3_pool` for `blocks: 2`) against a
feature row, the share of a backbone pass's multiply-adds below each cut (what a stored
activation would save a run) and above it (what each fine-tuning epoch runs forward, and about
twice that backward), from the layers' shapes, and the time of a pass up to `block4_pool`
against a whole one (median of 3, batch 16).

    python -m bench.feature_cache --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

from bench import common
from bench.train_speed import decode_all, read_data

HEADERS = ["run", "images", "backbone images", "features from cache", "computed",
           "extraction s", "cache object MiB"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.feature_cache",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, datasets=("hymenoptera",))
    parser.add_argument("--added", type=int, default=20, metavar="N",
                        help="images of the test split added in run 2 (default %(default)s)")
    parser.add_argument("--views", type=int, default=4, metavar="V",
                        help="augmented views per image (default %(default)s, the product's)")
    return parser.parse_args(argv)


def extraction(images, backbone, store, classifier_id, views: int) -> tuple[list, dict]:
    from models.features import extract_features
    from models.options import AugmentationOptions
    from service.storage.features import StoredFeatureCache

    cache = StoredFeatureCache(store, classifier_id, max_bytes=1024**3)
    before, started = backbone.passes, time.perf_counter()
    extract_features(images, backbone, views=views, augmentation=AugmentationOptions(),
                     seed=0, batch_size=32, cache=cache)
    seconds = time.perf_counter() - started
    summary = cache.summary
    return [len(images), backbone.passes - before, summary["from_cache"], summary["computed"],
            f"{seconds:.1f}", f"{summary['bytes'] / 1024**2:.1f}"], summary


def multiply_adds(backbone) -> dict[str, float]:
    """Multiply-adds of one image's pass, per block, from the conv layers' shapes."""
    per_block: dict[str, float] = {}
    for layer in backbone.model.layers:
        if not layer.name.endswith(tuple(f"conv{i}" for i in range(1, 4))):
            continue
        _, height, width, channels_out = layer.output.shape
        kernel = layer.kernel.shape
        block = layer.name.split("_")[0]
        per_block[block] = per_block.get(block, 0.0) + \
            height * width * channels_out * kernel[0] * kernel[1] * kernel[2]
    return per_block


def activation_rows(backbone, pixels: np.ndarray) -> list[list]:
    per_block = multiply_adds(backbone)
    total = sum(per_block.values())
    below = {"block4_pool": ("block1", "block2", "block3", "block4"),
             "block3_pool": ("block1", "block2", "block3")}
    timings = {"block4_pool": [], "features": []}
    for _ in range(3):
        for name in timings:
            started = time.perf_counter()
            if name == "features":
                backbone.features(pixels)
            else:
                backbone.activations(pixels, name)
            timings[name].append((time.perf_counter() - started) / len(pixels))
    row_bytes = backbone.feature_dim * 4
    rows = [["feature row (float32)", f"{row_bytes / 1024:.0f}", "1", f"{1:.0%}", "-",
             f"{statistics.median(timings['features']) * 1000:.0f}"]]
    for layer, blocks in below.items():
        nbytes = int(np.prod(backbone.activation_shape(layer))) * 2
        share = sum(per_block[b] for b in blocks) / total
        timed = f"{statistics.median(timings[layer]) * 1000:.0f}" if layer in timings else "-"
        rows.append([f"{layer} activations (float16)", f"{nbytes / 1024:.0f}",
                     f"{nbytes / row_bytes:.1f}", f"{share:.0%}", f"{1 - share:.0%}", timed])
    return rows


ACTIVATION_HEADERS = ["per (image, view)", "KiB", "× a feature row",
                      "multiply-adds below it (a pass's share)",
                      "above it (the trained blocks' forward)", "ms per image (batch 16)"]


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    from models.backbone import load_backbone
    from models.precision import resolve
    from service.storage.blobs import LocalBlobStore
    from service.storage.classifiers import ClassifierStore, new_classifier_id

    split = common.load_split("hymenoptera", shared, args.limit_per_label)
    size = args.image_size or split.image_size
    data = read_data(split)
    precision = resolve("auto")
    backbone = load_backbone(weights, size, precision=precision)
    backbone.warm_up((32,))
    first = list(data.train_bytes)
    second = first + list(data.test_bytes[:args.added])
    rows = []
    with tempfile.TemporaryDirectory(prefix="headstart-bench-cache-") as folder:
        store, classifier_id = ClassifierStore(LocalBlobStore(folder)), new_classifier_id()
        for name, images in ((f"1: {len(first)} images", first),
                             (f"2: {args.added} added", second), ("3: unchanged", second)):
            row, _ = extraction(images, backbone, store, classifier_id, args.views)
            rows.append([name, *row])
            print(common.markdown_table(HEADERS, rows[-1:]), file=sys.stderr)
    pixels = decode_all(first[:16], size)
    activations = activation_rows(backbone, pixels)
    body = (common.markdown_table(HEADERS, rows) + "\n\n"
            + common.markdown_table(ACTIVATION_HEADERS, activations))
    print(body)
    if args.write:
        title = f"feature cache: {split.name} ({size} px)"
        extra = {"data": f"{split.description}; run 2 adds the first {args.added} test images; "
                         f"{args.views} augmented views; batch 32",
                 "weights": weights, "precision": f"{precision.policy} ({precision.reason})"}
        common.write_section(title, common.section(title, body, extra))


if __name__ == "__main__":
    common.run_main(main)
