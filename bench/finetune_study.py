"""Why fine-tuning does not pay on these sets (issue 14), in process on one validation fold.

For each epoch count E, block5 and a warm-started linear head are fine-tuned for exactly E epochs
on four folds' images (`models.finetune.fine_tune` without validation, views 0), then the fifth
fold is scored two ways: by the head trained with the blocks, and by a head re-solved exactly
(the same L2, re-standardised) on the fine-tuned blocks' features. Also: the training loss, the
largest relative shift ‖w − w⁰‖/‖w⁰‖ and the mean feature norm. If the blocks learned something
that generalises, the re-solved head would beat the frozen one on the held-out fold; if they
memorise the training images, the training loss falls to zero while both validation losses stay
or rise.

    python -m bench.finetune_study --shared ../shared --write
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from unittest import mock

import numpy as np

from bench import common

HEADING = "Fine-tuning study: what block5 learns from {dataset} (224 px, views 0, fold 1 of 5)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, ("hymenoptera", "flowers5"))
    parser.add_argument("--l2-sp", default="0.01,100", help="comma-separated α values")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="Adam's η")
    parser.add_argument("--epochs", default="1,2,4,8", help="comma-separated epoch counts")
    parser.add_argument("--activation-shift", type=int, default=0, metavar="CELLS",
                        help="augment while fine-tuning: flip each training row's cached "
                             "activations left-right with probability 1/2 and shift them by up "
                             "to CELLS cells (reflected at the border); 0: off (the product)")
    return parser.parse_args(argv)


def augmented_features(shift: int):
    """`UpperBlocks.features` that flips and shifts its input when training: an augmentation of
    the cached activations, which fine-tuning's views cannot add without more backbone passes."""
    import tensorflow as tf

    from models.finetune import UpperBlocks

    plain = UpperBlocks.features

    def augment(x):
        flipped = tf.random.uniform((tf.shape(x)[0], 1, 1, 1)) < 0.5
        x = tf.where(flipped, tf.reverse(x, [2]), x)
        height, width = x.shape[1], x.shape[2]
        padded = tf.pad(x, [[0, 0], [shift, shift], [shift, shift], [0, 0]], mode="REFLECT")

        def crop(row):
            top, left = tf.unstack(tf.random.uniform((2,), 0, 2 * shift + 1, tf.int32))
            return row[top:top + height, left:left + width]
        return tf.map_fn(crop, padded)

    def features(self, activations, training: bool = False):
        return plain(self, augment(activations) if training else activations, training)
    return features


def study(name: str, shared, weights: str, args: argparse.Namespace) -> str:
    import tensorflow as tf

    from bench.train_speed import read_data
    from models import fitting
    from models.augmentation import Augmentation
    from models.backbone import load_backbone
    from models.finetune import (FineTuneConfig, UpperBlocks, cache_activations, fine_tune,
                                 pretrained_weights)
    from models.options import HeadOptions, TrainingConfig, TrainingOptions
    from models.precision import resolve
    from models.preprocessing import load_image
    from models.splits import stratified_folds
    from models.training import train_on_features

    size = args.image_size or 224
    backbone = load_backbone(weights, size, precision=resolve("auto"))
    data = read_data(common.load_split(name, shared, args.limit_per_label))
    labels, k = data.train_labels, len(data.label_names)
    images = np.stack([load_image(content, size) for content in data.train_bytes])
    activations = cache_activations(images, backbone, 1, views=0, augmentation=Augmentation(),
                                    rng=np.random.default_rng(0)).array[:, 0]
    folds = stratified_folds(labels, 5, seed=0)
    train, held = folds != 0, folds == 0

    def scored(probabilities) -> str:
        y = labels[held]
        loss = -np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1)).mean()
        return f"{loss:.4f} / {(probabilities.argmax(1) == y).mean():.3f}"

    def exact(features, spec):
        return fitting.fit_head(spec, fitting.Fold(features[train], labels[train],
                                                   features[held], labels[held]), k,
                                TrainingConfig(), build=True)

    pretrained = UpperBlocks(1, activations.shape[1:], pretrained_weights(backbone, 1),
                             backbone.precision)
    frozen_features = np.concatenate([
        pretrained.features(tf.constant(activations[i:i + 32])).numpy()
        for i in range(0, len(activations), 32)])
    # The head the frozen stage would choose on these images (views 0), as the warm start.
    config = TrainingConfig.of(TrainingOptions(augmentation={"views": 0}))
    chosen = train_on_features(frozen_features[train][:, None], labels[train],
                               data.label_names, config).report["head"]
    spec = HeadOptions(**chosen)
    warm = exact(frozen_features, spec)
    fitted = np.asarray(warm.model(frozen_features[train]), np.float64)
    y = labels[train]
    warm_loss = -np.log(np.clip(fitted[np.arange(len(y)), y], 1e-7, 1)).mean()
    rows = [["frozen (the warm start)", "—", 0, scored(warm.val_probabilities), "—",
             f"{warm_loss:.3f}", "—", f"{np.linalg.norm(frozen_features, axis=1).mean():.0f}",
             "—"]]
    for alpha in (float(a) for a in args.l2_sp.split(",")):
        for epochs in (int(e) for e in args.epochs.split(",")):
            started = time.perf_counter()
            with (mock.patch.object(UpperBlocks, "features",
                                    augmented_features(args.activation_shift))
                  if args.activation_shift else contextlib.nullcontext()):
                result = fine_tune(activations[train], labels[train], None, None, warm.model,
                                   backbone, FineTuneConfig(blocks=1, l2_sp=alpha,
                                                            learning_rate=args.learning_rate,
                                                            max_epochs=epochs))
            served = UpperBlocks(1, activations.shape[1:], result.upper.weights(),
                                 backbone.precision).served()
            features = np.concatenate([served.predict_features(activations[i:i + 32])
                                       for i in range(0, len(activations), 32)])
            co_trained = np.asarray(result.head(features[held]))
            resolved = exact(features, spec).val_probabilities
            rows.append([
                "block5", f"{alpha:g}", epochs, scored(co_trained), scored(resolved),
                f"{result.history[-1]['loss']:.3f}",
                f"{max(result.relative_shift.values()):.2%}",
                f"{np.linalg.norm(features, axis=1).mean():.0f}",
                f"{time.perf_counter() - started:.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    table = common.markdown_table(
        ["model", "α", "epochs", "held-out loss / accuracy (its head)",
         "held-out loss / accuracy (head re-solved)", "train loss", "largest shift",
         "mean feature norm", "s"], rows)
    body = (f"- command: `{common.command_line()}`\n"
            f"- machine: {', '.join(f'{k} {v}' for k, v in common.machine().items())}\n"
            f"- {int(train.sum())} training images (folds 2-5), {int(held.sum())} held out "
            f"(fold 1); head {chosen} (cross-validated on the training folds), η "
            f"{args.learning_rate:g}, batch 32, {backbone.precision}"
            + (f"; training rows flipped and shifted by up to {args.activation_shift} cells of "
               "the cached activations" if args.activation_shift else "") + f"\n\n{table}")
    print(body)
    return body


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    for name in common.dataset_names(args.datasets):
        body = study(name, shared, weights, args)
        if args.write:
            split = common.load_split(name, shared, args.limit_per_label)
            heading = HEADING.format(dataset=split.description) + (
                f", activations flipped and shifted {args.activation_shift}"
                if args.activation_shift else "")
            common.write_section(heading, f"## {heading}\n\n{body}")


if __name__ == "__main__":
    common.run_main(main)
