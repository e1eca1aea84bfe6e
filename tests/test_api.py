"""API tests through Flask's test client, against a real local store and the real runner thread."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

from models.backbone import FEATURE_DIM
from service.app import create_app
from service.config import Settings
from tests.helpers import COLOURS, dataset_zip, image_bytes, make_zip

FAST_OPTIONS = {"max_epochs": 15, "patience": 3, "augmentation": {"views": 1},
                "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}


def wait_ready(client, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready: {client.get('/readyz').json}")


def wait_status(client, classifier_id, statuses=("ready", "failed"), timeout=120):
    """The classifier once it has one of `statuses` and its run has ended (a ready one is no
    longer refining)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/classifiers/{classifier_id}").json
        if body["status"] in statuses and not body["refining"]:
            return body
        time.sleep(0.1)
    raise AssertionError(f"classifier still {body['status']}")


def post_dataset(client, data: bytes, options=None):
    form = {"dataset": (io.BytesIO(data), "dataset.zip")}
    if options is not None:
        form["options"] = json.dumps(options)
    return client.post("/v1/classifiers", data=form, content_type="multipart/form-data")


def stored_files(app):
    root = app.extensions["headstart"].store.blobs.root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    app = create_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                              weights_cache=root / "cache", max_upload_bytes=2 * 1024**2,
                              max_predict_images=8))
    wait_ready(app.test_client())
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def ready_classifier(client):
    response = post_dataset(client, dataset_zip(10, root="toys/"), FAST_OPTIONS)
    assert response.status_code == 202, response.json
    return wait_status(client, response.json["id"])


# ---------------------------------------------------------------- lifecycle


def test_create_answers_202_with_location_and_queued_resource(client):
    response = post_dataset(client, dataset_zip(4), {**FAST_OPTIONS, "name": "toys"})
    assert response.status_code == 202
    body = response.json
    assert response.headers["Location"] == f"/v1/classifiers/{body['id']}"
    assert body["status"] in ("queued", "training") and body["name"] == "toys"
    assert body["labels"] == ["blue", "red"]
    assert body["dataset"]["per_label"] == {"blue": 4, "red": 4}
    assert body["backbone"]["weights"] == "random"
    wait_status(client, body["id"])


def test_classifier_becomes_ready_with_metrics(ready_classifier):
    assert ready_classifier["status"] == "ready", ready_classifier
    assert ready_classifier["progress"] is None and ready_classifier["refining"] is False
    assert ready_classifier["stage"] in ("preview", "augmented")
    assert 0 <= ready_classifier["metrics"]["val_accuracy"] <= 1


def test_report_has_the_contract_fields(client, ready_classifier):
    report = client.get(f"/v1/classifiers/{ready_classifier['id']}/report").json
    assert report["classifier_id"] == ready_classifier["id"]
    # Every image trains the served head and is validated once, out of fold.
    assert report["m"]["train"] == report["m"]["validation"] == 20
    assert report["selection"]["k"] == 5 and report["selection"]["candidates"]
    views = {"preview": 0, "augmented": 1}[report["stage"]]  # the served stage's
    assert report["m"]["train_after_augmentation"] == report["m"]["train"] * (1 + views)
    assert report["final"] is True
    assert [stage["stage"] for stage in report["stages"]] == ["preview", "augmented"]
    assert report["d"] == FEATURE_DIM * 2 + 2
    assert report["d_over_m"] == pytest.approx(report["d"] / report["m"]["train_after_augmentation"],
                                               abs=1e-3)
    assert report["history"][0]["epoch"] == 1 and "val_loss" in report["history"][0]
    assert 1 <= report["best_epoch"] <= len(report["history"])
    assert set(report["validation"]["per_label"]) == {"blue", "red"}
    assert len(report["validation"]["confusion_matrix"]) == 2
    assert report["options"]["augmentation"]["views"] == 1
    assert report["backbone"]["name"] == "vgg16" and report["device"] == "CPU"
    assert report["diagnosis"]


def test_list_is_newest_first(client, ready_classifier):
    newer = post_dataset(client, dataset_zip(3), FAST_OPTIONS).json
    listed = client.get("/v1/classifiers").json["classifiers"]
    ids = [c["id"] for c in listed]
    assert ids.index(newer["id"]) < ids.index(ready_classifier["id"])
    wait_status(client, newer["id"])


def test_predict_multipart_and_json_give_the_same_scores(client, ready_classifier):
    url = f"/v1/classifiers/{ready_classifier['id']}/predict"
    images = [image_bytes(COLOURS["red"], seed=101), image_bytes(COLOURS["blue"], seed=102)]
    multipart = client.post(url, data={"image": [(io.BytesIO(d), f"{i}.png")
                                                 for i, d in enumerate(images)]},
                            content_type="multipart/form-data")
    as_json = client.post(url, json={"instances": [{"b64": base64.b64encode(d).decode()}
                                                   for d in images]})
    assert multipart.status_code == as_json.status_code == 200
    assert multipart.json == as_json.json
    predictions = multipart.json["predictions"]
    assert len(predictions) == 2
    for prediction in predictions:
        scores = [entry["score"] for entry in prediction["top_k"]]
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert prediction["label"] == prediction["top_k"][0]["label"]


def test_top_k_limits_the_list(client, ready_classifier):
    url = f"/v1/classifiers/{ready_classifier['id']}/predict?top_k=1"
    response = client.post(url, data={"image": (io.BytesIO(image_bytes()), "x.png")},
                           content_type="multipart/form-data")
    assert [len(p["top_k"]) for p in response.json["predictions"]] == [1]


def test_a_training_image_scores_the_same_over_http_as_in_process(app, client, ready_classifier):
    """The invariant: training and serving preprocess an image identically."""
    from models import calibration
    from models.heads import HeadSpec, load_head
    from models.prediction import class_scores
    from models.preprocessing import load_image
    from service.jobs.datasets import Dataset

    services = app.extensions["headstart"]
    classifier_id = ready_classifier["id"]
    archive = io.BytesIO()
    services.store.load_dataset(classifier_id, archive)
    image = Dataset.from_archive(archive.getvalue()).images[0]
    backbone = services.backbone.get()
    record = services.store.load_record(classifier_id)
    head = load_head(HeadSpec(**record.head.model_dump()), FEATURE_DIM, 2,
                     services.store.load_head(record))
    raw = class_scores(backbone, head, load_image(image.data, 32)[None])
    # NB: the service's scores are calibrated: the head's logits divided by its temperature
    expected = calibration.softmax(calibration.logits_from_probabilities(raw),
                                   services.heads.get(record).trust.temperature)[0]
    response = client.post(f"/v1/classifiers/{classifier_id}/predict",
                           data={"image": (io.BytesIO(image.data), "train.png")},
                           content_type="multipart/form-data")
    scores = {e["label"]: e["score"] for e in response.json["predictions"][0]["top_k"]}
    np.testing.assert_allclose([scores[label] for label in record.labels], expected, rtol=1e-5)


def test_delete_removes_everything(app, client):
    created = post_dataset(client, dataset_zip(3), FAST_OPTIONS).json
    wait_status(client, created["id"])
    assert client.delete(f"/v1/classifiers/{created['id']}").status_code == 204
    assert client.get(f"/v1/classifiers/{created['id']}").status_code == 404
    # Only the tombstone is left: it stops a late worker write from bringing the classifier back.
    assert [f for f in stored_files(app) if created["id"] in f] == [f"deleted/{created['id']}"]


def test_delete_cancels_a_running_job_within_seconds(app, client):
    slow = {**FAST_OPTIONS, "augmentation": {"views": 8}, "max_epochs": 1000, "patience": 200}
    created = post_dataset(client, dataset_zip(40), slow).json
    wait_status(client, created["id"], statuses=("training",))
    started = time.monotonic()
    assert client.delete(f"/v1/classifiers/{created['id']}").status_code == 204
    assert time.monotonic() - started < 5
    assert client.get(f"/v1/classifiers/{created['id']}").status_code == 404
    time.sleep(1.5)  # the job must not resurrect the record with a late progress write
    # Only the tombstone is left: it stops a late worker write from bringing the classifier back.
    assert [f for f in stored_files(app) if created["id"] in f] == [f"deleted/{created['id']}"]


def test_progress_is_visible_while_training(app, client, monkeypatch):
    """The job is held right after its first progress write in the training stage (a hook on
    the store), so the resource is read while that progress is current, on every run."""
    slow = {**FAST_OPTIONS, "augmentation": {"views": 1}, "max_epochs": 300, "patience": 200}
    blobs = app.extensions["headstart"].store.blobs
    posted, shown, seen = threading.Event(), threading.Event(), threading.Event()
    created = {}
    put_if = blobs.put_if

    def hold_at_the_first_epoch(key, data, tag):
        new_tag = put_if(key, data, tag)
        if key.endswith("/record.json") and not shown.is_set() and \
                (json.loads(data).get("progress") or {}).get("stage") == "training":
            posted.wait(timeout=60)
            if key == f"classifiers/{created.get('id')}/record.json":
                shown.set()
                seen.wait(timeout=60)
        return new_tag

    monkeypatch.setattr(blobs, "put_if", hold_at_the_first_epoch)
    created.update(post_dataset(client, dataset_zip(6), slow).json)
    posted.set()
    try:
        assert shown.wait(timeout=120), "the job never reached the training stage"
        body = client.get(f"/v1/classifiers/{created['id']}").json
    finally:
        seen.set()
    assert body["status"] == "training"
    assert body["progress"]["stage"] == "training"
    assert body["progress"]["max_epochs"] == 300
    assert body["progress"]["epoch"] >= 1
    assert client.delete(f"/v1/classifiers/{created['id']}").status_code == 204


# ---------------------------------------------------------------- states and errors


def test_report_and_predict_answer_409_until_ready(client):
    slow = {**FAST_OPTIONS, "augmentation": {"views": 8}, "max_epochs": 1000, "patience": 200}
    created = post_dataset(client, dataset_zip(30), slow).json
    report = client.get(f"/v1/classifiers/{created['id']}/report")
    predict = client.post(f"/v1/classifiers/{created['id']}/predict",
                          data={"image": (io.BytesIO(image_bytes()), "x.png")},
                          content_type="multipart/form-data")
    assert report.status_code == predict.status_code == 409
    assert report.mimetype == "application/problem+json"
    client.delete(f"/v1/classifiers/{created['id']}")


@pytest.mark.parametrize("path", ["/v1/classifiers/clf_00000000000000000000",
                                  "/v1/classifiers/../../etc/passwd", "/v1/classifiers/x/report"])
def test_unknown_classifier_is_404_problem(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert {"type", "title", "status", "detail"} <= set(response.json)


def test_unknown_route_and_wrong_method_are_problems(client):
    missing = client.get("/v2/nothing")
    wrong = client.put("/v1/classifiers")
    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert missing.mimetype == wrong.mimetype == "application/problem+json"
    assert "POST" in wrong.headers["Allow"]


def test_upload_over_the_limit_is_413_problem_and_stores_nothing(app, client):
    before = stored_files(app)
    boundary = "headstart-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; "
            f"filename=\"big.zip\"\r\n\r\n").encode() + b"x" * (3 * 1024**2) + \
        f"\r\n--{boundary}--\r\n".encode()
    # NB: a raw body, so the test client spools nothing to a temp file it would leave open.
    response = client.post("/v1/classifiers", data=body,
                           content_type=f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    assert response.json["detail"] == ("the request body is larger than the limit of "
                                       f"{2 * 1024**2} bytes (HEADSTART_MAX_UPLOAD_BYTES)")
    assert stored_files(app) == before


@pytest.mark.parametrize("options, field", [
    ({"max_epochs": 0}, "max_epochs"),
    ({"unknown": 1}, "unknown"),
    ({"augmentation": {"views": -1}}, "augmentation.views"),
    ({"augmentation": {"spin": True}}, "augmentation.spin"),
    ({"head": "big"}, "head"),
    ({"validation_split": 0.9}, "validation_split"),
])
def test_bad_options_are_422_naming_the_field(app, client, options, field):
    before = stored_files(app)
    response = post_dataset(client, dataset_zip(3), options)
    assert response.status_code == 422, response.json
    assert any(error["field"].startswith(field) for error in response.json["errors"])
    assert stored_files(app) == before


def test_options_that_are_not_json_are_400(client):
    response = client.post("/v1/classifiers", data={"dataset": (io.BytesIO(dataset_zip(3)), "d.zip"),
                                                    "options": "{nope"},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and "JSON" in response.json["detail"]


def test_missing_dataset_part_is_400(client):
    response = client.post("/v1/classifiers", data={"file": (io.BytesIO(b"x"), "d.zip")},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and "dataset" in response.json["detail"]


@pytest.mark.parametrize("members, status, words", [
    ({"cat/1.png": image_bytes(), "cat/2.png": image_bytes(seed=1)}, 422, "at least 2 labels"),
    ({"cat/1.png": image_bytes(), "cat/2.png": image_bytes(seed=1), "dog/1.png": image_bytes()},
     422, "dog"),
    ({"../evil/1.png": image_bytes(), "cat/1.png": image_bytes()}, 400, ".."),
    ({"/abs/1.png": image_bytes(), "cat/1.png": image_bytes()}, 400, "absolute"),
    ({"cat\\1.png": image_bytes(), "dog/1.png": image_bytes()}, 400, "backslash"),
    ({"cat/inner.zip": make_zip({"a": b"b"}), "dog/1.png": image_bytes()}, 400, "archive"),
])
def test_bad_datasets_are_refused_and_store_nothing(app, client, members, status, words):
    before = stored_files(app)
    response = post_dataset(client, make_zip(members))
    assert response.status_code == status, response.json
    assert response.mimetype == "application/problem+json"
    assert words.lower() in response.json["detail"].lower()
    assert stored_files(app) == before


def test_not_a_zip_is_400(client):
    response = post_dataset(client, b"this is not a zip file")
    assert response.status_code == 400


def test_undecodable_files_are_skipped_and_listed(client):
    members = {f"{label}/{i}.png": image_bytes(COLOURS[label], seed=i)
               for label in ("red", "blue") for i in range(3)}
    members["red/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    members["blue/notes.txt"] = b"hello"
    response = post_dataset(client, make_zip(members), FAST_OPTIONS)
    assert response.status_code == 202
    skipped = {entry["path"] for entry in response.json["dataset"]["skipped"]}
    assert skipped == {"red/broken.jpg", "blue/notes.txt"}
    assert response.json["dataset"]["images"] == 6
    wait_status(client, response.json["id"])


@pytest.mark.parametrize("data", [b"not an image", b"\x89PNG\r\n\x1a\n broken", b""])
def test_bad_prediction_images_are_422_and_the_service_keeps_serving(client, ready_classifier, data):
    url = f"/v1/classifiers/{ready_classifier['id']}/predict"
    response = client.post(url, data={"image": (io.BytesIO(data), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 422 and response.json["errors"][0]["field"] == "image.0"
    good = client.post(url, data={"image": (io.BytesIO(image_bytes()), "x.png")},
                       content_type="multipart/form-data")
    assert good.status_code == 200


def test_predict_without_images_or_with_too_many_is_400(client, ready_classifier):
    url = f"/v1/classifiers/{ready_classifier['id']}/predict"
    assert client.post(url, data={}, content_type="multipart/form-data").status_code == 400
    many = {"image": [(io.BytesIO(image_bytes(seed=i)), f"{i}.png") for i in range(9)]}
    response = client.post(url, data=many, content_type="multipart/form-data")
    assert response.status_code == 400 and "limit" in response.json["detail"]


def _bomb_png() -> bytes:
    """60 million pixels (over the 40 M limit) in a few kilobytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, status, says", [
    ("bomb.png", _bomb_png(), 422, "pixels"),
    ("truncated.jpg", image_bytes(fmt="JPEG")[:200], 422, "truncated"),
    ("notes.png", b"just text, not an image", 422, "not a recognised image"),
    ("huge.gif", None, 422, "pixels"),
    ("png-named.jpg", image_bytes(fmt="PNG"), 200, None),
    ("animated.gif", None, 200, None),
    ("sixteen-bit.png", None, 200, None),
])
def test_hostile_and_odd_predict_images(client, ready_classifier, name, data, status, says):
    from tests.test_datasets import animated_gif, png_16_bit

    if data is None:
        data = {"animated.gif": animated_gif, "sixteen-bit.png": png_16_bit,
                "huge.gif": _huge_gif}[name]()
    url = f"/v1/classifiers/{ready_classifier['id']}/predict"
    response = client.post(url, data={"image": (io.BytesIO(data), name)},
                           content_type="multipart/form-data")
    assert response.status_code == status, response.json
    if says:
        assert response.mimetype == "application/problem+json" and says in response.json["detail"]
    healthy = client.post(url, data={"image": (io.BytesIO(image_bytes()), "ok.png")},
                          content_type="multipart/form-data")
    assert healthy.status_code == 200  # and the process keeps serving


def _huge_gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("P", (9_000, 5_000)).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("body, status", [
    ({"instances": [{"b64": "***"}]}, 400),
    ({"instances": []}, 422),
    ({"images": []}, 422),
    ({"instances": [{"b64": "aGk=", "extra": 1}]}, 422),
])
def test_bad_json_predict_bodies(client, ready_classifier, body, status):
    response = client.post(f"/v1/classifiers/{ready_classifier['id']}/predict", json=body)
    assert response.status_code == status, response.json


def test_malformed_json_predict_body_is_400(client, ready_classifier):
    response = client.post(f"/v1/classifiers/{ready_classifier['id']}/predict",
                           data=b"{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json["detail"]


def test_bad_top_k_is_422(client, ready_classifier):
    response = client.post(f"/v1/classifiers/{ready_classifier['id']}/predict?top_k=0",
                           data={"image": (io.BytesIO(image_bytes()), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 422


# ---------------------------------------------------------------- operations


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/startupz").json == {"status": "ok"}
    ready = client.get("/readyz").json
    assert ready["ready"] is True
    assert ready["checks"] == {"backbone": "ok", "batcher": "ok", "store": "ok", "queue": "ok"}
    assert ready["backbone"]["weights"] == "random"


def test_readyz_is_503_while_the_backbone_loads(tmp_path):
    app = create_app(Settings(store=str(tmp_path / "s"), backbone_weights=str(tmp_path / "no.h5"),
                              image_size=32, weights_cache=tmp_path / "c"))
    client = app.test_client()
    deadline = time.monotonic() + 30
    while app.extensions["headstart"].backbone.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["backbone"].startswith("failed")
    startup = client.get("/startupz")
    assert startup.status_code == 503 and startup.json["status"].startswith("failed")
    create = post_dataset(client, dataset_zip(3))
    assert create.status_code == 503 and create.mimetype == "application/problem+json"


def backbone_images(client) -> dict[str, float]:
    """headstart_backbone_images_total by purpose, from /metrics."""
    prefix = 'headstart_backbone_images_total{purpose="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in client.get("/metrics").data.decode().splitlines()
            if line.startswith(prefix)}


def test_metrics_count_requests_predictions_and_backbone_passes(client, ready_classifier):
    before = backbone_images(client)
    client.post(f"/v1/classifiers/{ready_classifier['id']}/predict",
                data={"image": (io.BytesIO(image_bytes()), "x.png")},
                content_type="multipart/form-data")
    text = client.get("/metrics").data.decode()
    assert 'headstart_http_requests_total{method="POST",route="/v1/classifiers",status="202"}' in text
    assert "headstart_predict_queued_images 0.0" in text
    assert "headstart_predicted_images_total" in text
    assert 'headstart_classifiers{status="ready"}' in text
    after = backbone_images(client)
    assert after["predict"] - before["predict"] == 1
    # In-process training counts here too: every (image, view) of the new classifier.
    features = client.get(f"/v1/classifiers/{ready_classifier['id']}/report").json["features"]
    assert features["computed"] == features["requested"] == 20 * (1 + 1)
    assert features["from_cache"] == 0
    assert after["training"] >= features["computed"]


def test_openapi_documents_every_route_from_the_pydantic_models(client):
    document = client.get("/openapi.json").json
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in [("/v1/classifiers", "post"), ("/v1/classifiers", "get"),
                         ("/v1/classifiers/{classifier_id}", "get"),
                         ("/v1/classifiers/{classifier_id}", "delete"),
                         ("/v1/classifiers/{classifier_id}/report", "get"),
                         ("/v1/classifiers/{classifier_id}/predict", "post"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    schemas = document["components"]["schemas"]
    assert {"Classifier", "Report", "PredictionResponse", "Problem", "TrainingOptions"} <= set(schemas)
    assert {"refining", "stage"} <= set(schemas["Classifier"]["properties"])
    assert {"final", "stage", "stages"} <= set(schemas["Report"]["properties"])
    assert paths["/v1/classifiers"]["post"]["summary"].startswith("Create a classifier")


def test_docs_page_is_served_without_internet(client):
    page = client.get("/docs")
    assert page.status_code == 200 and b"swagger-ui" in page.data
    with client.get("/docs/static/swagger-ui-bundle.js") as script:
        assert script.status_code == 200


def test_restart_keeps_classifiers_and_requeues_interrupted_jobs(tmp_path, app, ready_classifier):
    """The store is the only state: a new process sees every classifier, and a job left
    'training' by a dead process is run again."""
    import shutil

    from service.storage.records import ClassifierRecord

    root = tmp_path / "store"
    shutil.copytree(app.extensions["headstart"].store.blobs.root, root)
    record_path = root / "classifiers" / ready_classifier["id"] / "record.json"
    record = ClassifierRecord.model_validate_json(record_path.read_text())
    interrupted = record.model_copy(update={"id": "clf_000000000interrupted", "status": "training"})
    (root / "classifiers" / interrupted.id).mkdir()
    for name in ("dataset.zip",):
        shutil.copy(root / "classifiers" / record.id / name, root / "classifiers" / interrupted.id)
    (root / "classifiers" / interrupted.id / "record.json").write_text(interrupted.model_dump_json())

    restarted = create_app(Settings(store=str(root), backbone_weights="random", image_size=32,
                                    weights_cache=tmp_path / "cache"))
    client = restarted.test_client()
    wait_ready(client)
    assert client.get(f"/v1/classifiers/{record.id}").json["status"] == "ready"
    assert wait_status(client, interrupted.id)["status"] == "ready"
