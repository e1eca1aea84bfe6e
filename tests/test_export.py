"""Export: each format, run in its own runtime, gives the service's scores within 1e-4.

Random weights at 32 px. Each format is built once, through the HTTP route (202, poll, 200), and
run on 20 images of assorted sizes and formats, none of them square at 32 px but one; the
service's scores come from POST …/predict. The rest is small: the resize against Pillow, the
in-graph decoding against `decode_image`, heads with a hidden layer and a temperature, and what
the API answers around an export.
"""

import io
import json
import time
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image

from models import export as export_lib
from models.heads import HeadSpec, build_head
from models.prediction import class_scores
from models.preprocessing import decode_image, load_image, resize_pixels, resize_weights
from service.api.auth import ADMIN, required_scope
from service.app import create_app
from service.config import Settings
from service.jobs.export import TOLERANCE, ExportBuild
from service.storage.records import utc_now
from tests.conftest import TEST_IMAGE_SIZE
from tests.helpers import COLOURS, image_bytes, make_zip

pytestmark = pytest.mark.filterwarnings(
    # TensorFlow 2.21 warns that tf.lite.Interpreter moves to ai_edge_litert; it still is TFLite.
    "ignore:\\s+Warning. tf.lite.Interpreter is deprecated:UserWarning")

#: Labels no model file may contain (they are data, in labels.json).
LABELS = ("label-blue-7f3a9c", "label-red-7f3a9c")
FAST = {"max_epochs": 15, "patience": 3, "augmentation": {"views": 1},
        "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def assorted_images() -> list[bytes]:
    """20 images: JPEG, PNG, BMP, GIF, grey, EXIF-rotated; smaller, larger, the input size,
    non-square, one pixel wide."""
    sizes = [(32, 32), (40, 32), (31, 47), (100, 60), (17, 9), (320, 240), (64, 64), (1, 50),
             (33, 33), (200, 31), (48, 200), (90, 90), (45, 61), (16, 16), (129, 77), (500, 375),
             (60, 100), (37, 23), (70, 50), (256, 192)]
    formats = ["PNG", "JPEG", "BMP", "JPEG", "GIF", "JPEG", "PNG", "PNG", "JPEG", "JPEG",
               "BMP", "JPEG", "PNG", "JPEG", "JPEG", "JPEG", "PNG", "GIF", "JPEG", "JPEG"]
    colours = list(COLOURS.values())
    images = [image_bytes(colours[i % 3], size, fmt, seed=i, mode="L" if i in (8, 12) else "RGB")
              for i, (size, fmt) in enumerate(zip(sizes, formats))]
    images[15] = with_exif_orientation(images[15], 6)
    images[18] = with_exif_orientation(images[18], 3)
    images[19] = with_exif_orientation(images[19], 8)
    return images


def pixels_of(data: bytes) -> np.ndarray:
    """What the README's load_pixels gives: the service's decode, unresized, (1, H, W, 3)."""
    return np.asarray(decode_image(data), np.float32)[None]


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("in_size,out_size", [(500, 224), (224, 224), (37, 224), (4000, 224),
                                              (3, 32), (1, 32), (96, 32)])
def test_resize_weights_are_pils_bilinear_coefficients(in_size, out_size):
    weights = resize_weights(in_size, out_size)
    assert weights.shape == (out_size, in_size) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-6)
    # Pillow's precompute_coeffs, written out in float64.
    scale = in_size / out_size
    support = max(scale, 1.0)
    expected = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        taps = np.maximum(0, 1 - np.abs((np.arange(lo, hi) - centre + 0.5) / support))
        expected[i, lo:hi] = taps / taps.sum()
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_resize_is_pillows_bilinear_but_for_its_rounding():
    rng = np.random.default_rng(0)
    for height, width in [(240, 320), (20, 50), (32, 32), (1000, 700)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours = resize_pixels(pixels, 32)
        pillow = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))
        assert ours.dtype == np.float32 and ours.shape == (32, 32, 3)
        # Pillow rounds to uint8 after each of its two passes; nothing else differs.
        assert np.abs(ours - pillow).max() <= 1.0
        assert np.abs(ours - pillow).mean() < 0.4


def test_resize_to_the_same_size_is_the_identity():
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_pixels(pixels, 32), pixels)


def test_the_graph_resize_is_the_service_resize():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    for height, width in [(37, 23), (320, 240), (32, 32), (1, 50)]:
        pixels = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
        in_graph = export_lib._tf_resize(tf.constant(pixels[None]), 32).numpy()[0]
        np.testing.assert_allclose(in_graph, resize_pixels(pixels, 32), atol=2e-4)
        weights = export_lib._tf_resize_weights(tf.constant(height), 32).numpy()
        np.testing.assert_allclose(weights, resize_weights(height, 32), atol=1e-7)


# ---------------------------------------------------------------- decoding in the SavedModel


def test_the_graph_decodes_like_the_service():
    import tensorflow as tf

    for index, data in enumerate(assorted_images()):
        decoded = export_lib._tf_decode(tf.constant(data)).numpy()
        np.testing.assert_array_equal(decoded, pixels_of(data)[0], err_msg=f"image {index}")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_graph_applies_exif_orientation_like_pillow(orientation):
    import tensorflow as tf

    data = with_exif_orientation(image_bytes(COLOURS["red"], (40, 24), "JPEG", seed=3),
                                 orientation)
    assert export_lib._exif_orientation(tf.constant(data)).numpy() == orientation
    decoded = export_lib._tf_decode(tf.constant(data)).numpy()
    np.testing.assert_array_equal(decoded, pixels_of(data)[0])


def test_broken_exif_is_read_as_no_orientation():
    import tensorflow as tf

    data = with_exif_orientation(image_bytes(COLOURS["red"], (40, 24), "JPEG", seed=3), 6)
    start = data.index(b"Exif\0\0") + 10
    truncated_ifd = data[:start + 4] + b"\xff\xff\xff\x7f" + data[start + 8:]
    orientation = tf.function(export_lib._exif_orientation)
    for broken in (truncated_ifd, data[:40], b"\xff\xd8\xff\xe1\xff\xff", b""):
        assert orientation(tf.constant(broken)).numpy() == 1


# ---------------------------------------------------------------- heads, in memory


@pytest.fixture(scope="module")
def hidden_head(backbone):
    """A head with a hidden layer and standardisation fitted to real features."""
    images = np.stack([load_image(data, TEST_IMAGE_SIZE) for data in assorted_images()])
    head = build_head(HeadSpec(hidden_units=16, dropout=0.3), backbone.feature_dim, 3)
    head.get_layer("head_standardize").adapt(backbone.features(images))
    rng = np.random.default_rng(4)
    head.set_weights([w if i < 3 else rng.normal(0, 0.3, w.shape).astype(np.float32)
                      for i, w in enumerate(head.get_weights())])
    return head


def test_a_hidden_layer_head_exports_to_tensorflow_and_onnx(backbone, hidden_head):
    import onnxruntime
    import tensorflow as tf

    images = assorted_images()
    expected = class_scores(backbone, hidden_head,
                            np.stack([load_image(d, TEST_IMAGE_SIZE) for d in images]))
    model = export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE)
    assert len(model.hidden) == 1 and model.temperature == 1.0
    module = export_lib.tf_module(model)
    session = onnxruntime.InferenceSession(export_lib.build_onnx(model).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    by_bytes = module.image_bytes(tf.constant(images))["scores"].numpy()
    by_pixels = np.concatenate([module.pixels(tf.constant(pixels_of(d)))["scores"].numpy()
                                for d in images])
    by_onnx = np.concatenate([session.run(["scores"], {"pixels": pixels_of(d)})[0]
                              for d in images])
    assert expected.std() > 0.01  # scores that vary, so agreement means something
    for scores in (by_bytes, by_pixels, by_onnx):
        assert np.abs(scores - expected).max() < TOLERANCE


def test_a_temperature_divides_the_logits(backbone, hidden_head):
    import keras
    import onnxruntime
    import tensorflow as tf

    images = assorted_images()[:4]
    features = backbone.features(np.stack([load_image(d, TEST_IMAGE_SIZE) for d in images]))
    model = export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE, temperature=2.5)
    # softmax(logits / T), the logits taken from the head's own layers:
    logits = keras.Model(hidden_head.input, hidden_head.get_layer("head_softmax").output)
    kernel, bias = hidden_head.get_layer("head_softmax").get_weights()
    before_softmax = keras.Model(hidden_head.input,
                                 hidden_head.get_layer("head_hidden_dropout").output)
    z = (np.asarray(before_softmax(features, training=False)) @ kernel + bias) / 2.5
    np.testing.assert_allclose(np.asarray(logits(features, training=False)),
                               class_scores(backbone, hidden_head, np.stack(
                                   [load_image(d, TEST_IMAGE_SIZE) for d in images])), atol=1e-6)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(export_lib.reference_scores(model, features), expected, atol=1e-6)
    session = onnxruntime.InferenceSession(export_lib.build_onnx(model).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    by_onnx = np.concatenate([session.run(["scores"], {"pixels": pixels_of(d)})[0]
                              for d in images])
    module = export_lib.tf_module(model)  # NB: held: its functions keep only a weak reference
    by_tf = module.image_bytes(tf.constant(images))["scores"].numpy()
    assert np.abs(by_onnx - expected).max() < TOLERANCE
    assert np.abs(by_tf - expected).max() < TOLERANCE
    # and it is not the uncalibrated softmax
    plain = export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE)
    assert np.abs(export_lib.reference_scores(plain, features) - expected).max() > 1e-3


def test_a_head_layer_the_export_cannot_express_is_refused(backbone):
    import keras

    inputs = keras.Input((backbone.feature_dim,))
    x = keras.layers.Normalization(mean=0.0, variance=1.0)(inputs)
    x = keras.layers.LayerNormalization()(x)
    head = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    with pytest.raises(ValueError, match="cannot export head layer"):
        export_lib.from_keras(backbone.model, head, TEST_IMAGE_SIZE)


def test_own_blocks_replace_the_shared_ones(backbone, hidden_head):
    kernel, bias = backbone.model.get_layer("block5_conv3").get_weights()
    frozen = export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE)
    tuned = export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE,
                                  own_blocks={"block5_conv3": (kernel * 1.5, bias)})
    np.testing.assert_array_equal(dict((n, k) for n, k, _ in tuned.convs)["block5_conv3"],
                                  kernel * 1.5)
    assert frozen.weights_fingerprint() == backbone.identity.fingerprint
    assert tuned.weights_fingerprint() != frozen.weights_fingerprint()
    with pytest.raises(ValueError, match="does not have"):
        export_lib.from_keras(backbone.model, hidden_head, TEST_IMAGE_SIZE,
                              own_blocks={"block6_conv1": (kernel, bias)})


# ---------------------------------------------------------------- through the HTTP route


def wait(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def create(client, members: dict[str, bytes], options: dict) -> str:
    response = client.post("/v1/classifiers", content_type="multipart/form-data", data={
        "dataset": (io.BytesIO(make_zip(members)), "dataset.zip"),
        "options": json.dumps(options)})
    assert response.status_code == 202, response.json
    return response.json["id"]


def wait_ready(client, classifier_id) -> dict:
    return wait(lambda: (body := client.get(f"/v1/classifiers/{classifier_id}").json)["status"]
                in ("ready", "failed") and not body["refining"] and body,
                what=f"{classifier_id} to train")


def ready_export_app(root, precision: str = "float32"):
    """An app on random weights at the test size, once its backbone is loaded."""
    app = create_app(Settings(store=str(root / "store"), backbone_weights="random",
                              image_size=TEST_IMAGE_SIZE, weights_cache=root / "cache",
                              precision=precision))
    wait(lambda: app.test_client().get("/readyz").status_code == 200, what="the backbone")
    return app


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # NB: parity is promised in float32; `auto` would pick bfloat16 on a CPU with AVX512_BF16.
    return ready_export_app(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def classifier(client) -> dict:
    members = {f"{label}/{i}.png": image_bytes(COLOURS[label.split("-")[1]], (40, 32),
                                                seed=i + 100 * n)
               for n, label in enumerate(LABELS) for i in range(10)}
    body = wait_ready(client, create(client, members, FAST))
    assert body["status"] == "ready" and body["labels"] == list(LABELS)
    return body


def fetch_export(client, classifier_id: str, export_format: str) -> zipfile.ZipFile:
    """GET, then poll the Location while it answers 202, as a client does."""
    url = f"/v1/classifiers/{classifier_id}/export?format={export_format}"
    first = client.get(url)
    assert first.status_code == 202, first.json
    assert first.headers["Location"] == url and int(first.headers["Retry-After"]) > 0
    assert first.json == {"classifier_id": classifier_id, "format": export_format,
                          "version": 1, "status": "building"}
    response = wait(lambda: (r := client.get(first.headers["Location"])).status_code != 202 and r,
                    timeout=240, what=f"the {export_format} export")
    assert response.status_code == 200, response.json
    assert response.content_type == "application/zip"
    assert response.headers["Content-Disposition"] == \
        f"attachment; filename={classifier_id}-v1-{export_format}.zip"
    assert int(response.headers["Content-Length"]) == len(response.data)
    response.close()
    return zipfile.ZipFile(io.BytesIO(response.data))


@pytest.fixture(scope="module")
def exports(app, client, classifier) -> dict[str, zipfile.ZipFile]:
    """Each format, built once. The ONNX claim is planted stale first, as if the replica
    building it had died: the request takes it over."""
    store = app.extensions["headstart"].store
    record = store.load_record(classifier["id"])
    stale = ExportBuild(status="building", owner="gone:1",
                        started_at=utc_now() - timedelta(hours=1))
    store.save_export_build(record.id, record.run, "onnx", stale.model_dump_json().encode(), None)
    return {name: fetch_export(client, classifier["id"], name) for name in export_lib.FORMATS}


@pytest.fixture(scope="module")
def service_scores(client, classifier) -> tuple[list[bytes], np.ndarray]:
    """The 20 images and what POST …/predict answers for them, in label order."""
    images = assorted_images()
    response = client.post(f"/v1/classifiers/{classifier['id']}/predict?top_k=2",
                           content_type="multipart/form-data",
                           data={"image": [(io.BytesIO(d), f"{i}.img")
                                           for i, d in enumerate(images)]})
    assert response.status_code == 200, response.json
    scores = np.array([[{e["label"]: e["score"] for e in p["top_k"]}[label] for label in LABELS]
                       for p in response.json["predictions"]])
    return images, scores


def test_every_export_holds_model_labels_card_and_readme(client, exports, classifier):
    report = client.get(f"/v1/classifiers/{classifier['id']}/report").json
    for name, archive in exports.items():
        names = archive.namelist()
        assert {"labels.json", "model-card.json", "README.md"} <= set(names)
        assert json.loads(archive.read("labels.json")) == list(LABELS)
        card = json.loads(archive.read("model-card.json"))
        assert card["format"] == name and card["image_size"] == TEST_IMAGE_SIZE
        assert card["classifier"]["id"] == classifier["id"] and card["labels"] == list(LABELS)
        assert card["backbone"]["fingerprint"] == classifier["backbone"]["fingerprint"]
        assert card["weights_fingerprint"] == classifier["backbone"]["fingerprint"]
        assert card["options"]["max_epochs"] == FAST["max_epochs"]
        assert card["metrics"]["val_accuracy"] == classifier["metrics"]["val_accuracy"]
        assert card["validation"]["per_label"].keys() == set(LABELS)
        assert card["threshold"] == report["threshold"] == classifier["threshold"]
        assert card["calibration"] == report["calibration"]
        assert card["temperature"] == pytest.approx(report["calibration"]["temperature"],
                                                    abs=1e-4)
        assert card["made_by"]["precision"] == "float32"
        readme = archive.read("README.md").decode()
        assert export_lib.MODEL_PATHS[name] in readme and "labels.json" in readme
        assert "a float32 Headstart service's within 1e-4" in readme
        assert "computes in" not in readme  # this service is float32: nothing to qualify
    assert "model.onnx" in exports["onnx"].namelist()
    assert "model.tflite" in exports["tflite"].namelist()
    assert "model/saved_model.pb" in exports["savedmodel"].namelist()


def test_no_model_file_holds_anything_user_supplied_or_executable(exports):
    for name, archive in exports.items():
        for member in archive.namelist():
            if member in ("labels.json", "model-card.json", "README.md"):
                continue
            data = archive.read(member)
            assert not any(label.encode() in data for label in LABELS), (name, member)
            assert not member.endswith((".pkl", ".pickle", ".npy", ".npz", ".h5", ".keras"))
    graph = exports["savedmodel"].read("model/saved_model.pb")
    for op in (b"PyFunc", b"EagerPyFunc", b"PyCall"):  # Python run on load: never
        assert op not in graph


def unpack(archive: zipfile.ZipFile, tmp_path) -> str:
    archive.extractall(tmp_path)
    return str(tmp_path)


def test_savedmodel_gives_the_service_scores(exports, service_scores, tmp_path):
    import tensorflow as tf

    images, expected = service_scores
    model = tf.saved_model.load(unpack(exports["savedmodel"], tmp_path) + "/model")
    by_bytes = model.signatures["serving_default"](image_bytes=tf.constant(images))["scores"]
    by_pixels = np.concatenate([model.signatures["pixels"](pixels=tf.constant(pixels_of(d)))
                                ["scores"].numpy() for d in images])
    assert expected.std() > 0.01
    assert np.abs(by_bytes.numpy() - expected).max() < TOLERANCE
    assert np.abs(by_pixels - expected).max() < TOLERANCE


def test_tflite_gives_the_service_scores(exports, service_scores, tmp_path):
    import tensorflow as tf

    images, expected = service_scores
    interpreter = tf.lite.Interpreter(unpack(exports["tflite"], tmp_path) + "/model.tflite")
    run = interpreter.get_signature_runner("pixels")
    scores = np.concatenate([run(pixels=pixels_of(d))["scores"] for d in images])
    assert np.abs(scores - expected).max() < TOLERANCE


def test_onnx_gives_the_service_scores(exports, service_scores, tmp_path):
    import onnx
    import onnxruntime

    images, expected = service_scores
    path = unpack(exports["onnx"], tmp_path) + "/model.onnx"
    onnx.checker.check_model(path, full_check=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    scores = np.concatenate([session.run(["scores"], {"pixels": pixels_of(d)})[0]
                             for d in images])
    assert np.abs(scores - expected).max() < TOLERANCE


def test_an_export_is_cached_per_run_and_format(app, client, classifier, exports):
    store = app.extensions["headstart"].store
    record = store.load_record(classifier["id"])
    for name in export_lib.FORMATS:
        assert store.has_export(record.id, record.run, name)
        assert store.load_export_build(record.id, record.run, name) is None  # no claim left
        started = time.monotonic()
        with client.get(f"/v1/classifiers/{classifier['id']}/export?format={name}") as again:
            assert again.status_code == 200 and time.monotonic() - started < 5


def test_a_failed_build_is_reported_then_tried_again(app, client):
    members = {f"{label}/{i}.png": image_bytes(COLOURS[label], (40, 32), seed=i)
               for label in ("red", "blue") for i in range(3)}
    classifier_id = wait_ready(client, create(client, members, {
        "max_epochs": 2, "augmentation": {"views": 0}}))["id"]
    store = app.extensions["headstart"].store
    record = store.load_record(classifier_id)
    store.save_head(classifier_id, record.run, b"not an npz")
    url = f"/v1/classifiers/{classifier_id}/export?format=onnx"
    assert client.get(url).status_code == 202
    failed = wait(lambda: (r := client.get(url)).status_code != 202 and r, what="the failure")
    assert failed.status_code == 500 and failed.json["title"] == "Export failed"
    assert "tried again" in failed.json["detail"]
    build = ExportBuild.model_validate_json(store.load_export_build(classifier_id, record.run,
                                                                    "onnx")[0])
    aged = build.model_copy(update={"started_at": utc_now() - timedelta(minutes=5)})
    store.save_export_build(classifier_id, record.run, "onnx", aged.model_dump_json().encode(),
                            store.load_export_build(classifier_id, record.run, "onnx")[1])
    assert client.get(url).status_code == 202  # retried
    client.delete(f"/v1/classifiers/{classifier_id}")


def test_export_answers_422_404_and_409(client, classifier):
    base = f"/v1/classifiers/{classifier['id']}/export"
    for query in ("?format=keras", "", "?format=onnx&version=0", "?format=onnx&extra=1"):
        response = client.get(base + query)
        assert response.status_code == 422, (query, response.json)
        assert response.content_type == "application/problem+json"
    assert client.get(base + "?format=onnx&version=2").status_code == 404
    assert client.get("/v1/classifiers/clf_00000000000000000000/export?format=onnx"
                      ).status_code == 404
    slow = {"max_epochs": 1000, "patience": 200, "augmentation": {"views": 8}}
    members = {f"{label}/{i}.png": image_bytes(COLOURS[label], (40, 32), seed=i)
               for label in ("red", "blue") for i in range(20)}
    training = create(client, members, slow)
    response = client.get(f"/v1/classifiers/{training}/export?format=onnx")
    assert response.status_code == 409 and "ready" in response.json["detail"]
    client.delete(f"/v1/classifiers/{training}")


def test_export_needs_an_admin_key(app):
    path = "/v1/classifiers/<classifier_id>/export"
    assert required_scope("GET", path, "v1.export_classifier") == ADMIN
    operation = app.extensions["headstart.openapi"]["paths"][
        "/v1/classifiers/{classifier_id}/export"]["get"]
    assert "admin" in operation["description"]
    assert "application/zip" in operation["responses"]["200"]["content"]
