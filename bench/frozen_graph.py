"""Does oneDNN run a convolution faster when its filter is a constant of the graph?

TensorFlow's oneDNN convolution reorders its filter into the CPU's blocked layout on every call,
unless the filter is a constant of the graph, whose reordered copy it keeps. The service's
compiled backbone reads its filters from Keras variables, and the fine-tuned blocks take theirs
as arguments (`models.finetune.served_pass`): both pay the reorder on every pass. Measured here:
one 3×3 512→512 convolution at 14×14 (block5's shape at 224 px) with its filter as an argument
and as a constant, at batch 1 and 8, in bfloat16 and float32; then the whole backbone at 224 px,
batch 8 and 32, compiled as the service compiles it against the same function with its
variables frozen into constants (`convert_variables_to_constants_v2`), passes alternated.
Random weights (the speed does not depend on them). Prints; writes nothing.

    python -m bench.frozen_graph
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf


def per_call_ms(function, argument, calls: int) -> float:
    for _ in range(3):
        function(argument).numpy()
    started = time.perf_counter()
    for _ in range(calls):
        function(argument).numpy()
    return (time.perf_counter() - started) / calls * 1e3


def main() -> None:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    from models.backbone import load_backbone
    from models.precision import resolve

    rng = np.random.default_rng(0)
    filters = rng.normal(0, 0.01, (3, 3, 512, 512)).astype(np.float32)
    for dtype in (tf.bfloat16, tf.float32):
        kernel = tf.constant(filters, dtype)
        as_argument = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
        as_constant = tf.function(lambda x: tf.nn.conv2d(x, tf.constant(filters, dtype), 1, "SAME"))
        for batch in (1, 8):
            x = tf.constant(rng.random((batch, 14, 14, 512)), dtype)
            argument = per_call_ms(lambda v: as_argument(v, kernel), x, 50)
            constant = per_call_ms(as_constant, x, 50)
            print(f"conv 512→512 at 14×14, {dtype.name}, batch {batch}: filter as argument "
                  f"{argument:.2f} ms, as constant {constant:.2f} ms ({constant / argument:.2f}×)",
                  flush=True)

    backbone = load_backbone("random", 224, precision=resolve("auto"))
    concrete = backbone._compiled.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    for batch in (8, 32):
        images = tf.constant(rng.integers(0, 255, (batch, 224, 224, 3)), tf.float32)
        times = {"variables": [], "constants": []}
        for _ in range(3):
            times["variables"].append(per_call_ms(concrete, images, 5))
            times["constants"].append(per_call_ms(lambda v: frozen(v)[0], images, 5))
        variables, constants = (float(np.median(times[k])) for k in ("variables", "constants"))
        print(f"backbone 224 px, {backbone.precision}, batch {batch}: variables "
              f"{batch / variables * 1e3:.1f} images/s, frozen constants "
              f"{batch / constants * 1e3:.1f} images/s ({variables / constants:.2f}×)", flush=True)


if __name__ == "__main__":
    main()
