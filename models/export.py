"""Exported classifiers: backbone, own blocks and head as one model from image to calibrated
scores, written as a TensorFlow SavedModel, a TFLite flatbuffer or an ONNX graph.

Every format computes what the service computes, in float32, with no converter in between that
could change it:

    pixels (N, H, W, 3), RGB 0-255, any H and W
      → resize to size × size: `preprocessing.resize_weights` built in the graph from H and W
        with the same integer formula, applied as two matrix products (rows, then columns)
      → VGG16 caffe preprocessing (RGB → BGR, minus the ImageNet mean)
      → the 13 convolutions and 5 poolings, pooled into the 2048 features of `backbone.FEATURES`
      → head: standardise → [hidden ReLU] → logits → softmax(logits / temperature).

The SavedModel also takes encoded bytes and decodes them in the graph the way
`preprocessing.decode_image` does for JPEG (the accurate integer DCT, which equals Pillow's, and
the EXIF orientation), PNG, GIF and BMP; what it cannot match is listed in `README_TEXT`.

Nothing user-supplied is ever part of a model file: every graph is built here from arrays (no
Lambda layers, no pickles, no custom objects); labels are data, in labels.json, written by the
caller. TensorFlow and onnx are imported inside the functions that need them, so importing this
module is cheap (the API process imports `FORMATS` before it forks).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from models import weights as vgg16_weights

#: The export formats, in the order the API lists them.
FORMATS = ("savedmodel", "tflite", "onnx")
#: The file (or folder) the model takes inside the export zip, per format.
MODEL_PATHS = {"savedmodel": "model/", "tflite": "model.tflite", "onnx": "model.onnx"}
#: keras.applications.vgg16.preprocess_input (caffe mode): subtracted after RGB → BGR.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: keras.backend.epsilon(): the floor of the head's standardisation divisor.
_EPSILON = 1e-7
ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # the IR of opset 17: runtimes from ONNX Runtime 1.11 on read it
#: What a caller hands each runtime.
INPUT, BYTES_INPUT, OUTPUT = "pixels", "image_bytes", "scores"


@dataclass(frozen=True)
class Dense:
    """One dense layer of a head: y = activation(x @ kernel + bias)."""

    kernel: np.ndarray  # float32 (inputs, units)
    bias: np.ndarray    # float32 (units,)
    activation: str     # "relu" or "linear"


@dataclass(frozen=True)
class ExportableClassifier:
    """Everything an exported model computes, as float32 arrays.

    Attributes:
        image_size: the backbone's input side.
        convs: the 13 VGG16 convolutions in order, (layer name, kernel HWIO, bias); a fine-tuned
            classifier's own blocks are already in place.
        mean, std: the head's standardisation, (features - mean) / std, each (feature_dim,).
        hidden: the head's hidden layers (ReLU), possibly none.
        logits: the head's last layer, without its softmax.
        temperature: logits are divided by it before the softmax (1: uncalibrated).
    """

    image_size: int
    convs: tuple[tuple[str, np.ndarray, np.ndarray], ...]
    mean: np.ndarray
    std: np.ndarray
    hidden: tuple[Dense, ...]
    logits: Dense
    temperature: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(self.logits.kernel.shape[1])

    def weights_fingerprint(self) -> str:
        """`models.weights.fingerprint` of the exported conv weights: the backbone's own for a
        frozen classifier; another one where the classifier has its own blocks."""
        return vgg16_weights.fingerprint([t for _, kernel, bias in self.convs
                                          for t in (kernel, bias)])


def from_keras(backbone_model, head, image_size: int, *, temperature: float | None = None,
               own_blocks: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
               ) -> ExportableClassifier:
    """Reads a classifier's arrays out of the Keras models the service runs.

    Args:
        backbone_model: the shared VGG16 (`Backbone.model`); its float32 weights are read
            whatever precision it computes in.
        head: the classifier's head (`heads.load_head`): standardisation, dropout, dense layers.
        image_size: the backbone's input side.
        temperature: the calibration temperature, when the classifier has one.
        own_blocks: a fine-tuned classifier's own conv weights, layer name → (kernel HWIO,
            bias); they replace the shared ones.

    Raises:
        ValueError: a head layer this module cannot express (it would not match the service).
    """
    own_blocks = dict(own_blocks or {})
    unknown = set(own_blocks) - set(vgg16_weights.CONV_LAYERS)
    if unknown:
        raise ValueError(f"own_blocks names layers VGG16 does not have: {sorted(unknown)}")
    convs = []
    for name in vgg16_weights.CONV_LAYERS:
        kernel, bias = own_blocks.get(name) or backbone_model.get_layer(name).get_weights()
        convs.append((name, _f32(kernel), _f32(bias)))
    mean = std = None
    dense: list[Dense] = []
    for layer in head.layers:
        kind = type(layer).__name__
        if kind in ("InputLayer", "Dropout"):  # dropout is the identity at inference
            continue
        if kind == "Normalization" and mean is None and not dense and not layer.invert:
            mean = _f32(layer.mean).reshape(-1)
            std = np.maximum(np.sqrt(_f32(layer.variance).reshape(-1)), np.float32(_EPSILON))
            continue
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if kind == "Dense" and activation in ("relu", "linear", "softmax"):
            kernel, bias = layer.get_weights()
            dense.append(Dense(_f32(kernel), _f32(bias), activation))
            continue
        raise ValueError(f"cannot export head layer {layer.name!r} ({kind}, activation "
                         f"{activation}): the exported model would not match the service")
    if mean is None or not dense or dense[-1].activation != "softmax" or \
            any(layer.activation != "relu" for layer in dense[:-1]):
        raise ValueError("a head must be standardisation, ReLU layers and a softmax layer; "
                         f"received layers {[type(layer).__name__ for layer in head.layers]}")
    temperature = 1.0 if temperature is None else float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive. Received: temperature={temperature}")
    last = dense[-1]
    return ExportableClassifier(image_size, tuple(convs), mean, std, tuple(dense[:-1]),
                                Dense(last.kernel, last.bias, "linear"), temperature)


def _f32(value) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value), dtype=np.float32)


def _pool_after(name: str) -> bool:
    """VGG16 pools at the end of each block: after block1_conv2, …, block5_conv3."""
    index = vgg16_weights.CONV_LAYERS.index(name)
    following = vgg16_weights.CONV_LAYERS[index + 1:index + 2]
    return not following or following[0].split("_")[0] != name.split("_")[0]


# ---------------------------------------------------------------- reference (numpy)


def reference_scores(model: ExportableClassifier, features: np.ndarray) -> np.ndarray:
    """The head's part in numpy: scores from backbone features (batch, feature_dim)."""
    x = (np.asarray(features, np.float32) - model.mean) / model.std
    for layer in model.hidden:
        x = np.maximum(x @ layer.kernel + layer.bias, 0)
    logits = (x @ model.logits.kernel + model.logits.bias) / np.float32(model.temperature)
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- TensorFlow


def _tf_resize_weights(in_size, out_size: int):
    """`preprocessing.resize_weights` in TensorFlow, for a size known only at run time."""
    import tensorflow as tf

    inputs = tf.range(in_size)
    outputs = tf.range(out_size)
    offset = (2 * inputs[None, :] + 1) * out_size - (2 * outputs[:, None] + 1) * in_size
    x = tf.cast(offset, tf.float32) / tf.cast(2 * tf.maximum(in_size, out_size), tf.float32)
    weights = tf.maximum(1.0 - tf.abs(x), 0.0)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def _tf_resize(pixels, size: int):
    """(N, H, W, 3) → (N, size, size, 3): rows, then columns, like `resize_pixels`."""
    import tensorflow as tf

    shape = tf.shape(pixels)
    batch, height, width = shape[0], shape[1], shape[2]
    rows = tf.matmul(_tf_resize_weights(height, size), tf.reshape(pixels, [batch, height, -1]))
    rows = tf.reshape(rows, [-1, width, 3])                       # (N·size, W, 3)
    both = tf.matmul(_tf_resize_weights(width, size), rows)       # (N·size, size, 3)
    return tf.reshape(both, [-1, size, size, 3])


def _exif_orientation(data):
    """The EXIF orientation (1-8) of a JPEG's first Exif APP1 segment, IFD0 tag 0x0112, as
    Pillow reads it; 1 when there is none or it cannot be read."""
    import tensorflow as tf

    # NB: the APP1 segment is at most 64 KiB and comes before the image data.
    head = tf.io.decode_raw(tf.strings.substr(data, 0, 1 << 17), tf.uint8)
    head = tf.concat([tf.cast(head, tf.int32), tf.zeros([16], tf.int32)], axis=0)
    size = tf.shape(head)[0] - 16

    def byte(index):
        inside = (index >= 0) & (index < size)
        return tf.where(inside, tf.gather(head, tf.clip_by_value(index, 0, size + 15)), -1)

    def u16(index, big):
        a, b = byte(index), byte(index + 1)
        value = tf.where(big, a * 256 + b, b * 256 + a)
        return tf.where((a < 0) | (b < 0), -1, value)

    def u32(index, big):
        high, low = u16(index, big), u16(index + 2, big)
        value = tf.where(big, high * 65536 + low, low * 65536 + high)
        return tf.where((high < 0) | (low < 0) | (value < 0), -1, value)

    exif = [ord(c) for c in "Exif\0\0"]

    def is_exif(position):
        found = tf.constant(True)
        for offset, expected in enumerate(exif):
            found &= byte(position + 4 + offset) == expected
        return found

    # Walk the segments from after SOI until Exif APP1 or the start of the scan.
    def walking(position, tiff, steps):
        return (tiff < 0) & (steps < 64) & (byte(position) == 0xFF) & \
            (byte(position + 1) != 0xDA) & (byte(position + 1) != 0xD9) & (byte(position + 3) >= 0)

    def step(position, tiff, steps):
        length = u16(position + 2, tf.constant(True))
        found = (byte(position + 1) == 0xE1) & is_exif(position)
        return position + 2 + length, tf.where(found, position + 10, tiff), steps + 1

    _, tiff, _ = tf.while_loop(walking, step, [tf.constant(2), tf.constant(-1), tf.constant(0)])
    big = (byte(tiff) == 0x4D) & (byte(tiff + 1) == 0x4D)
    little = (byte(tiff) == 0x49) & (byte(tiff + 1) == 0x49)
    ifd = tiff + u32(tiff + 4, big)
    count = tf.where((tiff >= 0) & (big | little) & (u32(tiff + 4, big) >= 8), u16(ifd, big), 0)

    def searching(k, orientation):
        return (k < tf.minimum(count, 256)) & (orientation < 0)

    def look(k, orientation):
        entry = ifd + 2 + 12 * k
        kind = u16(entry + 2, big)
        value = tf.where(kind == 3, u16(entry + 8, big),
                         tf.where(kind == 4, u32(entry + 8, big), 1))
        return k + 1, tf.where(u16(entry, big) == 0x0112, value, orientation)

    _, orientation = tf.while_loop(searching, look, [tf.constant(0), tf.constant(-1)])
    return tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)


def _orient(image, orientation):
    """Pillow's `ImageOps.exif_transpose` on an (H, W, 3) tensor."""
    import tensorflow as tf

    transposed = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,                                         # 1: as stored
        lambda: tf.reverse(image, [1]),                        # 2: FLIP_LEFT_RIGHT
        lambda: tf.reverse(image, [0, 1]),                     # 3: ROTATE_180
        lambda: tf.reverse(image, [0]),                        # 4: FLIP_TOP_BOTTOM
        lambda: transposed(image),                             # 5: TRANSPOSE
        lambda: transposed(tf.reverse(image, [0])),            # 6: ROTATE_270
        lambda: tf.reverse(transposed(image), [0, 1]),         # 7: TRANSVERSE
        lambda: tf.reverse(transposed(image), [0]),            # 8: ROTATE_90
    ]
    return tf.switch_case(orientation - 1, branches)


def _tf_decode(data):
    """Encoded bytes → (H, W, 3) float32, as `preprocessing.decode_image` for JPEG (accurate
    integer DCT, EXIF orientation), opaque PNG, GIF (first frame) and BMP."""
    import tensorflow as tf

    def jpeg():
        image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return _orient(image, _exif_orientation(data))

    def other():
        return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)


def tf_module(model: ExportableClassifier, *, decode: bool = True):
    """A `tf.Module` with two functions, both (…) → {"scores": float32 (N, num_classes)}:

    - `pixels(pixels)`: float32 (N, H, W, 3), RGB 0-255, any H and W;
    - `image_bytes(image_bytes)`: string (N,), each an encoded JPEG, PNG, GIF or BMP (with
      `decode`; else it is None).
    """
    import tensorflow as tf

    size = model.image_size

    class ExportedClassifier(tf.Module):
        def __init__(self):
            super().__init__(name="headstart_classifier")
            self.convs = [(tf.Variable(kernel, trainable=False, name=f"{name}_kernel"),
                           tf.Variable(bias, trainable=False, name=f"{name}_bias"))
                          for name, kernel, bias in model.convs]
            self.mean = tf.Variable(model.mean, trainable=False, name="head_mean")
            self.std = tf.Variable(model.std, trainable=False, name="head_std")
            self.dense = [(tf.Variable(layer.kernel, trainable=False, name=f"dense_{i}_kernel"),
                           tf.Variable(layer.bias, trainable=False, name=f"dense_{i}_bias"))
                          for i, layer in enumerate(model.hidden + (model.logits,))]
            self.temperature = tf.Variable(model.temperature, dtype=tf.float32,
                                           trainable=False, name="temperature")

        def scores(self, resized):
            x = tf.gather(resized, [2, 1, 0], axis=-1) + tf.constant(
                -np.array(CAFFE_MEAN_BGR), tf.float32)
            taps = {}
            for (name, _, _), (kernel, bias) in zip(model.convs, self.convs):
                x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
                taps[name] = x
                if _pool_after(name):
                    x = tf.nn.max_pool2d(x, 2, 2, "VALID")
                    taps[name.split("_")[0] + "_pool"] = x
            block5 = taps["block5_conv3"]
            x = tf.concat([tf.reduce_mean(taps["block4_pool"], axis=[1, 2]),
                           tf.reduce_mean(block5, axis=[1, 2]),
                           tf.reduce_max(block5, axis=[1, 2]),
                           tf.reduce_mean(taps["block5_pool"], axis=[1, 2])], axis=-1)
            x = (x - self.mean) / self.std
            for kernel, bias in self.dense[:-1]:
                x = tf.nn.relu(tf.matmul(x, kernel) + bias)
            kernel, bias = self.dense[-1]
            return {OUTPUT: tf.nn.softmax((tf.matmul(x, kernel) + bias) / self.temperature)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                     name=INPUT)])
        def pixels(self, pixels):
            return self.scores(_tf_resize(pixels, size))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        def image_bytes(self, image_bytes):
            resized = tf.map_fn(lambda data: _tf_resize(_tf_decode(data)[None], size)[0],
                                image_bytes,
                                fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return self.scores(resized)

    module = ExportedClassifier()
    if not decode:
        module.image_bytes = None
    return module


def write_savedmodel(model: ExportableClassifier, directory: str | os.PathLike) -> None:
    """A SavedModel with signatures `serving_default` (image_bytes) and `pixels`."""
    import tensorflow as tf

    module = tf_module(model)
    tf.saved_model.save(module, str(directory), signatures={
        "serving_default": module.image_bytes, "pixels": module.pixels})


def write_tflite(model: ExportableClassifier, path: str | os.PathLike) -> None:
    """A float32 TFLite model with one signature, `pixels` (TFLite cannot decode images).

    Converted from the SavedModel's `pixels` signature with TFLite's builtin ops only and no
    optimisation (no quantisation, no float16).
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="headstart-tflite-") as directory:
        module = tf_module(model, decode=False)
        tf.saved_model.save(module, directory, signatures={"pixels": module.pixels})
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=["pixels"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        Path(path).write_bytes(converter.convert())


# ---------------------------------------------------------------- ONNX


class _OnnxGraph:
    """A tiny builder over `onnx.helper`: each call adds one node and returns its output."""

    def __init__(self):
        self.nodes, self.initializers = [], []
        self._names: dict[str, int] = {}

    def name(self, stem: str) -> str:
        self._names[stem] = self._names.get(stem, 0) + 1
        return f"{stem}_{self._names[stem]}"

    def constant(self, stem: str, value) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, *inputs: str, output: str | None = None, **attributes) -> str:
        from onnx import helper

        output = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output


def _onnx_resize_weights(graph: _OnnxGraph, in_size: str, out_size: int) -> str:
    """`preprocessing.resize_weights` as ONNX nodes; `in_size` is an int64 (1,) tensor."""
    one, two = graph.constant("one", np.int64(1)), graph.constant("two", np.int64(2))
    out = graph.constant("out_size", np.int64(out_size))
    inputs = graph.node("Range", graph.constant("zero", np.int64(0)),
                        graph.node("Squeeze", in_size), one)                     # (in,)
    outputs = graph.constant("outputs", np.arange(out_size, dtype=np.int64)[:, None])
    left = graph.node("Mul", graph.node("Add", graph.node("Mul", two, inputs), one), out)
    right = graph.node("Mul", graph.node("Add", graph.node("Mul", two, outputs), one), in_size)
    offset = graph.node("Cast", graph.node("Sub", left, right), to=1)            # (out, in)
    scale = graph.node("Cast", graph.node("Mul", two, graph.node("Max", in_size, out)), to=1)
    x = graph.node("Div", offset, scale)
    weights = graph.node("Relu", graph.node("Sub", graph.constant("one_f", np.float32(1)),
                                            graph.node("Abs", x)))
    total = graph.node("ReduceSum", weights, graph.constant("axis", np.array([1], np.int64)),
                       keepdims=1)
    return graph.node("Div", weights, total)


def build_onnx(model: ExportableClassifier):
    """The exported classifier as an `onnx.ModelProto` (opset 17), input `pixels` float32
    (N, H, W, 3) RGB 0-255, output `scores` float32 (N, num_classes)."""
    import onnx
    from onnx import TensorProto, helper

    graph, size = _OnnxGraph(), model.image_size
    shape = graph.node("Shape", INPUT)
    height = graph.node("Slice", shape, graph.constant("at", np.array([1], np.int64)),
                        graph.constant("to", np.array([2], np.int64)))
    width = graph.node("Slice", shape, graph.constant("at", np.array([2], np.int64)),
                       graph.constant("to", np.array([3], np.int64)))
    flat = graph.node("Reshape", INPUT, graph.constant("shape", np.array([0, 0, -1], np.int64)))
    rows = graph.node("MatMul", _onnx_resize_weights(graph, height, size), flat)  # (N, S, W·3)
    by_width = graph.node("Concat", graph.constant("shape", np.array([-1], np.int64)), width,
                          graph.constant("shape", np.array([3], np.int64)), axis=0)
    rows = graph.node("Reshape", rows, by_width)                                  # (N·S, W, 3)
    both = graph.node("MatMul", _onnx_resize_weights(graph, width, size), rows)  # (N·S, S, 3)
    x = graph.node("Reshape", both, graph.constant("shape", np.array([-1, size, size, 3],
                                                                     np.int64)))
    x = graph.node("Gather", x, graph.constant("bgr", np.array([2, 1, 0], np.int64)), axis=3)
    x = graph.node("Add", x, graph.constant("caffe_mean",
                                            (-np.array(CAFFE_MEAN_BGR)).astype(np.float32)))
    x = graph.node("Transpose", x, perm=[0, 3, 1, 2])                             # NCHW
    taps = {}
    for name, kernel, bias in model.convs:
        x = graph.node("Conv", x, graph.constant(f"{name}_kernel", kernel.transpose(3, 2, 0, 1)),
                       graph.constant(f"{name}_bias", bias), kernel_shape=[3, 3],
                       pads=[1, 1, 1, 1], output=name + "_conv")
        x = taps[name] = graph.node("Relu", x, output=name)
        if _pool_after(name):
            pool = name.split("_")[0] + "_pool"
            x = taps[pool] = graph.node("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2],
                                        output=pool)
    mean = lambda tap: graph.node("ReduceMean", taps[tap], axes=[2, 3], keepdims=0)  # noqa: E731
    x = graph.node("Concat", mean("block4_pool"), mean("block5_conv3"),
                   graph.node("ReduceMax", taps["block5_conv3"], axes=[2, 3], keepdims=0),
                   mean("block5_pool"), axis=1, output="features")
    x = graph.node("Div", graph.node("Sub", x, graph.constant("head_mean", model.mean)),
                   graph.constant("head_std", model.std))
    for i, layer in enumerate(model.hidden):
        x = graph.node("Relu", graph.node("Add", graph.node(
            "MatMul", x, graph.constant(f"dense_{i}_kernel", layer.kernel)),
            graph.constant(f"dense_{i}_bias", layer.bias)))
    logits = graph.node("Add", graph.node("MatMul", x, graph.constant("logits_kernel",
                                                                      model.logits.kernel)),
                        graph.constant("logits_bias", model.logits.bias), output="logits")
    logits = graph.node("Div", logits, graph.constant(
        "temperature", np.array(model.temperature, np.float32)))
    graph.node("Softmax", logits, axis=-1, output=OUTPUT)
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes, "headstart_classifier",
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                           ["batch", "height", "width", 3])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                           ["batch", model.num_classes])],
            graph.initializers),
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=_ONNX_IR_VERSION,
        producer_name="headstart", doc_string="Headstart image classifier: RGB pixels "
        "(N, H, W, 3) in 0-255 → scores (N, classes); see README.md in the export")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write_onnx(model: ExportableClassifier, path: str | os.PathLike) -> None:
    Path(path).write_bytes(build_onnx(model).SerializeToString())


# ---------------------------------------------------------------- the export zip


def write_model(model: ExportableClassifier, export_format: str,
                target: str | os.PathLike) -> None:
    """Writes the model in `export_format` to `target` (a folder for savedmodel, a file else)."""
    writers = {"savedmodel": write_savedmodel, "tflite": write_tflite, "onnx": write_onnx}
    if export_format not in writers:
        raise ValueError(f"format must be one of {FORMATS}. Received: {export_format!r}")
    writers[export_format](model, target)


def write_archive(model: ExportableClassifier, export_format: str, labels: Sequence[str],
                  card: Mapping[str, Any], target: IO[bytes]) -> None:
    """The export zip: the model, `labels.json` (a list; index i is score column i),
    `model-card.json` (`card` as given) and `README.md` (how to run it)."""
    if len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} labels for {model.num_classes} scores")
    with tempfile.TemporaryDirectory(prefix="headstart-export-") as directory:
        path = Path(directory) / MODEL_PATHS[export_format].rstrip("/")
        write_model(model, export_format, path)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                # NB: float weights shrink by ~13% at any level; the fastest gets that too.
                archive.write(file, file.relative_to(directory).as_posix(), compresslevel=1)
            archive.writestr("labels.json", json.dumps(list(labels), ensure_ascii=False,
                                                       indent=1) + "\n")
            archive.writestr("model-card.json", json.dumps(card, indent=1, default=str) + "\n")
            archive.writestr("README.md", readme(export_format, model.image_size,
                                                 card.get("made_by", {}).get(
                                                     "service_precision", "float32")))


# ---------------------------------------------------------------- README

_PIXELS_SNIPPET = '''```python
import json
import numpy as np
from PIL import Image, ImageOps

def load_pixels(path):
    """The image as Headstart decodes it: first frame, EXIF orientation, transparency on white,
    RGB, as float32 (1, height, width, 3) in 0-255. Any size: the model resizes."""
    image = Image.open(path)
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(grey.max(), 1.0)
        image = Image.fromarray(np.clip(grey / peak * 255 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), np.float32)[None]

labels = json.load(open("labels.json"))
pixels = load_pixels("photo.jpg")
```'''

_RUN = {
    "savedmodel": '''```python
import tensorflow as tf

model = tf.saved_model.load("model")
# Encoded images, decoded inside the model (JPEG, PNG, GIF, BMP), a batch of any sizes:
scores = model.signatures["serving_default"](
    image_bytes=tf.constant([open("photo.jpg", "rb").read()]))["scores"].numpy()
# Or pixels, from load_pixels above (one size per batch):
scores = model.signatures["pixels"](pixels=tf.constant(pixels))["scores"].numpy()
print(labels[scores[0].argmax()], scores[0].max())
```

`serving_default` decodes as Headstart does for JPEG (the accurate integer DCT, which gives
Pillow's pixels; EXIF orientation applied), PNG, GIF and BMP without transparency. For WebP,
CMYK JPEG, 16-bit PNG or transparent images, decode with `load_pixels` and call `pixels`.
TensorFlow Serving: `tensorflow_model_server --model_base_path=$PWD/model …`, then
`{"instances": [{"b64": "…"}]}` to `serving_default`.''',
    "tflite": '''```python
import tensorflow as tf   # or: from ai_edge_litert.interpreter import Interpreter

interpreter = tf.lite.Interpreter(model_path="model.tflite")
run = interpreter.get_signature_runner("pixels")   # resizes its input tensor to each call's
scores = run(pixels=pixels)["scores"]
print(labels[scores[0].argmax()], scores[0].max())
```

TFLite cannot decode images: give it pixels (`load_pixels` above, or your platform's decoder
with EXIF orientation applied). The input has a dynamic shape (-1, -1, -1, 3); with the plain
`Interpreter` API call `resize_tensor_input` and `allocate_tensors` for each new size.''',
    "onnx": '''```python
import onnxruntime as ort

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
scores = session.run(["scores"], {"pixels": pixels})[0]
print(labels[scores[0].argmax()], scores[0].max())
```

ONNX (opset 17) takes pixels: `load_pixels` above, or your platform's decoder with EXIF
orientation applied. The graph is plain Conv/Relu/MaxPool/ReduceMean/ReduceMax/MatMul/Softmax
and two resize matrices built from the input size, written by Headstart without a converter.''',
}


def readme(export_format: str, image_size: int, service_precision: str = "float32") -> str:
    """README.md of an export: what the model takes and returns, and how to run it.

    Args:
        service_precision: the dtype policy of the service that exported it; the export is
            float32 either way, and its parity promise is with a float32 service.
    """
    parity = "Its scores equal a float32 Headstart service's within 1e-4 on the same image."
    if service_precision != "float32":
        parity += (f" The service that exported it computes in {service_precision}; its scores"
                   " differ from these by that precision's rounding (bfloat16 and float16 keep"
                   " about 3 significant digits).")
    return f"""# Headstart classifier ({export_format})

What is here: the model ({MODEL_PATHS[export_format]}), `labels.json` (score column i is label
i), `model-card.json` (backbone, image size, training options, metrics, threshold,
calibration, how it was made) and this file.

The model takes RGB pixels in 0-255 of any size, float32 (batch, height, width, 3), and
returns `scores`, float32 (batch, labels): calibrated probabilities that sum to 1. Everything
Headstart does to an image after decoding happens inside: the resize to {image_size} × {image_size}
(aspect not kept; Headstart's antialiased bilinear, the same in every runtime), VGG16's
preprocessing (RGB → BGR, minus the ImageNet mean), the backbone, the head and the
calibration temperature. {parity}

{_PIXELS_SNIPPET}

{_RUN[export_format]}

A `threshold` in model-card.json (when the classifier has one) is the score under which
Headstart answers "no label"; apply it yourself: `label = labels[i] if scores[0, i] >= threshold
else None`.
"""
