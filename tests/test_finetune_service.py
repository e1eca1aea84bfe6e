"""A fine-tuned classifier through the service: the job, the stored head file, serving in shared
batches, the byte-bounded head cache, HTTP against in-process, and export (random weights, 32 px,
float32: export parity is a float32 promise; one bfloat16 service checks that an export carries the
stored float16 blocks, not the copy rounded to bfloat16 for serving)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from service.serving.heads import HeadCache, ServedHead
from tests.helpers import COLOURS, image_bytes
# NB: the export tests' float32 app and client fixtures (a module-scoped instance of each here)
from tests.test_export import app, client  # noqa: F401
from tests.test_export import create, fetch_export, pixels_of, unpack, wait_ready

#: A strongly regularised fixed linear head leaves room on validation, and this fine-tuning
#: (the default step size, three epochs) beats it on the held-out fold of these images.
HEAD = {"hidden_units": 0, "dropout": 0.0, "l2": 10.0}
FINE_TUNED = {"augmentation": {"views": 1}, "head": HEAD,
              "fine_tune": {"blocks": 1, "max_epochs": 5, "patience": 3, "learning_rate": 2e-5}}
FROZEN = {**FINE_TUNED, "fine_tune": "off"}
BLOCK5 = ("block5_conv1", "block5_conv2", "block5_conv3")
BLOCK5_PARAMETERS = 3 * (3 * 3 * 512 * 512 + 512)


def members() -> dict[str, bytes]:
    return {f"{label}/{i}.png": image_bytes(COLOURS[label], seed=1000 * index + i)
            for index, label in enumerate(("red", "blue")) for i in range(8)}


@pytest.fixture(scope="module")
def classifiers(client) -> dict[str, dict]:
    ids = {"fine_tuned": create(client, members(), FINE_TUNED),
           "frozen": create(client, members(), FROZEN)}
    return {name: wait_ready(client, classifier_id) for name, classifier_id in ids.items()}


def predict(client, classifier_id: str, images: list[bytes]) -> np.ndarray:
    response = client.post(f"/v1/classifiers/{classifier_id}/predict?top_k=2",
                           content_type="multipart/form-data",
                           data={"image": [(io.BytesIO(d), f"{i}.png")
                                           for i, d in enumerate(images)]})
    assert response.status_code == 200, response.json
    return np.array([[{e["label"]: e["score"] for e in p["top_k"]}[label]
                      for label in ("blue", "red")] for p in response.json["predictions"]])


def test_a_fine_tuned_classifier_trains_through_the_job_and_says_so(app, client, classifiers):
    tuned, frozen = classifiers["fine_tuned"], classifiers["frozen"]
    assert tuned["status"] == frozen["status"] == "ready", (tuned, frozen)
    assert frozen["fine_tuned"] is None
    assert tuned["fine_tuned"]["blocks"] == 1 and tuned["fine_tuned"]["l2_sp"] == 0.01
    assert set(tuned["fine_tuned"]["relative_shift"]) == set(BLOCK5)
    assert all(0 < s < 0.5 for s in tuned["fine_tuned"]["relative_shift"].values())
    report = client.get(f"/v1/classifiers/{tuned['id']}/report").json
    frozen_report = client.get(f"/v1/classifiers/{frozen['id']}/report").json
    assert report["fine_tuned"] == tuned["fine_tuned"]
    assert report["d"] == frozen_report["d"] + BLOCK5_PARAMETERS
    assert report["fine_tuning"]["kept"] and report["fine_tuning"]["improvement"] > 0
    assert "L2-SP" in report["diagnosis"][-1]
    assert frozen_report["fine_tuned"] is None
    assert frozen_report["fine_tuning"] == {"ran": False, "reason": 'fine_tune is "off"'}
    # one head file: the head's arrays and the blocks as float16 `blocks.*` arrays
    store = app.extensions["headstart"].store
    with np.load(io.BytesIO(store.load_head(store.load_record(tuned["id"])))) as archive:
        blocks = [name for name in archive.files if name.startswith("blocks.")]
        assert sorted(blocks) == sorted(f"blocks.{layer}.{part}" for layer in BLOCK5
                                        for part in ("kernel", "bias"))
        assert all(archive[name].dtype == np.float16 for name in blocks)


def test_http_prediction_equals_the_in_process_computation(app, client, classifiers):
    import tensorflow as tf

    from models import calibration
    from models.finetune import UpperBlocks
    from models.heads import HeadSpec, load_head
    from models.preprocessing import load_image

    services = app.extensions["headstart"]
    backbone = services.backbone.get()
    images = [image_bytes(COLOURS["red"], seed=7), image_bytes(COLOURS["blue"], seed=8)]
    pixels = np.stack([load_image(d, 32) for d in images])
    for name, classifier in classifiers.items():
        record = services.store.load_record(classifier["id"])
        data = services.store.load_head(record)
        head = load_head(HeadSpec(**record.head.model_dump()), 2048, 2, data)
        if name == "fine_tuned":
            with np.load(io.BytesIO(data)) as archive:
                weights = {layer: (archive[f"blocks.{layer}.kernel"],
                                   archive[f"blocks.{layer}.bias"]) for layer in BLOCK5}
            # NB: the trainable Keras blocks, not the served ones: an independent computation
            upper = UpperBlocks(1, backbone.activation_shape("block4_pool"), weights)
            features = upper.features(tf.constant(
                backbone.activations(pixels, "block4_pool"), tf.float16)).numpy()
        else:
            features = backbone.features(pixels)
        # NB: the service's scores are calibrated: the head's logits divided by its temperature
        expected = calibration.softmax(calibration.logits_from_probabilities(
            np.asarray(head(features))), services.heads.get(record).trust.temperature)
        np.testing.assert_allclose(predict(client, classifier["id"], images), expected,
                                   rtol=1e-5, atol=1e-6)


def test_one_shared_pass_gives_fine_tuned_and_frozen_classifiers_each_their_own_result(
        app, classifiers):
    from models.prediction import apply_head
    from service.serving.batching import FeatureBatcher

    services = app.extensions["headstart"]
    backbone = services.backbone.get()
    pixels = np.stack([pixels_of(image_bytes(COLOURS["red"], size=(32, 32), seed=s))[0]
                       for s in (1, 2, 3)]).astype(np.uint8)
    served = {name: services.heads.get(services.store.load_record(c["id"]))
              for name, c in classifiers.items()}
    assert served["fine_tuned"].upper is not None and served["frozen"].upper is None
    alone = {}
    solo = FeatureBatcher(backbone, max_batch=32, max_wait_s=0.0, max_queued=64,
                          timeout_s=30).start()
    for name, head in served.items():
        alone[name] = solo.features(pixels, lambda f, h=head: apply_head(h.head, f),
                                    upper=head.upper)
    assert not np.allclose(alone["fine_tuned"], alone["frozen"])
    # NB: a long gathering wait, so both requests are in the first pass
    shared = FeatureBatcher(backbone, max_batch=32, max_wait_s=2.0, max_queued=64,
                            timeout_s=30).start()
    together: dict[str, np.ndarray] = {}
    threads = [threading.Thread(target=lambda n=name, h=head: together.__setitem__(
        n, shared.features(pixels, lambda f: apply_head(h.head, f), upper=h.upper)))
        for name, head in served.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.batches == 1
    for name in served:
        np.testing.assert_allclose(together[name], alone[name], rtol=1e-5, atol=1e-6)


def test_the_export_of_a_fine_tuned_classifier_runs_its_own_blocks(client, classifiers,
                                                                    tmp_path):
    import tensorflow as tf

    classifier = classifiers["fine_tuned"]
    images = [image_bytes(COLOURS[c], size=(40, 32), seed=s) for c, s in
              (("red", 11), ("blue", 12), ("red", 13))]
    expected = predict(client, classifier["id"], images)
    archive = fetch_export(client, classifier["id"], "savedmodel")
    card = archive.read("model-card.json").decode()
    assert '"relative_shift"' in card
    model = tf.saved_model.load(unpack(archive, tmp_path) + "/model")
    scores = model.signatures["serving_default"](image_bytes=tf.constant(images))["scores"]
    assert np.abs(scores.numpy() - expected).max() < 1e-4


# ---------------------------------------------------------------- the head cache


class _Record:
    def __init__(self, classifier_id: str, run: str, updated_at: float = 0.0, version: int = 1):
        self.id, self.run, self.updated_at = classifier_id, run, updated_at
        self.version = version


def test_the_head_cache_is_bounded_in_bytes_and_keyed_by_the_committed_run():
    loads: list[tuple[str, str]] = []

    def load(record) -> ServedHead:
        loads.append((record.id, record.run))
        return ServedHead(head=record.id, nbytes=40 if record.id.startswith("tuned") else 1)

    cache = HeadCache(load, capacity=100, max_bytes=100)
    for name in ("frozen-a", "tuned-a", "frozen-b", "tuned-b"):
        cache.get(_Record(name, "1"))
    assert cache.nbytes == 82 and len(cache) == 4
    cache.get(_Record("tuned-c", "1"))  # 122 bytes: the least recently used go first
    assert cache.nbytes == 81 and len(cache) == 3
    loads.clear()
    cache.get(_Record("frozen-a", "1"))
    assert loads == [("frozen-a", "1")]  # it had been evicted
    loads.clear()
    cache.get(_Record("tuned-c", "1", updated_at=time.time()))  # a progress write: same head
    assert loads == []
    cache.get(_Record("tuned-c", "2"))  # a new committed run: the new head
    assert loads == [("tuned-c", "2")] and cache.nbytes <= 100
    cache.get(_Record("tuned-c", "9", version=2))  # another version: its own slot
    assert cache.get(_Record("tuned-c", "2")).head == "tuned-c" and loads[-1] == ("tuned-c", "9")
    cache.forget("tuned-c")  # every version of it
    assert ("tuned-c", 1) not in cache._heads and ("tuned-c", 2) not in cache._heads
    one = HeadCache(load, capacity=100, max_bytes=10)
    assert one.get(_Record("tuned-d", "1")).head == "tuned-d"  # alone over the bound: kept
    assert len(one) == 1


def test_a_loaded_fine_tuned_head_counts_its_blocks(app, classifiers):
    services = app.extensions["headstart"]
    tuned = services.heads.get(services.store.load_record(classifiers["fine_tuned"]["id"]))
    frozen = services.heads.get(services.store.load_record(classifiers["frozen"]["id"]))
    assert frozen.nbytes == 4 * (2048 * 2 + 2)
    assert tuned.nbytes == frozen.nbytes + 4 * BLOCK5_PARAMETERS  # float32 policy here



# ---------------------------------------------------------------- bfloat16 serving, exact export


@pytest.fixture(scope="module")
def bfloat16_app(tmp_path_factory):
    from tests.test_export import ready_export_app

    return ready_export_app(tmp_path_factory.mktemp("finetune-bf16"), "mixed_bfloat16")


def test_a_bfloat16_service_exports_the_stored_blocks_not_its_rounded_copy(bfloat16_app,
                                                                           tmp_path):
    import json

    from models import export as export_lib
    from models.finetune import load_blocks
    from service.serving.heads import load_served_head

    client = bfloat16_app.test_client()
    tuned = wait_ready(client, create(client, members(), FINE_TUNED))
    assert tuned["status"] == "ready" and tuned["fine_tuned"] is not None, tuned
    services = bfloat16_app.extensions["headstart"]
    record = services.store.load_record(tuned["id"])
    head_file = services.store.load_head(record)
    backbone = services.backbone.get()
    served = load_served_head(record, head_file, backbone)
    assert served.upper.precision == "mixed_bfloat16"

    def fingerprint(own_blocks) -> str:
        return export_lib.from_keras(backbone.model, served.head, backbone.image_size,
                                     own_blocks=own_blocks).weights_fingerprint()

    stored = {name: tuple(np.asarray(w, np.float32) for w in pair)
              for name, pair in load_blocks(head_file)[1].items()}
    rounded = served.upper.weights()  # what the bfloat16 service computes with
    assert fingerprint(rounded) != fingerprint(stored)
    archive = fetch_export(client, tuned["id"], "savedmodel")
    card = json.loads(archive.read("model-card.json"))
    assert card["weights_fingerprint"] == fingerprint(stored)
    # the export is float32; its README says the service's own scores are rounder
    assert "computes in mixed_bfloat16" in archive.read("README.md").decode()
    assert card["fine_tuned"]["blocks"] == 1
