"""Which compute precision the backbone runs in on this machine, and why.

`resolve(setting)` is the one entry point: the serving backbone, training workers and the
fine-tuning path all call it, so every process of a machine type makes the same choice.

    choice = resolve("auto")   # Choice("mixed_bfloat16", "auto: avx512_bf16, amx_bf16")
    with policy_scope(choice.policy):
        model = build_something()     # layers compute in bfloat16, variables stay float32

`auto` picks `mixed_bfloat16` where the device computes bfloat16 natively, float32 elsewhere:
- a GPU (the first one, where TensorFlow places the backbone) of compute capability 8.0 or more
  (Ampere and later: bfloat16 tensor cores). Older GPUs get float32: their fast path would be
  float16, which has a narrower range and has not passed the accuracy gate (bench/precision.py);
  `HEADSTART_PRECISION=mixed_float16` still forces it.
- a CPU whose /proc/cpuinfo flags include `avx512_bf16` (Cooper Lake, Sapphire Rapids, Zen 4 and
  later) or `amx_bf16` (Sapphire Rapids and later), with TensorFlow's oneDNN kernels on (they are
  what uses those instructions; with `TF_ENABLE_ONEDNN_OPTS=0` bfloat16 falls back to Eigen and
  measured no faster than float32). Without them bfloat16 is emulated: measured no faster on an
  AVX2-only CPU, and a little less accurate (bench/RESULTS.md).

Why flags and not a timed probe: the flags are free to read and deterministic, so every replica
on one node type makes the same choice (a classifier's head is only exact on features of the
precision it was trained in, and a process serving another precision needs a second backbone);
a probe of the real workload (a VGG16 pass at 224 px) costs seconds of every start, and on shared
or overcommitted VMs, whose speed drifts 10-20 % between minutes and under neighbours' load, it
would flip between replicas. A masked flag (some hypervisors hide AVX-512) gives float32, the
safe side. bench/precision.py times float32 against bfloat16 (a matmul and the backbone) on the
machine it runs on, as the confirmation the flags stand in for.

Mixed policies compute in 16 bits and keep float32 variables; oneDNN and cuDNN accumulate each
layer's bfloat16 products in float32 and round its output to bfloat16. The backbone casts the
layers it pools to float32 before pooling, so the spatial sums, the features and the heads are
float32 whatever the policy. For
fine-tuning, `mixed_bfloat16` is Keras's mixed policy as it is: bfloat16 compute, float32 master
weights, and optimizer state in the variables' dtype (float32); bfloat16 has float32's exponent
range, so no loss scaling is needed (Keras adds loss scaling by itself for `mixed_float16`).

Nothing here imports TensorFlow at import time, and nothing imports `service`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Keras dtype policies the backbone can run in.
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
#: What HEADSTART_PRECISION accepts.
SETTINGS = ("auto", *POLICIES)
#: CPU flags (as /proc/cpuinfo names them) meaning native bfloat16 arithmetic.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: NVIDIA GPUs from this compute capability on have bfloat16 tensor cores (Ampere).
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Choice:
    """A precision and why it was chosen, e.g. ("mixed_bfloat16", "auto: avx512_bf16")."""

    policy: str
    reason: str

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"precision must be one of {POLICIES}. Received: {self.policy!r}")

    @property
    def compute_dtype(self) -> str:
        """The dtype layers compute in: float32, bfloat16 or float16."""
        return self.policy.removeprefix("mixed_")


@dataclass(frozen=True)
class Gpu:
    """A visible GPU as TensorFlow describes it."""

    name: str
    compute_capability: tuple[int, int] | None = None


def cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    """The CPU feature flags of /proc/cpuinfo text: those every processor lists (x86 `flags`,
    arm64 `Features`), or None when the text has no such line."""
    per_processor = [frozenset(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                     if ":" in line and line.split(":", 1)[0].strip() in ("flags", "Features")]
    if not per_processor:
        return None
    return frozenset.intersection(*per_processor)


def read_cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """This machine's CPU flags, or None where /proc/cpuinfo is unreadable (not Linux)."""
    try:
        return cpu_flags(Path(path).read_text("utf-8", "replace"))
    except OSError:
        return None


def onednn_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether TensorFlow uses its oneDNN kernels on the CPU (the default on x86 Linux)."""
    return environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "off")


def choose(setting: str, *, cpu_flags: Iterable[str] | None, gpus: Iterable[Gpu] = (),
           onednn: bool = True) -> Choice:
    """The precision for `setting` on a device described by its CPU flags and GPUs.

    Args:
        setting: "auto" or one of POLICIES (which is then taken as it is).
        cpu_flags: the CPU's flags (see `cpu_flags`), or None when unknown.
        gpus: the visible GPUs, the one TensorFlow computes on first.
        onednn: whether TensorFlow's oneDNN CPU kernels are on.
    """
    if setting in POLICIES:
        return Choice(setting, "set explicitly")
    if setting != "auto":
        raise ValueError(f"precision must be one of {SETTINGS}. Received: {setting!r}")
    gpus = list(gpus)
    if gpus:
        gpu = gpus[0]
        capability = gpu.compute_capability
        if capability is None:
            return Choice("float32", f"auto: GPU {gpu.name} of unknown compute capability")
        shown = f"GPU {gpu.name}, compute capability {capability[0]}.{capability[1]}"
        if tuple(capability) >= BF16_MIN_COMPUTE_CAPABILITY:
            return Choice("mixed_bfloat16", f"auto: {shown}")
        return Choice("float32", f"auto: {shown}, below 8.0: no bfloat16 tensor cores")
    if cpu_flags is None:
        return Choice("float32", "auto: CPU flags unknown (no /proc/cpuinfo)")
    found = [flag for flag in BF16_CPU_FLAGS if flag in set(cpu_flags)]
    if not found:
        return Choice("float32", f"auto: no {' or '.join(BF16_CPU_FLAGS)} on this CPU")
    if not onednn:
        return Choice("float32", f"auto: {', '.join(found)}, but TF_ENABLE_ONEDNN_OPTS=0 turns "
                                 "off the kernels that use it")
    return Choice("mixed_bfloat16", f"auto: {', '.join(found)}")


def visible_gpus() -> list[Gpu]:
    """The GPUs TensorFlow sees, with their compute capability (imports TensorFlow)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(Gpu(details.get("device_name", device.name),
                        tuple(capability) if capability else None))
    return gpus


def resolve(setting: str = "auto", *, cpuinfo: str | Path = "/proc/cpuinfo",
            environ: Mapping[str, str] = os.environ) -> Choice:
    """The precision this process should compute in for `setting` (HEADSTART_PRECISION).

    An explicit policy is returned as it is, without looking at the device.
    """
    if setting in POLICIES:
        return choose(setting, cpu_flags=None)
    if setting != "auto":
        raise ValueError(f"precision must be one of {SETTINGS}. Received: {setting!r}")
    return choose(setting, cpu_flags=read_cpu_flags(cpuinfo), gpus=visible_gpus(),
                  onednn=onednn_enabled(environ))


_POLICY_LOCK = threading.RLock()


@contextmanager
def policy_scope(policy: str) -> Iterator[None]:
    """Builds the layers created inside it with the Keras dtype policy `policy`.

    For models whose constructors take no dtype (keras.applications). Keras 3 keeps its global
    policy per thread, so a build here does not change what other threads build; the lock also
    keeps two such builds from interleaving should a Keras version make it process-wide.
    """
    if policy not in POLICIES:
        raise ValueError(f"precision must be one of {POLICIES}. Received: {policy!r}")
    import keras

    with _POLICY_LOCK:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)
