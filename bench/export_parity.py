"""Export parity on real photos: the real VGG16 weights at 224 px, a head trained on hymenoptera,
and each export format run in its own runtime against the service's scores.

In process: a head is trained on part of hymenoptera `train` (no augmentation, to be quick);
the service's scores for 20 `val` photos are `class_scores` on `load_image` (what POST
…/predict computes). Each format is written with `models.export.write_archive`, unzipped, and
run with TensorFlow (the SavedModel's `serving_default` on the JPEG bytes and its `pixels` on
Pillow-decoded pixels), the TFLite interpreter and ONNX Runtime (pixels). Records the largest
absolute score difference per format and path, against the 1e-4 the exports promise; and, for
the record, how far two other resizes land: the service's previous Pillow resize (rounded to
uint8) and TensorFlow's `tf.image.resize` (bilinear, no antialiasing).

    python -m bench.export_parity --write

Without ../shared (the weights and photos), it says so and exits 0.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from bench import common

HEADERS = ["format", "runtime", "input", "max abs difference vs service", "top-1 agrees",
           "within 1e-4"]
TOLERANCE = 1e-4


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export_parity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(common.DEFAULT_SHARED),
                        help="directory holding datasets/ and weights/ (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, metavar="PX")
    parser.add_argument("--images", type=int, default=20, help="val photos compared (%(default)s)")
    parser.add_argument("--train-per-label", type=int, default=40,
                        help="train photos per label for the head (%(default)s)")
    parser.add_argument("--write", action="store_true",
                        help="record the results in bench/RESULTS.md")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    weights = shared / "weights" / common.WEIGHTS_NAME
    if not (weights.is_file() and (shared / "datasets" / "hymenoptera").is_dir()):
        print(f"skipped: needs the VGG16 weights and hymenoptera under {shared}", file=sys.stderr)
        return
    split = common.load_split("hymenoptera", shared)
    rows, notes = run(split, str(weights), args.image_size, args.images, args.train_per_label)
    table = common.markdown_table(HEADERS, rows)
    print(table)
    print("\n".join(notes))
    if args.write:
        heading = f"Export parity: real weights, hymenoptera photos, {args.image_size} px"
        common.write_section(heading, common.section(heading, table + "\n\n" + "\n".join(notes), {
            "data": f"head trained on {args.train_per_label}/label of hymenoptera train (no "
                    f"augmentation); {args.images} val photos compared (sizes "
                    f"{notes_sizes(split, args.images)})",
            "weights": str(weights)}))


def notes_sizes(split: common.Split, count: int) -> str:
    from PIL import Image

    sizes = sorted({Image.open(path).size for _, path in pick(split.test, count)})
    return ", ".join(f"{w}x{h}" for w, h in sizes[:6]) + (", …" if len(sizes) > 6 else "")


def pick(examples, count: int):
    """`count` photos, alternating labels, in file order."""
    by_label: dict[str, list] = {}
    for label, path in examples:
        by_label.setdefault(label, []).append((label, path))
    mixed = [example for group in zip(*by_label.values()) for example in group]
    return mixed[:count]


def run(split: common.Split, weights: str, size: int, count: int, per_label: int):
    import tensorflow as tf
    from PIL import Image

    from models import calibration
    from models import export as export_lib
    from models.augmentation import Augmentation
    from models.backbone import load_backbone
    from models.prediction import class_scores
    from models.preprocessing import ImageDecodeError, decode_image, load_image
    from models.training import TrainingConfig, train_classifier

    backbone = load_backbone(weights, size)
    names = split.labels
    train = [(label, path) for label in names
             for _, path in [e for e in split.train if e[0] == label][:per_label]]
    train_bytes, train_labels = [], []
    for label, path in train:
        data = path.read_bytes()
        try:
            decode_image(data)
        except ImageDecodeError:
            continue
        train_bytes.append(data)
        train_labels.append(names.index(label))
    started = time.perf_counter()
    result = train_classifier(train_bytes, np.array(train_labels), names, backbone,
                              TrainingConfig(augmentation=Augmentation(views=0)))
    print(f"head trained in {time.perf_counter() - started:.0f} s: {result.spec}",
          file=sys.stderr)
    photos = [path.read_bytes() for _, path in pick(split.test, count)]
    raw = class_scores(backbone, result.head, np.stack([load_image(d, size) for d in photos]))
    # NB: what predict answers: the head's scores calibrated by the classifier's temperature
    service = calibration.softmax(calibration.logits_from_probabilities(raw),
                                  result.trust.temperature).astype(np.float32)
    pixels = [np.asarray(decode_image(d), np.float32)[None] for d in photos]
    model = export_lib.from_keras(backbone.model, result.head, size,
                                  temperature=result.trust.temperature)

    rows, notes = [], []

    def row(export_format, runtime, what, scores):
        difference = float(np.abs(scores - service).max())
        agree = int((scores.argmax(axis=1) == service.argmax(axis=1)).sum())
        rows.append([export_format, runtime, what, f"{difference:.2e}", f"{agree}/{len(photos)}",
                     "yes" if difference < TOLERANCE else "**no**"])
        print(rows[-1], file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="export-parity-") as directory:
        for export_format in export_lib.FORMATS:
            started = time.perf_counter()
            buffer = io.BytesIO()
            export_lib.write_archive(model, export_format, names, {}, buffer)
            built = time.perf_counter() - started
            folder = Path(directory) / export_format
            zipfile.ZipFile(buffer).extractall(folder)
            notes.append(f"- {export_format}: built in {built:.0f} s, zip "
                         f"{len(buffer.getvalue()) / 2**20:.0f} MiB")
            if export_format == "savedmodel":
                loaded = tf.saved_model.load(str(folder / "model"))
                by_bytes = np.concatenate([loaded.signatures["serving_default"](
                    image_bytes=tf.constant([d]))["scores"].numpy() for d in photos])
                row("savedmodel", f"TensorFlow {tf.__version__}", "JPEG bytes (decoded inside)",
                    by_bytes)
                row("savedmodel", f"TensorFlow {tf.__version__}", "pixels",
                    np.concatenate([loaded.signatures["pixels"](pixels=tf.constant(p))["scores"]
                                    .numpy() for p in pixels]))
            elif export_format == "tflite":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tf.lite.Interpreter's move to LiteRT
                    interpreter = tf.lite.Interpreter(str(folder / "model.tflite"))
                run_tflite = interpreter.get_signature_runner("pixels")
                row("tflite", "tf.lite.Interpreter (XNNPACK)", "pixels",
                    np.concatenate([run_tflite(pixels=p)["scores"] for p in pixels]))
            else:
                import onnxruntime

                session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                                       providers=["CPUExecutionProvider"])
                row("onnx", f"ONNX Runtime {onnxruntime.__version__}", "pixels",
                    np.concatenate([session.run(["scores"], {"pixels": p})[0] for p in pixels]))

    # For the record: the resizes not chosen.
    pillow = np.stack([np.asarray(decode_image(d).resize((size, size), Image.Resampling.BILINEAR),
                                  np.uint8) for d in photos])
    row("(service before)", "Pillow resize, rounded to uint8", "pixels",
        class_scores(backbone, result.head, pillow))
    plain = np.stack([tf.image.resize(p[0], (size, size), "bilinear").numpy() for p in pixels])
    row("(not chosen)", "tf.image.resize bilinear, no antialias", "pixels",
        class_scores(backbone, result.head, plain))
    return rows, notes


if __name__ == "__main__":
    common.run_main(main)
