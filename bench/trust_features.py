"""Backbone features for bench/trust.py, computed once and cached as .npz files.

The trust benchmark needs, per dataset, the features the product trains on (the original image
plus 4 augmented views, `training.extract_features` with the default `Augmentation`), the test
images' features, the *other* dataset's images at this dataset's image size (the
out-of-distribution set), and a few planted near copies (re-encoded, rescaled, cropped). The
backbone is the expensive part (about 4 images/s at 224 px on 2 cores), so everything is cached
under `--cache` (default /tmp/headstart-trust) keyed by dataset, image size and views; reruns of
the benchmark only train heads.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench import common

VIEWS = 4
#: How many images of the other dataset each classifier is shown (per label of that dataset,
#: the first ones of its test split).
OOD_PER_LABEL = {"hymenoptera": 76, "flowers5": 50}
NEAR_COPIES = 12
OTHER = {"hymenoptera": "flowers5", "flowers5": "hymenoptera"}


@dataclass
class Features:
    """Cached features of one image list. `features` is float32 (n, 1 + views, 2048)."""

    features: np.ndarray
    labels: np.ndarray        # int (n,), indices into label_names; -1 where unknown
    label_names: list[str]
    paths: list[str]          # archive-style paths, "label/file name"
    hashes: list[str]         # sha256 of the file bytes

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, features=self.features, labels=self.labels,
                 label_names=np.array(self.label_names), paths=np.array(self.paths),
                 hashes=np.array(self.hashes))
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Features":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["features"], data["labels"], [str(s) for s in data["label_names"]],
                       [str(s) for s in data["paths"]], [str(s) for s in data["hashes"]])


def parse_arguments(prog: str, description: str, argv=None):
    """The trust benchmarks' command line: the common arguments plus `--cache`.

    Returns:
        (args, shared dir, weights setting, cache dir).
    """
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    common.add_common_arguments(parser)
    parser.add_argument("--cache", default="/tmp/headstart-trust",
                        help="feature cache directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.limit_per_label is not None or args.image_size is not None:
        raise common.BenchError(f"{prog} runs full datasets at their own image sizes only")
    shared, weights = common.prepare(args)
    return args, shared, weights, Path(args.cache)


def _usable(examples, size: int) -> list[tuple[str, str, bytes]]:
    """(label, archive path, bytes) of the examples that decode, as the service would keep."""
    from models.preprocessing import ImageDecodeError, load_image

    kept = []
    for label, path in examples:
        data = path.read_bytes()
        try:
            load_image(data, size)
        except ImageDecodeError as error:
            print(f"  skipped {label}/{path.name}: {error.reason}", file=sys.stderr)
            continue
        kept.append((label, f"{label}/{path.name}", data))
    return kept


def _extract(backbone, items, label_names, views: int, seed: int) -> Features:
    from models.augmentation import Augmentation
    from models.training import extract_features

    started = time.perf_counter()
    images = [data for _, _, data in items]
    features = extract_features(images, backbone, views=views, augmentation=Augmentation(),
                                rng=np.random.default_rng(seed), batch_size=32)
    print(f"  {len(images)} images x {1 + views} views in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    index = {name: i for i, name in enumerate(label_names)}
    return Features(features, np.array([index.get(label, -1) for label, _, _ in items]),
                    list(label_names), [p for _, p, _ in items],
                    [hashlib.sha256(data).hexdigest() for _, _, data in items])


def near_copy(data: bytes, seed: int) -> bytes:
    """A near copy as users make them: rescaled (85-95 %), cropped a few pixels, saved as JPEG
    at quality 70 (a re-save or a screenshot of the same photo)."""
    rng = np.random.default_rng(seed)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = rng.uniform(0.85, 0.95)
    image = image.resize((max(8, int(width * scale)), max(8, int(height * scale))))
    crop = int(rng.integers(2, 8))
    image = image.crop((crop, crop, image.size[0] - crop, image.size[1] - crop))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def cached_features(name: str, shared: Path, weights: str, cache: Path) -> dict[str, Features]:
    """{"train", "test", "ood", "near_copies"} features of dataset `name` at its image size,
    from the cache or computed (and cached) now. `near_copies` are near copies of the first
    NEAR_COPIES training images (spread over labels), in that order."""
    split = common.load_split(name, shared)
    size = split.image_size
    other = common.load_split(OTHER[name], shared)
    parts = {"train": cache / f"{name}-{size}px-train-views{VIEWS}.npz",
             "test": cache / f"{name}-{size}px-test.npz",
             "ood": cache / f"{name}-{size}px-ood-{OTHER[name]}.npz",
             "near_copies": cache / f"{name}-{size}px-near-copies.npz"}
    if all(path.exists() for path in parts.values()):
        return {part: Features.load(path) for part, path in parts.items()}

    from models.backbone import load_backbone

    backbone = load_backbone(weights, size)
    label_names = split.labels
    result = {}
    for part, path in parts.items():
        if path.exists():
            result[part] = Features.load(path)
            continue
        print(f"{name} {size}px {part}:", file=sys.stderr)
        if part == "train":
            items = _usable(split.train, size)
            result[part] = _extract(backbone, items, label_names, VIEWS, seed=0)
        elif part == "test":
            result[part] = _extract(backbone, _usable(split.test, size), label_names, 0, seed=0)
        elif part == "ood":
            per_label: dict[str, int] = {}
            chosen = []
            for label, file in other.test:
                if per_label.get(label, 0) < OOD_PER_LABEL[OTHER[name]]:
                    per_label[label] = per_label.get(label, 0) + 1
                    chosen.append((label, file))
            result[part] = _extract(backbone, _usable(chosen, size), other.labels, 0, seed=0)
        else:
            train = result["train"]
            sources = _spread(train.labels, NEAR_COPIES)
            files = {f"{label}/{file.name}": file for label, file in split.train}
            items = []
            for number, i in enumerate(sources):
                original = files[train.paths[i]].read_bytes()
                label, file_name = train.paths[i].split("/", 1)
                items.append((label, f"{label}/copy-of-{file_name.rsplit('.', 1)[0]}.jpg",
                              near_copy(original, seed=number)))
            result[part] = _extract(backbone, items, label_names, 0, seed=0)
        result[part].save(path)
    return result


def _spread(labels: np.ndarray, count: int) -> list[int]:
    """`count` indices taken round-robin over labels, the first of each label first."""
    queues = [list(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    chosen = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return chosen

