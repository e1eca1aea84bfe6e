"""Training speed and accuracy, in process: Headstart's training against the Keras
transfer-learning guide's recipe, on the same data, backbone weights and validation split.

(a) Headstart: `models.training.train_classifier` with the default `TrainingConfig()` (cached
    features of the original and augmented views, head picked by validation loss), tested with
    `models.prediction.class_scores`.
(b) The Keras guide, as BASELINES.md describes it: RandomFlip("horizontal") + RandomRotation(0.1)
    + RandomTranslation(0.1, 0.1) → `vgg16.preprocess_input` → frozen VGG16 base (same weights)
    → GlobalAveragePooling2D → Dropout(0.2) → Dense softmax; Adam 1e-3, batch 32,
    EarlyStopping(val_loss, patience 5, restore best weights), `model.fit` on in-memory arrays.

Wall time runs from encoded image bytes (already read from disk) to a trained model: decoding,
feature extraction and head training for Headstart; decoding, building and fitting for the guide.
Loading the backbone weights is outside both (the service loads them once at start).

    python -m bench.train_speed --write
    python -m bench.train_speed --weights random --image-size 32 --limit-per-label 4 \
        --datasets hymenoptera --max-epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.common import BenchError, Split  # noqa: E402

GUIDE_PATIENCE = 5
GUIDE_BATCH_SIZE = 32
GUIDE_LEARNING_RATE = 1e-3
GUIDE_VALIDATION_SPLIT = 0.2
DEFAULT_MAX_EPOCHS = 50
SEED = 0
PREDICT_BATCH = 32


@dataclass
class Outcome:
    """One recipe trained and tested."""

    recipe: str
    wall_s: float
    epochs: int                    # epochs run by the model that was kept
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    d: int                         # trainable parameters
    m_train: int                   # training images (before augmentation)
    m_validation: int
    note: str = ""


@dataclass
class Data:
    """A split read into memory: encoded bytes and label indices."""

    label_names: list[str]
    train_bytes: list[bytes]
    train_labels: np.ndarray
    test_bytes: list[bytes]
    test_labels: np.ndarray
    skipped: list[str]


def read_data(split: Split) -> Data:
    """Reads the files (outside the timed part); drops files the service would skip at upload."""
    from models.preprocessing import ImageDecodeError, decode_image

    names = split.labels
    index = {label: i for i, label in enumerate(names)}
    skipped = []

    def usable(examples):
        data, labels = [], []
        for label, path in examples:
            content = path.read_bytes()
            try:
                decode_image(content)
            except ImageDecodeError as error:
                skipped.append(f"{path.name}: {error.reason}")
                continue
            data.append(content)
            labels.append(index[label])
        return data, np.array(labels, dtype=int)

    train_bytes, train_labels = usable(split.train)
    test_bytes, test_labels = usable(split.test)
    return Data(names, train_bytes, train_labels, test_bytes, test_labels, skipped)


def decode_all(images: list[bytes], size: int) -> np.ndarray:
    """uint8 (n, size, size, 3) through the one decode path of training and serving."""
    from models.preprocessing import load_image

    return np.stack([load_image(data, size) for data in images])


# ---------------------------------------------------------------- (a) Headstart


def run_headstart(data: Data, backbone) -> Outcome:
    from models.heads import trainable_parameters
    from models.prediction import class_scores
    from models.training import TrainingConfig, train_classifier

    config = TrainingConfig()
    stage = {"last": None}

    def on_progress(progress) -> None:
        key = (progress.stage, progress.candidate)
        if key != stage["last"]:
            stage["last"] = key
            print(f"  headstart: {progress.stage}"
                  + (f" head {progress.candidate}" if progress.candidate else ""), file=sys.stderr)

    started = time.perf_counter()
    result = train_classifier(data.train_bytes, data.train_labels, data.label_names, backbone,
                              config, on_progress=on_progress)
    wall = time.perf_counter() - started

    pixels = decode_all(data.test_bytes, backbone.image_size)
    scores = np.concatenate([class_scores(backbone, result.head, pixels[i:i + PREDICT_BATCH])
                             for i in range(0, len(pixels), PREDICT_BATCH)])
    report = result.report
    timings = report["timings_s"]
    return Outcome(
        recipe="Headstart (TrainingConfig defaults)", wall_s=wall,
        epochs=len(report["history"]), best_epoch=report["best_epoch"],
        val_accuracy=report["validation"]["accuracy"],
        test_accuracy=float((scores.argmax(axis=1) == data.test_labels).mean()),
        d=trainable_parameters(result.head), m_train=report["m"]["train"],
        m_validation=report["m"]["validation"],
        note=(f"views {config.augmentation.views}, head {_head(report['head'])}; "
              f"{sum(c['epochs'] for c in report['selection']['candidates'])} epochs over "
              f"{len(report['selection']['candidates'])} candidates × "
              f"{report['selection']['k']} folds; decode {timings['decode']:.1f} s + "
              f"features {timings['features']:.1f} s + selection {timings['selection']:.1f} s + "
              f"refit {timings['head']:.1f} s"))


def _head(spec: dict) -> str:
    kind = f"{spec['hidden_units']} hidden" if spec["hidden_units"] else "linear"
    return f"{kind} l2 {spec['l2']:g}"


# ---------------------------------------------------------------- (b) the Keras guide


def build_guide_model(base_weights: list[np.ndarray], image_size: int, num_classes: int):
    """The guide's model around a frozen VGG16 base holding `base_weights`."""
    import keras

    base = keras.applications.VGG16(include_top=False, weights=None,
                                    input_shape=(image_size, image_size, 3))
    base.set_weights(base_weights)
    base.trainable = False
    augmentation = keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.1),
        keras.layers.RandomTranslation(0.1, 0.1),
    ], name="data_augmentation")
    inputs = keras.Input((image_size, image_size, 3))
    x = augmentation(inputs)
    x = keras.applications.vgg16.preprocess_input(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="keras_guide")
    model.compile(optimizer=keras.optimizers.Adam(GUIDE_LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_guide(data: Data, backbone, max_epochs: int) -> Outcome:
    import keras

    from models.heads import trainable_parameters
    from models.training import stratified_split

    size = backbone.image_size
    base_weights = backbone.model.get_weights()  # pooling has no weights: same list as the base
    keras.utils.set_random_seed(SEED)
    train_idx, val_idx = stratified_split(data.train_labels, GUIDE_VALIDATION_SPLIT, SEED)

    class EpochLine(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            print(f"  keras guide: epoch {epoch + 1}/{max_epochs} loss {logs.get('loss', 0):.4f} "
                  f"val_loss {logs.get('val_loss', 0):.4f} "
                  f"val_accuracy {logs.get('val_accuracy', 0):.3f}", file=sys.stderr)

    started = time.perf_counter()
    pixels = decode_all(data.train_bytes, size).astype(np.float32)
    model = build_guide_model(base_weights, size, len(data.label_names))
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=GUIDE_PATIENCE,
                                            restore_best_weights=True)
    history = model.fit(pixels[train_idx], data.train_labels[train_idx],
                        validation_data=(pixels[val_idx], data.train_labels[val_idx]),
                        epochs=max_epochs, batch_size=GUIDE_BATCH_SIZE, shuffle=True, verbose=0,
                        callbacks=[stopper, EpochLine()]).history
    wall = time.perf_counter() - started

    best = int(np.argmin(history["val_loss"]))
    test_pixels = decode_all(data.test_bytes, size).astype(np.float32)
    # NB: predict_on_batch, not predict/evaluate: BASELINES.md saw those run ~1.7× slower on CPU.
    scores = np.concatenate([np.asarray(model.predict_on_batch(test_pixels[i:i + PREDICT_BATCH]))
                             for i in range(0, len(test_pixels), PREDICT_BATCH)])
    epochs = len(history["loss"])
    return Outcome(
        recipe="Keras guide (BASELINES.md)", wall_s=wall, epochs=epochs, best_epoch=best + 1,
        val_accuracy=float(history["val_accuracy"][best]),
        test_accuracy=float((scores.argmax(axis=1) == data.test_labels).mean()),
        d=trainable_parameters(model), m_train=len(train_idx), m_validation=len(val_idx),
        note=("stopped early" if epochs < max_epochs else f"hit max epochs ({max_epochs})")
        + f"; decode + fit, batch {GUIDE_BATCH_SIZE}")


# ---------------------------------------------------------------- main


HEADERS = ["dataset", "px", "recipe", "m train/val", "test n", "d", "best/epochs", "val acc",
           "test acc", "wall s", "speed-up", "notes"]


def rows(split: Split, size: int, data: Data, headstart: Outcome, guide: Outcome) -> list[list]:
    out = []
    for outcome in (headstart, guide):
        speedup = guide.wall_s / headstart.wall_s if outcome is headstart else 1.0
        out.append([split.name, size, outcome.recipe,
                    f"{outcome.m_train}/{outcome.m_validation}", len(data.test_labels), outcome.d,
                    f"{outcome.best_epoch}/{outcome.epochs}", f"{outcome.val_accuracy:.3f}",
                    f"{outcome.test_accuracy:.3f}", f"{outcome.wall_s:.1f}", f"{speedup:.1f}×",
                    outcome.note])
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--max-epochs", type=int, default=DEFAULT_MAX_EPOCHS, metavar="N",
                        help="epoch limit of the Keras guide's fit (default %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    if args.max_epochs < 1:
        raise BenchError(f"--max-epochs must be at least 1. Received: {args.max_epochs}")

    from models.backbone import load_backbone

    all_rows = []
    with tempfile.TemporaryDirectory(prefix="headstart-bench-"):
        for name in common.dataset_names(args.datasets):
            split = common.load_split(name, shared, args.limit_per_label)
            size = args.image_size or split.image_size
            data = read_data(split)
            print(f"{split.description}: {len(data.train_bytes)} train, {len(data.test_bytes)} "
                  f"test images, {size} px" + (f"; skipped {data.skipped}" if data.skipped else ""),
                  file=sys.stderr)
            backbone = load_backbone(weights, size)
            backbone.warm_up()
            headstart = run_headstart(data, backbone)
            print(f"  headstart: {headstart.wall_s:.1f} s, test accuracy "
                  f"{headstart.test_accuracy:.3f}", file=sys.stderr)
            guide = run_guide(data, backbone, args.max_epochs)
            print(f"  keras guide: {guide.wall_s:.1f} s, test accuracy {guide.test_accuracy:.3f}",
                  file=sys.stderr)
            table_rows = rows(split, size, data, headstart, guide)
            all_rows += table_rows
            if args.write:
                title = f"train speed: {split.name} ({size} px)"
                if args.max_epochs != DEFAULT_MAX_EPOCHS:
                    title += f", guide max {args.max_epochs} epochs"
                extra = {"data": f"{split.description}; wall time from encoded bytes in memory "
                                 "to a trained model; backbone loading excluded",
                         "weights": weights}
                common.write_section(title, common.section(
                    title, common.markdown_table(HEADERS, table_rows), extra))
    print(common.markdown_table(HEADERS, all_rows))


if __name__ == "__main__":
    common.run_main(main)
