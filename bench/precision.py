"""The accuracy gate of the automatic precision: test accuracy and speed per compute precision.

For each dataset and each precision (float32, mixed_bfloat16, and mixed_float16 when a GPU is
present), in process: train a classifier with the product's defaults (`TrainingConfig()`: 4
augmented views, the automatic head) on that precision's features, then classify the test split
through a backbone of the same precision, as the service serves it (a classifier is served in
the precision it was trained in). Also every head on every precision's test features (what serving
through a backbone of another precision would give), and, interleaved in one loop so the
machine's drift and its neighbours' load hit both alike, the backbone's images/s per precision
(batch 16 at the dataset's size) and a 2048² matmul's GFLOP/s: the confirmation that this
machine's flags stand for (models/precision.py chooses by the flags).

The gate: bfloat16 stays the automatic choice only where, on every dataset, its test accuracy is
at most 0.5 points below float32's, or below by less than the benchmark's standard error (of the
float32 test accuracy, sqrt(p(1-p)/n)) with no significant paired difference (exact McNemar test
on the test images only one of the two gets right, p >= 0.05). The report shows both, the paired
standard error of the difference, and the discordant counts. It records the CPU's flags and the
automatic choice on this machine.

    python -m bench.precision --image-size 224 --write
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

from bench import common
from bench.train_speed import PREDICT_BATCH, decode_all, read_data

GATE_POINTS = 0.5
GATE_P = 0.05
SPEED_BATCH = 16


def backbones(weights: str, size: int, precisions: list[str]) -> dict:
    from models.backbone import load_backbone

    loaded = {}
    for precision in precisions:
        loaded[precision] = load_backbone(weights, size, precision=precision)
        loaded[precision].warm_up((1, SPEED_BATCH))
    return loaded


def speed(models: dict, size: int, repetitions: int) -> dict[str, dict[str, float]]:
    """Backbone images/s (batch SPEED_BATCH) and matmul GFLOP/s per precision: medians over
    `repetitions` rounds, each round timing every precision once, one after the other."""
    import tensorflow as tf

    batch = np.random.default_rng(0).integers(0, 256, (SPEED_BATCH, size, size, 3)).astype(
        np.uint8)
    n = 2048
    matrices = {p: tf.cast(tf.random.stateless_normal((n, n), seed=(0, 1)),
                           "float32" if p == "float32" else p.removeprefix("mixed_"))
                for p in models}
    matmul = tf.function(lambda x: tf.matmul(x, x))
    for p in models:
        matmul(matrices[p]).numpy()
    times = {p: {"backbone": [], "matmul": []} for p in models}
    for _ in range(repetitions):
        for p, backbone in models.items():
            started = time.perf_counter()
            backbone.features(batch)
            times[p]["backbone"].append(time.perf_counter() - started)
            started = time.perf_counter()
            matmul(matrices[p]).numpy()
            times[p]["matmul"].append(time.perf_counter() - started)
    return {p: {"images_per_s": SPEED_BATCH / statistics.median(t["backbone"]),
                "gflops": 2 * n ** 3 / statistics.median(t["matmul"]) / 1e9}
            for p, t in times.items()}


def train(data, backbone):
    from models.training import TrainingConfig, train_classifier

    started = time.perf_counter()
    result = train_classifier(data.train_bytes, data.train_labels, data.label_names, backbone,
                              TrainingConfig())
    return result, time.perf_counter() - started


def test_features(models: dict, pixels: np.ndarray) -> dict[str, np.ndarray]:
    return {p: np.concatenate([backbone.features(pixels[i:i + PREDICT_BATCH])
                               for i in range(0, len(pixels), PREDICT_BATCH)])
            for p, backbone in models.items()}


def paired(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """(b − a accuracy, its standard error) on the same test images: from the images only one of
    the two gets right (the paired, McNemar-style estimate)."""
    n = len(correct_a)
    difference = correct_b.astype(float) - correct_a.astype(float)
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(images only a gets right, images only b gets right, two-sided exact McNemar p)."""
    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((correct_b & ~correct_a).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 0.5
    return only_a, only_b, min(1.0, 2 * tail)


def gate(change: float, accuracy_se: float, p: float) -> str:
    """"pass: …" or "FAIL: …" for a change of test accuracy against float32 (fractions)."""
    drop = -change * 100
    if drop <= GATE_POINTS:
        return f"pass: within {GATE_POINTS} points"
    if drop <= accuracy_se * 100 and p >= GATE_P:
        return (f"pass: {drop:.1f} points, within the standard error ({accuracy_se * 100:.1f}) "
                f"and not significant (McNemar p = {p:.2f})")
    return (f"FAIL: {drop:.1f} points below (standard error {accuracy_se * 100:.1f}, "
            f"McNemar p = {p:.2f})")


def describe(head: dict) -> str:
    shape = f"{head['hidden_units']} hidden" if head["hidden_units"] else "linear"
    return f"{shape}, l2 {head['l2']:g}"


def flags_summary() -> tuple[str, str]:
    from models.precision import BF16_CPU_FLAGS, read_cpu_flags, resolve

    flags = read_cpu_flags() or frozenset()
    shown = [f for f in ("avx2", "avx512f", *BF16_CPU_FLAGS, "amx_tile") if f in flags]
    choice = resolve("auto")
    return (", ".join(shown) or "none of avx2, avx512f, avx512_bf16, amx_bf16",
            f"{choice.policy} ({choice.reason})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--speed-repetitions", type=int, default=7,
                        help="interleaved rounds of the speed probe (default: %(default)s)")
    args = parser.parse_args(argv)
    shared, weights = common.prepare(args)

    import tensorflow as tf

    from models.backbone import device_name
    from models.prediction import apply_head

    precisions = ["float32", "mixed_bfloat16"]
    if tf.config.list_physical_devices("GPU"):
        precisions.append("mixed_float16")
    flags, auto = flags_summary()
    print(f"CPU flags: {flags}; auto: {auto}", file=sys.stderr)

    rows, cross_rows, speed_rows, verdicts, sizes = [], [], [], [], []
    for name in common.dataset_names(args.datasets):
        split = common.load_split(name, shared, args.limit_per_label)
        size = args.image_size or split.image_size
        sizes.append(f"{name} {size} px")
        data = read_data(split)
        models = backbones(weights, size, precisions)
        measured = speed(models, size, args.speed_repetitions)
        pixels = decode_all(data.test_bytes, size)
        served = test_features(models, pixels)
        heads, walls, correct = {}, {}, {}
        for precision in precisions:
            result, walls[precision] = train(data, models[precision])
            heads[precision] = result
            for features_of in precisions:
                scores = apply_head(result.head, served[features_of])
                correct[precision, features_of] = scores.argmax(axis=1) == data.test_labels
            print(f"{name} {precision}: {walls[precision]:.1f} s, test "
                  f"{correct[precision, precision].mean():.3f}", file=sys.stderr)
        reference = correct["float32", "float32"]
        n = len(reference)
        accuracy_se = math.sqrt(reference.mean() * (1 - reference.mean()) / n)
        for precision in precisions:
            own = correct[precision, precision]
            change, error = paired(reference, own)
            only_float32, only_own, p = mcnemar(reference, own)
            timings = heads[precision].report["timings_s"]
            rows.append([name, size, precision, f"{own.mean():.3f} ({int(own.sum())}/{n})",
                         f"{accuracy_se * 100:.1f}", f"{change * 100:+.1f}", f"{error * 100:.1f}",
                         f"{only_float32} / {only_own}", f"{p:.2f}",
                         describe(heads[precision].report["head"]),
                         f"{walls[precision]:.1f}", f"{timings['features']:.1f}"])
            if precision != "float32":
                verdicts.append(f"{name}: {precision} {change * 100:+.1f} points — "
                                f"{gate(change, accuracy_se, p)}")
            for features_of in precisions:
                if features_of != precision:
                    other = correct[precision, features_of]
                    cross_rows.append([name, precision, features_of,
                                       f"{other.mean():.3f}",
                                       f"{paired(own, other)[0] * 100:+.1f}"])
        base = measured["float32"]
        for precision in precisions:
            m = measured[precision]
            speed_rows.append([name, size, precision, f"{m['images_per_s']:.2f}",
                               f"{m['images_per_s'] / base['images_per_s']:.2f}",
                               f"{m['gflops']:.0f}", f"{m['gflops'] / base['gflops']:.2f}"])

    passed = all("— pass" in v for v in verdicts)
    table = common.markdown_table(
        ["dataset", "px", "precision", "test accuracy", "SE of float32's (points)",
         "change vs float32 (points)", "paired SE (points)", "only float32 / only this right",
         "McNemar p", "head", "training wall s", "features s"], rows)
    cross = common.markdown_table(
        ["dataset", "trained in", "served in", "test accuracy", "vs served as trained (points)"],
        cross_rows)
    speeds = common.markdown_table(
        ["dataset", "px", "precision", f"backbone images/s (batch {SPEED_BATCH})", "× float32",
         "matmul 2048² GFLOP/s", "× float32"], speed_rows)
    body = (f"CPU flags: {flags}. Automatic choice here: {auto}. Device: {device_name()}.\n\n"
            f"Gate (bfloat16 no more than {GATE_POINTS} points below float32, or less than the "
            f"standard error below with McNemar p >= {GATE_P}): {'; '.join(verdicts)}. "
            f"{'bfloat16 stays' if passed else 'bfloat16 must NOT stay'} the automatic choice "
            "on machines like this one.\n\n"
            f"{table}\n\nEach head on the other precision's test features (not a path the "
            f"service takes; it serves a classifier in the precision it was trained in):\n\n"
            f"{cross}\n\nSpeed, interleaved ({args.speed_repetitions} rounds, medians; "
            f"a shared machine):\n\n{speeds}\n")
    print(body)
    if args.write:
        heading = f"Precision gate: {', '.join(sizes)}, {device_name()}"
        common.write_section(heading, common.section(heading, body, {
            "data": "; ".join(common.load_split(n, shared).description
                              for n in common.dataset_names(args.datasets)) +
                    "; TrainingConfig() defaults (4 augmented views, automatic head), seed 0",
            "weights": weights}))


if __name__ == "__main__":
    common.run_main(main)
