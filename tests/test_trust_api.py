"""Trustworthy scores and dataset health through HTTP: calibration, threshold and health in the
report, calibrated and rejecting predict, old heads without trust data, and suggest. Flask's test
client against a real local store and the real runner thread; random weights at 32 px."""

import base64
import io

import numpy as np
import pytest

from models import calibration
from tests.helpers import COLOURS, checkerboard, image_bytes, labelled_images, make_zip
from tests.test_api import app, client, post_dataset, wait_status  # noqa: F401 (fixtures)

#: An exact head (L-BFGS) and 8 folds: with 8 images per label every fold holds one of each,
#: so the two copies of red/0.png are in different folds (deterministically across_split).
OPTIONS = {"validation_split": 0.125, "augmentation": {"views": 1},
           "head": {"hidden_units": 0, "dropout": 0.0, "l2": 1.0}}


def trust_dataset() -> dict[str, bytes]:
    members = labelled_images(8, ("red", "blue"))
    members["red/7.png"] = members["red/0.png"]            # a copy, in another fold
    members["blue/7.png"] = image_bytes(COLOURS["red"], seed=77)  # a red image filed as blue
    return members


@pytest.fixture(scope="module")
def classifier(client):
    response = post_dataset(client, make_zip(trust_dataset()), OPTIONS)
    assert response.status_code == 202, response.json
    body = wait_status(client, response.json["id"])
    assert body["status"] == "ready", body
    return body


@pytest.fixture(scope="module")
def report(client, classifier):
    response = client.get(f"/v1/classifiers/{classifier['id']}/report")
    assert response.status_code == 200
    return response.json


def predict(client, classifier_id: str, images: list[bytes], query: str = "", as_json=False):
    url = f"/v1/classifiers/{classifier_id}/predict?top_k=2{query}"
    if as_json:
        return client.post(url, json={"instances": [{"b64": base64.b64encode(d).decode()}
                                                    for d in images]})
    return client.post(url, content_type="multipart/form-data",
                       data={"image": [(io.BytesIO(d), f"{i}.png") for i, d in enumerate(images)]})


def test_report_has_calibration_threshold_ood_and_health(report, classifier):
    fitted = report["calibration"]
    assert calibration.TEMPERATURE_BOUNDS[0] <= fitted["temperature"] <= \
        calibration.TEMPERATURE_BOUNDS[1]
    assert 0 <= fitted["ece_before"] <= 1 and 0 <= fitted["ece_after"] <= 1
    assert fitted["images"] == 16  # every image, out of fold
    assert report["threshold"] == 0.0 == classifier["threshold"]  # no target precision asked
    assert report["rejection"]["target_precision"] is None
    assert report["ood"]["enabled"] is True and report["ood"]["method"] == "knn"
    assert report["ood"]["threshold"] > 0
    assert set(report["timings_s"]) >= {"trust"}


def test_health_names_the_planted_copy_across_folds_with_its_paths(report):
    health = report["health"]
    assert health["duplicates"] == [{"paths": ["red/0.png", "red/7.png"],
                                     "labels": ["red", "red"], "across_split": True,
                                     "conflicting_labels": False}]
    assert health["counts"]["across_split"] >= 1
    assert any("validation accuracy is inflated" in warning for warning in health["warnings"])
    assert health["imbalance"]["per_label"] == {"blue": 8, "red": 8}
    for entry in health["suspected_mislabels"]:
        assert set(entry) == {"path", "given", "predicted", "confidence"}
        assert entry["path"].split("/")[0] == entry["given"]


def test_scores_are_the_heads_divided_by_the_temperature(app, client, classifier, report):
    from models.heads import HeadSpec, load_head
    from models.prediction import class_scores
    from models.preprocessing import load_image

    services = app.extensions["headstart"]
    record = services.store.load_record(classifier["id"])
    head = load_head(HeadSpec(**record.head.model_dump()), services.backbone.get().feature_dim,
                     2, services.store.load_head(record))
    image = image_bytes(COLOURS["blue"], seed=501)
    raw = class_scores(services.backbone.get(), head, load_image(image, 32)[None])
    served = services.heads.get(record)
    expected = calibration.softmax(calibration.logits_from_probabilities(raw),
                                   served.trust.temperature)[0]
    assert served.trust.temperature == pytest.approx(report["calibration"]["temperature"],
                                                     abs=1e-4)
    response = predict(client, classifier["id"], [image])
    answer = response.json["predictions"][0]
    scores = {entry["label"]: entry["score"] for entry in answer["top_k"]}
    np.testing.assert_allclose([scores[label] for label in record.labels], expected, atol=1e-5)
    assert answer["rejected"] is False and answer["reason"] is None
    assert answer["label"] == answer["top_k"][0]["label"]


def test_a_threshold_rejects_below_it_and_keeps_top_k_in_both_encodings(client, classifier):
    images = [image_bytes(COLOURS["red"], seed=601), image_bytes(COLOURS["blue"], seed=602)]
    open_answers = predict(client, classifier["id"], images).json["predictions"]
    for as_json in (False, True):
        response = predict(client, classifier["id"], images, "&threshold=1", as_json=as_json)
        assert response.status_code == 200
        for answer, unfiltered in zip(response.json["predictions"], open_answers):
            assert answer["label"] is None and answer["rejected"] is True
            assert answer["reason"] == "below_threshold"
            assert answer["top_k"] == unfiltered["top_k"]
            assert answer["score"] == unfiltered["score"] < 1
    accepted = predict(client, classifier["id"], images, "&threshold=0").json["predictions"]
    assert [a["rejected"] for a in accepted] == [False, False]


def test_threshold_0_99_rejects_a_training_image_the_head_is_not_that_sure_of(client, classifier):
    # A training image is never out of distribution (distance 0 to itself); calibrated, the
    # head gives this one about 0.9.
    image = trust_dataset()["red/3.png"]
    assert predict(client, classifier["id"], [image]).json["predictions"][0]["label"] == "red"
    answer = predict(client, classifier["id"], [image], "&threshold=0.99").json["predictions"][0]
    assert answer["score"] < 0.99
    assert (answer["label"], answer["rejected"], answer["reason"]) == \
        (None, True, "below_threshold")


@pytest.mark.parametrize("value", ["2", "-0.1", "abc", "nan", ""])
def test_a_bad_threshold_is_a_400_problem(client, classifier, value):
    response = predict(client, classifier["id"], [image_bytes()], f"&threshold={value}")
    assert response.status_code == 400
    assert response.content_type == "application/problem+json"
    assert response.json["errors"][0]["field"] == "threshold"


def test_an_image_unlike_the_training_images_is_rejected_as_out_of_distribution(
        app, client, classifier):
    training_image = trust_dataset()["red/3.png"]
    response = predict(client, classifier["id"], [training_image, checkerboard()])
    known, foreign = response.json["predictions"]
    assert (known["label"], known["rejected"]) == ("red", False)
    assert (foreign["label"], foreign["rejected"], foreign["reason"]) == \
        (None, True, "out_of_distribution")
    assert len(foreign["top_k"]) == 2
    served = app.extensions["headstart"].heads.get(
        app.extensions["headstart"].store.load_record(classifier["id"]))
    assert served.trust.detector.threshold > 0  # the reference is tight, not empty


def test_a_head_stored_before_trust_data_predicts_uncalibrated_and_rejects_nothing(app, client):
    from models.heads import serialize_weights
    from models.prediction import class_scores
    from models.preprocessing import load_image

    services = app.extensions["headstart"]
    created = post_dataset(client, make_zip(labelled_images(4)), OPTIONS).json
    wait_status(client, created["id"])
    current = services.store.load_versioned(created["id"])
    old = current.record.model_copy(update={"run": "old-run", "threshold": None})
    head = services.heads.get(current.record).head
    services.store.save_head(old.id, "old-run", serialize_weights(head))  # weights only
    services.store.save_report(old.id, "old-run", services.store.load_report(current.record))
    services.store.save_record(old, current.tag)
    served = services.heads.get(old)
    assert served.trust is None
    raw = class_scores(services.backbone.get(), head, load_image(checkerboard(), 32)[None])[0]
    answer = predict(client, old.id, [checkerboard()]).json["predictions"][0]
    assert answer["rejected"] is False and answer["label"] is not None
    assert {e["label"]: e["score"] for e in answer["top_k"]}[old.labels[0]] == \
        pytest.approx(float(raw[0]), abs=1e-5)
    strict = predict(client, old.id, [labelled_images(4)["red/1.png"]],
                     "&threshold=1").json["predictions"][0]
    assert strict["score"] < 1 and strict["reason"] == "below_threshold"
    assert client.get(f"/v1/classifiers/{old.id}").json["threshold"] is None


def test_suggest_ranks_unlabeled_images_most_uncertain_first(client, classifier):
    images = {"batch/a/red.png": image_bytes(COLOURS["red"], seed=801),
              "batch/blue.png": image_bytes(COLOURS["blue"], seed=802),
              "purple.png": image_bytes((120, 50, 120), seed=803),
              "deep/er/pinkish.png": image_bytes((170, 45, 90), seed=804),
              "batch/board.png": checkerboard(),
              "notes.txt": b"not an image",
              # NB: more than one predict request's worth (8 in this app): scored in two parts
              **{f"more/{i}.png": image_bytes(COLOURS["red" if i % 2 else "blue"], seed=810 + i)
                 for i in range(5)}}
    response = client.post(f"/v1/classifiers/{classifier['id']}/suggest?limit=4",
                           content_type="multipart/form-data",
                           data={"dataset": (io.BytesIO(make_zip(images)), "unlabeled.zip")})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["method"] == "margin" and body["images"] == 10
    assert [item["path"] for item in body["skipped"]] == ["notes.txt"]
    ranked = body["suggestions"]
    assert len(ranked) == 4 and {entry["path"] for entry in ranked} <= set(images)
    in_distribution = [e["uncertainty"] for e in ranked if not e["out_of_distribution"]]
    assert in_distribution == sorted(in_distribution, reverse=True)
    assert [e["out_of_distribution"] for e in ranked] == sorted(e["out_of_distribution"]
                                                                for e in ranked)
    for entry in ranked:  # the same calibrated scores predict gives
        answer = predict(client, classifier["id"], [images[entry["path"]]]).json["predictions"][0]
        top, second = (e["score"] for e in answer["top_k"])
        assert entry["uncertainty"] == pytest.approx(1 - (top - second), abs=1e-3)
        assert entry["label"] == answer["top_k"][0]["label"]
        assert entry["out_of_distribution"] == (answer["reason"] == "out_of_distribution")
    entropy = client.post(f"/v1/classifiers/{classifier['id']}/suggest?method=entropy",
                          content_type="multipart/form-data",
                          data={"dataset": (io.BytesIO(make_zip(images)), "unlabeled.zip")})
    assert entropy.json["method"] == "entropy" and len(entropy.json["suggestions"]) == 10


def test_suggest_refuses_what_is_not_a_zip_of_images(client, classifier):
    url = f"/v1/classifiers/{classifier['id']}/suggest"
    not_zip = client.post(url, content_type="multipart/form-data",
                          data={"dataset": (io.BytesIO(b"hello"), "x.zip")})
    assert not_zip.status_code == 400
    no_images = client.post(url, content_type="multipart/form-data",
                            data={"dataset": (io.BytesIO(make_zip({"a.txt": b"x"})), "x.zip")})
    assert no_images.status_code == 422
    assert client.post(url).status_code == 400
    assert client.post(f"{url}?limit=0").status_code == 422
