"""Trust as the product wires it: `models.training.train_on_features` (the default options: head
"auto" by 5-fold cross-validation, refit on every image, then `trust.assess` on the out-of-fold
scores), its stored trust applied to held-out test images and to the other dataset's images.

bench/trust.py chose the pieces on a train/validation split; the product has no held-out split
(every image trains the served head and is validated out of fold), so its temperature is fitted on
out-of-fold scores and its OOD threshold on the training images' leave-one-out distances alone.
This measures what that gives: test ECE and NLL before and after the temperature, the share of
test images kept and of other-dataset images rejected by the default (OOD only) and with a
target precision of 0.95, and what `health` reports of the training folders. Features come from
bench/trust_features.py's cache (computed there when missing).

    python -m bench.trust_wired --shared ../shared --write
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.trust_features import OTHER, cached_features, parse_arguments


def run_dataset(name: str, shared: Path, weights: str, cache: Path) -> str:
    from models import calibration, trust
    from models.options import TrainingOptions
    from models.training import TrainingConfig, train_on_features

    data = cached_features(name, shared, weights, cache)
    train, test, other = data["train"], data["test"], data["ood"]
    started = time.perf_counter()
    result = train_on_features(train.features, train.labels, train.label_names,
                               TrainingConfig.of(TrainingOptions()), paths=train.paths,
                               hashes=train.hashes)
    seconds = time.perf_counter() - started
    report = result.report
    print(f"{name}: trained in {seconds:.0f} s: {result.spec}", file=sys.stderr)
    raw = {part: np.asarray(result.head.predict_on_batch(features.features[:, 0]))
           for part, features in (("test", test), ("other", other))}
    fitted = result.trust
    logits = calibration.logits_from_probabilities(raw["test"])
    y = test.labels
    ece = (calibration.expected_calibration_error(calibration.softmax(logits), y),
           calibration.expected_calibration_error(calibration.softmax(logits, fitted.temperature),
                                                  y))
    nll = (calibration.negative_log_likelihood(logits, y),
           calibration.negative_log_likelihood(logits, y, fitted.temperature))
    strict = trust.fit_for_head(train.features[:, 0], train.labels,
                                result.selection.result.out_of_fold, target_precision=0.95)
    rows = []
    for what, chosen in (("default (OOD only)", fitted), ("target precision 0.95", strict)):
        decided = {part: trust.decide(chosen, features.features[:, 0], raw[part])[1]
                   for part, features in (("test", test), ("other", other))}
        kept = np.array([not d.rejected for d in decided["test"]])
        right = np.array([d.label == label for d, label in zip(decided["test"], y)])
        rows.append([what, f"{chosen.threshold.threshold:.3f}", f"{kept.mean():.3f}",
                     f"{right[kept].mean():.3f}" if kept.any() else "n/a",
                     f"{np.mean([d.rejected for d in decided['other']]):.3f}"])
    health = report["health"]
    counts = health["counts"]
    body = "\n".join([
        f"Head {result.spec.as_dict()} by 5-fold cross-validation, refit on all "
        f"{len(train.labels)} images ({train.features.shape[1]} views each), "
        f"{seconds:.0f} s with trust and health ({report['timings_s']['trust']:.1f} s of it); "
        f"{len(y)} test images; {len(other.labels)} {OTHER[name]} images as the "
        "out-of-distribution set.", "",
        common.markdown_table(
            ["T (out of fold)", "out-of-fold ECE before → after", "test ECE before → after",
             "test NLL before → after", "OOD threshold", "OOD state bytes"],
            [[f"{fitted.temperature:.3f}",
              f"{report['calibration']['ece_before']:.3f} → {report['calibration']['ece_after']:.3f}",
              f"{ece[0]:.3f} → {ece[1]:.3f}", f"{nll[0]:.3f} → {nll[1]:.3f}",
              f"{fitted.detector.threshold:.4f}", fitted.detector.nbytes]]), "",
        common.markdown_table(["rejection", "threshold", "test kept", "accuracy of the kept",
                               f"{OTHER[name]} rejected"], rows), "",
        f"Health of the training folders: {counts['duplicates']} exact duplicate groups, "
        f"{counts['near_duplicates']} near-duplicate pairs ({counts['across_split']} across "
        f"folds), {counts['suspected_mislabels']} suspected mislabels, imbalance ratio "
        f"{health['imbalance']['ratio']}; warnings: {len(health['warnings'])}.",
    ])
    return common.section(f"trust (wired): {name}", body, {"weights": weights})


def main(argv=None) -> None:
    args, shared, weights, cache = parse_arguments("python -m bench.trust_wired",
                                                   __doc__.split("\n\n")[0], argv)
    for name in common.dataset_names(args.datasets):
        text = run_dataset(name, shared, weights, cache)
        print(text)
        if args.write:
            common.write_section(text.splitlines()[0][3:], text)


if __name__ == "__main__":
    common.run_main(main)
