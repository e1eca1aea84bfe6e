"""Loading and running a fine-tuned classifier's blocks for serving (224 px, block5).

`ServedBlocks` (the service's path: weights held in the compute dtype, one compiled pass shared
by every classifier, `models.finetune.served_pass`) against a per-classifier Keras model with
its own compiled function (the path before it): per new classifier, the time to build it and
its first call, then its steady call on 8 rows, passes alternated. Random weights; the
precision the service's "auto" picks here. Prints; writes nothing.

    python -m bench.served_blocks
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf


def main(classifiers: int = 4, rows: int = 8, calls: int = 30) -> None:
    from models.backbone import load_backbone
    from models.finetune import ServedBlocks, UpperBlocks, pretrained_weights
    from models.precision import resolve

    backbone = load_backbone("random", 224, precision=resolve("auto"))
    shape = backbone.activation_shape("block4_pool")
    weights = {name: tuple(np.asarray(w, np.float16) for w in pair)
               for name, pair in pretrained_weights(backbone, 1).items()}
    x = np.random.default_rng(0).random((rows, *shape)).astype(np.float16)

    def keras_path():
        blocks = UpperBlocks(1, shape, weights, backbone.precision)
        compiled = tf.function(lambda v: blocks.features(v), input_signature=[
            tf.TensorSpec((None, *shape), tf.float16)])
        return lambda v: compiled(tf.constant(v)).numpy()

    def served_path():
        return ServedBlocks(1, shape, weights, backbone.precision).predict_features

    steady = {}
    for name, make in (("per-classifier Keras model", keras_path),
                       ("ServedBlocks, shared pass", served_path)):
        for i in range(classifiers):
            started = time.perf_counter()
            run = make()
            built = time.perf_counter()
            run(x)
            first = time.perf_counter()
            print(f"{name}, classifier {i + 1}: build {(built - started) * 1e3:.0f} ms, first "
                  f"call {(first - built) * 1e3:.0f} ms", flush=True)
        steady[name] = run
    times = {name: [] for name in steady}
    for _ in range(calls):
        for name, run in steady.items():
            started = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"{name}: steady call on {rows} rows, median {np.median(values) * 1e3:.1f} ms "
              f"({backbone.precision})")


if __name__ == "__main__":
    main()
