"""How the head-selection rule and its alternatives do on the test images (issue 12), in process
on the features `bench.quality --cache-dir` caches.

For each dataset: every default candidate cross-validated once (`models.selection`), each
refitted on every training image and counted on the test images; which candidate the rule
chooses and which the alternatives would (the one-standard-error rule over every candidate with
the stronger L2 preferred, as before issue 12; the augmented candidates only; the rule without
its last step, the probe check, and that check on fold losses instead of per-image ones); the
chosen
candidate's k fold models averaged instead of refitted; its refit with L2 × (k−1)/k (the same
penalty per summed loss); with `--flip`, test-time averaging with the mirrored test image (a
second backbone pass per image); and the pipeline against the probe of `bench.probe`, paired on
the test images (exact McNemar). Nothing is written to RESULTS.md: the rule's numbers there come
from `bench.quality`; these are the reasons for the rule.

    python -m bench.selection_study --shared ../shared --cache-dir var/bench-cache --flip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import common
from bench.quality import QUALITY_DATASETS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.selection_study",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, datasets=QUALITY_DATASETS)
    parser.add_argument("--cache-dir", default="var/bench-cache", metavar="DIR",
                        help="the features cache of bench.quality (default %(default)s)")
    parser.add_argument("--flip", action="store_true",
                        help="also test-time flip averaging (runs the backbone on the test images)")
    return parser.parse_args(argv)


def old_rule(candidates, feature_dim: int, num_classes: int) -> int:
    """Before issue 12: the smallest (fewer parameters, then stronger L2) within one SE."""
    from models.selection import LOSS_RESOLUTION

    best = min(candidates, key=lambda c: c.loss_mean)
    threshold = best.loss_mean + max(best.loss_se, LOSS_RESOLUTION)
    within = [i for i, c in enumerate(candidates) if c.loss_mean <= threshold]
    return min(within, key=lambda i: candidates[i].spec.size_key(feature_dim, num_classes))


def probe_on_folds(candidates, points: list[int]) -> int:
    """The probe check on the k fold losses instead of the per-image ones: the probe unless the
    augmented linear point beats it by more than one paired standard error over folds."""
    linear = [i for i in points if not candidates[i].spec.hidden_units]
    probe = next(i for i in linear if candidates[i].trained_on == "original")
    augmented = next(i for i in linear if candidates[i].trained_on == "augmented")
    difference = candidates[probe].fold_losses - candidates[augmented].fold_losses
    paired_se = difference.std(ddof=1) / np.sqrt(len(difference))
    return augmented if difference.mean() > paired_se else probe


def study(name: str, split, backbone, args) -> None:
    from bench import cache as cache_lib
    from bench import probe as probe_lib
    from bench.precision import mcnemar
    from bench.train_speed import read_data
    from models import fitting
    from models.evaluation import cross_entropy
    from models.logistic import Standardizer, fit_logistic
    from models.options import TrainingConfig
    from models.preprocessing import load_image
    from models.selection import (between_paths, choose, cross_validate, lowest_along_paths,
                                  rows_comparison, training_rows)
    from models.splits import fold_count, stratified_folds

    config = TrainingConfig()
    data = read_data(split)
    features = cache_lib.load_or_extract(name, data, backbone, config, Path(args.cache_dir))
    x, y, test, truth = features.train, data.train_labels, features.test, data.test_labels
    classes, dim = len(data.label_names), x.shape[-1]
    k = fold_count(y, config.validation_split)
    folds = stratified_folds(y, k, config.seed)
    selection = cross_validate(config.heads, x, y, folds, classes, config)
    candidates = selection.candidates

    def refit(candidate, l2_scale: float = 1.0) -> np.ndarray:
        spec = candidate.spec.model_copy(update={"l2": candidate.spec.l2 * l2_scale})
        fit = fitting.fit_head(spec, fitting.Fold(*training_rows(candidate.candidate, x, y)),
                               classes, config, epochs=candidate.best_epoch, build=True)
        return fit.model

    models = [refit(c) for c in candidates]
    scores = [np.asarray(model.predict_on_batch(test)) for model in models]
    correct = [int((s.argmax(axis=1) == truth).sum()) for s in scores]
    print(f"== {name}: {len(y)} training images, {len(truth)} test images, k = {k}")
    for i, c in enumerate(candidates):
        kind = f"{c.spec.hidden_units} hidden" if c.spec.hidden_units else "linear"
        print(f"  {i:2d} {kind:10s} {c.trained_on:9s} l2 {c.spec.l2:<7g} cv loss "
              f"{c.loss_mean:.4f} ± {c.loss_se:.4f}  cv acc {c.accuracy_mean:.3f}  test "
              f"{correct[i]}/{len(truth)}  {c.seconds:.1f} s")
    points = lowest_along_paths(candidates)
    chosen = choose(candidates, dim, classes)
    augmented = [i for i, c in enumerate(candidates) if c.trained_on == "augmented"]
    rules = {
        "the rule (lowest along each path, one SE between paths, the probe check)": chosen,
        "without the probe check": between_paths(candidates, dim, classes),
        "the probe check on fold losses": probe_on_folds(candidates, points),
        "the rule, augmented candidates only":
            augmented[choose([candidates[i] for i in augmented], dim, classes)],
        "before issue 12 (one SE over augmented candidates, stronger L2 first)":
            augmented[old_rule([candidates[i] for i in augmented], dim, classes)],
    }
    comparison = rows_comparison(candidates, between_paths(candidates, dim, classes))
    if comparison:
        print(f"  probe check: views gain {comparison.gain:+.4f} per image (SE "
              f"{comparison.gain_se:.4f}): {'earned' if comparison.earned else 'not earned'}")
    print(f"  path points {points}")
    for rule, index in rules.items():
        print(f"  {rule}: candidate {index}, test {correct[index]}/{len(truth)}")

    best = candidates[chosen]
    averaged = np.mean([
        fitting.fit_head(best.spec, fitting.Fold(
            *training_rows(best.candidate, x[folds != f], y[folds != f]), test, truth),
            classes, config).val_probabilities for f in range(k)], axis=0)
    scaled = np.asarray(refit(best, (k - 1) / k).predict_on_batch(test))
    print(f"  chosen, {k} fold models averaged: test {(averaged.argmax(1) == truth).sum()} "
          f"(loss {cross_entropy(averaged, truth):.4f} vs refit "
          f"{cross_entropy(scores[chosen], truth):.4f})")
    print(f"  chosen, refit with L2 x {k - 1}/{k}: test {(scaled.argmax(1) == truth).sum()}")
    if args.flip:
        mirrored = np.concatenate([
            backbone.features(np.stack([load_image(content, backbone.image_size)[:, ::-1]
                                        for content in data.test_bytes[i:i + 32]]))
            for i in range(0, len(truth), 32)])
        flipped = (scores[chosen] + np.asarray(models[chosen].predict_on_batch(mirrored))) / 2
        print(f"  chosen, test-time flip averaging: test {(flipped.argmax(1) == truth).sum()}")

    probe = probe_lib.probe(x[:, 0], y, test, truth, classes)[0]  # C by cv loss
    standardizer = Standardizer.fit(x[:, 0])
    z = standardizer(x[:, 0])
    solution = fit_logistic(z, y, classes, 1 / (2 * probe.c * len(z)))
    probe_right = solution.probabilities(standardizer(test)).argmax(1) == truth
    pipeline_right = scores[chosen].argmax(1) == truth
    only_pipeline, only_probe, p = mcnemar(pipeline_right, probe_right)
    print(f"  pipeline {pipeline_right.sum()} vs probe (C {probe.c:g} by cv loss) "
          f"{probe_right.sum()}: only the pipeline right {only_pipeline}, only the probe "
          f"{only_probe}, exact McNemar p = {p:.2f}")
    sys.stdout.flush()


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    for split, backbone in common.splits_with_backbones(args, shared, weights):
        study(split.name, split, backbone, args)


if __name__ == "__main__":
    common.run_main(main)
