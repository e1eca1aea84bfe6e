"""Two preprocessing levers for the frozen features, evaluated and not adopted (issue 12).

1. The resize: the product squashes every image to S×S (aspect not kept). Against it, an
   aspect-keeping centre crop (the square of the short side, or 87.5 % of it, as ImageNet's
   224-of-256 evaluation crop), resized to S×S, for training and test images alike; views 0,
   the default head candidates.
2. A zoom in the augmented views: each view also scaled by a factor drawn from [1, 1 + zoom]
   about the centre (the product's views flip, rotate, shift and add noise, and do not zoom);
   the default options otherwise (four views), test images squashed as served.

Per dataset and variant: test images right, the out-of-fold loss and accuracy the selection saw,
the chosen head, its rows and (2) the probe check's gain. In process, every feature computed
again (nothing cached): about 10 minutes at 224 px on two cores. Prints; writes nothing.

    python -m bench.preprocessing_study --shared ../shared
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from unittest import mock

import numpy as np

from bench import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--zooms", default="0.15,0.3", help="comma-separated zoom ranges")
    return parser.parse_args(argv)


def centre_crop(fraction: float):
    from models.preprocessing import resize_pixels

    def crop(image, size: int) -> np.ndarray:
        pixels = np.asarray(image, np.uint8)
        height, width = pixels.shape[:2]
        side = int(round(min(height, width) * fraction))
        top, left = (height - side) // 2, (width - side) // 2
        return resize_pixels(pixels[top:top + side, left:left + side], size)
    return crop


def zoomed_transform(zoom: float):
    """`models.augmentation._random_transform` with a zoom drawn after the shift."""
    from models import augmentation as aug

    def transform(image_size, options, rng):
        centre = (image_size - 1) / 2.0
        flip = options.flip and rng.random() < 0.5
        angle = math.radians(rng.uniform(-options.rotation, options.rotation))
        dx, dy = rng.uniform(-options.shift, options.shift, size=2) * image_size
        scale = rng.uniform(1.0, 1.0 + zoom)
        forward = (aug._translation(centre + dx, centre + dy) @ aug._rotation(angle)
                   @ np.diag([scale * (-1.0 if flip else 1.0), scale, 1.0])
                   @ aug._translation(-centre, -centre))
        inverse = np.linalg.inv(forward)
        return (inverse.reshape(-1)[:8] / inverse[2, 2]).astype(np.float32)
    return transform


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    from bench.train_speed import read_data
    from models.features import extract_features
    from models.options import TrainingOptions
    from models.prediction import apply_head
    from models.preprocessing import decode_image, resize_pixels
    from models.training import TrainingConfig, train_on_features

    for split, backbone in common.splits_with_backbones(args, shared, weights):
        size = backbone.image_size
        data = read_data(split)

        def features(blobs, resize) -> np.ndarray:
            pixels = np.stack([resize(decode_image(blob), size) for blob in blobs])
            return np.concatenate([backbone.features(pixels[i:i + 32])
                                   for i in range(0, len(pixels), 32)])

        def report(variant: str, train: np.ndarray, test: np.ndarray, config, started) -> None:
            result = train_on_features(train, data.train_labels, data.label_names, config)
            right = int((apply_head(result.head, test).argmax(1) == data.test_labels).sum())
            selection, validation = result.report["selection"], result.report["validation"]
            check = selection.get("augmentation")
            print(f"{split.name} {variant}: test {right}/{len(test)}, out of fold loss "
                  f"{validation['loss']:.4f} accuracy {validation['accuracy']:.3f}, head "
                  f"{result.report['head']} on {selection['refit']['trained_on']}"
                  + (f", views gain {check['gain']:+.4f} ± {check['gain_se']:.4f}"
                     if check else "") + f" ({time.perf_counter() - started:.0f} s)", flush=True)

        originals_only = TrainingConfig.of(TrainingOptions(augmentation={"views": 0}))
        for variant, resize in (("squash", lambda image, s: resize_pixels(
                                     np.asarray(image, np.uint8), s)),
                                ("centre crop 100 %", centre_crop(1.0)),
                                ("centre crop 87.5 %", centre_crop(0.875))):
            started = time.perf_counter()
            report(f"{variant}, views 0", features(data.train_bytes, resize)[:, None],
                   features(data.test_bytes, resize), originals_only, started)

        config = TrainingConfig()
        squashed = features(data.test_bytes, lambda image, s: resize_pixels(
            np.asarray(image, np.uint8), s))
        for zoom in [0.0, *(float(z) for z in args.zooms.split(","))]:
            started = time.perf_counter()
            with mock.patch("models.augmentation._random_transform", zoomed_transform(zoom)) \
                    if zoom else mock.patch.dict({}):
                train = extract_features(data.train_bytes, backbone,
                                         views=config.augmentation.views,
                                         augmentation=config.augmentation, seed=config.seed,
                                         batch_size=32)
            report(f"zoom {zoom:g}, views {config.augmentation.views}", train, squashed, config,
                   started)
    print(f"command: {common.command_line()}", file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
