"""The feature cache: views drawn per (seed, image, view), the backbone run only for the
(image, view) pairs the cache lacks, a classifier's cache in the store (bounded, merged by
compare-and-set, removed with the classifier), and `headstart_backbone_images_total`.

Random weights at 32 px on real stores: a local directory here, SeaweedFS's S3 in
tests/test_store.py (the object's compare-and-set).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Sequence

import numpy as np
import pytest

from models.augmentation import augment, augment_each, view_rng
from models.backbone import FEATURE_DIM, counted_as
from models.features import extract_features, image_hash, view_keys
from models.options import AugmentationOptions, TrainingOptions
from service.app import create_app
from service.config import Settings
from service.jobs.classifiers import create_classifier, delete_classifier
from service.jobs.training import run_training_job
from service.storage.archive import Dataset, DatasetImage
from service.storage.blobs import StoreUnavailable
from service.storage.classifiers import ClassifierStore
from service.storage.features import KEY_BYTES, StoredFeatureCache, decode
from tests.helpers import (COLOURS, ROOT, image_bytes, labelled_images, make_zip,
                           require_server, stop)
from tests.test_api import post_dataset, wait_ready, wait_status
from tests.test_jobs import files, mark_training, services, with_settings  # noqa: F401
from tests.test_store import s3_client_for, s3_store, seaweed  # noqa: F401
from tools.localservers import RedisServer, free_port, redis_server_program

VIEWS = 2
AUGMENTATION = AugmentationOptions(views=VIEWS)
OPTIONS = TrainingOptions.model_validate({
    "max_epochs": 5, "head": {"hidden_units": 0, "dropout": 0, "l2": 0.01},
    "augmentation": {"views": VIEWS}})
ROW_BYTES = KEY_BYTES + FEATURE_DIM * 4


def toy(count: int, start: int = 0) -> list[bytes]:
    return [image_bytes(COLOURS["red" if i % 2 else "blue"], seed=1000 + i)
            for i in range(start, start + count)]


def create(services, per_label: int = 4) -> str:
    return create_classifier(services, io.BytesIO(make_zip(labelled_images(per_label))),
                             OPTIONS).id


class MemoryCache:
    """The `FeatureCache` protocol over a dict: the store's adapter is tested below."""

    def __init__(self):
        self.rows: dict[bytes, np.ndarray] = {}

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        return {key: self.rows[key] for key in keys if key in self.rows}

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        self.rows.update(zip(keys, rows.copy()))


def extract(images, backbone, cache=None, views=VIEWS, seed=0, augmentation=AUGMENTATION,
            batch_size=4):
    before = backbone.passes
    features = extract_features(images, backbone, views=views, augmentation=augmentation,
                                seed=seed, batch_size=batch_size, cache=cache)
    return features, backbone.passes - before


# ---------------------------------------------------------------- views

def test_a_view_is_drawn_as_augment_draws_it_from_its_own_generator():
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    hashes = [bytes([i]) * 32 for i in range(3)]
    each = augment_each(pixels, AUGMENTATION, [view_rng(7, h, 1) for h in hashes])
    for i, h in enumerate(hashes):  # the same draws, in the same order, as one-image `augment`
        np.testing.assert_array_equal(each[i], augment(pixels[i:i + 1], AUGMENTATION,
                                                       view_rng(7, h, 1))[0])
    assert not np.allclose(each[0], augment_each(pixels[:1], AUGMENTATION,
                                                 [view_rng(7, hashes[0], 2)])[0])
    assert not np.allclose(each[0], augment_each(pixels[:1], AUGMENTATION,
                                                 [view_rng(8, hashes[0], 1)])[0])


def test_views_keep_the_augmentation_distribution():
    """About half the views are mirrored, as with one generator for the dataset."""
    pixels = np.zeros((200, 32, 32, 3), np.float32)
    pixels[:, :, :16] = 255  # left half white: a mirrored view is white on the right
    options = AugmentationOptions(noise=0, rotation=0, shift=0)
    views = augment_each(pixels, options, [view_rng(0, image_hash(bytes([i % 256, i // 256])), 1)
                                           for i in range(200)])
    mirrored = (views[:, :, 24:].mean(axis=(1, 2, 3)) > 128).mean()
    assert 0.4 < mirrored < 0.6


def test_a_view_is_the_same_however_the_dataset_is_ordered_or_extended(backbone):
    images = toy(6)
    first, _ = extract(images, backbone)
    order = [5, 2, 0, 4, 1, 3]
    shuffled, _ = extract([images[i] for i in order] + toy(3, start=6), backbone)
    np.testing.assert_allclose(shuffled[:6], first[order], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the cache in extraction

def test_an_unchanged_dataset_passes_nothing_through_the_backbone(backbone):
    images, cache = toy(6), MemoryCache()
    first, passes = extract(images, backbone, cache)
    assert passes == 6 * (1 + VIEWS) and len(cache.rows) == 6 * (1 + VIEWS)
    again, passes = extract(images, backbone, cache)
    assert passes == 0
    np.testing.assert_array_equal(again, first)  # bit-identical
    uncached, _ = extract(images, backbone)
    np.testing.assert_array_equal(uncached, first)  # and what the backbone gives without it


def test_added_images_cost_only_their_own_views(backbone):
    images, cache = toy(6), MemoryCache()
    first, _ = extract(images, backbone, cache)
    more = images[:3] + toy(2, start=6) + images[3:]
    features, passes = extract(more, backbone, cache)
    assert passes == 2 * (1 + VIEWS)
    np.testing.assert_array_equal(features[[0, 1, 2, 5, 6, 7]], first)
    uncached, _ = extract(more, backbone)
    np.testing.assert_allclose(features, uncached, rtol=1e-5, atol=1e-5)


def test_the_key_names_views_seed_augmentation_and_backbone(backbone):
    images, cache = toy(4), MemoryCache()
    extract(images, backbone, cache)
    assert extract(images, backbone, cache, views=VIEWS + 1)[1] == 4  # only the new view
    assert extract(images, backbone, cache, seed=1)[1] == 4 * VIEWS  # view 0 is shared
    rotated = AUGMENTATION.model_copy(update={"rotation": 5.0})
    assert extract(images, backbone, cache, augmentation=rotated)[1] == 4 * VIEWS
    hashes = [image_hash(data) for data in images]
    ours = view_keys(hashes, backbone, views=1, augmentation=AUGMENTATION, seed=0)
    other = backbone.in_precision("mixed_bfloat16")
    theirs = view_keys(hashes, other, views=1, augmentation=AUGMENTATION, seed=0)
    assert not {key for row in ours for key in row} & {key for row in theirs for key in row}
    assert {len(key) for row in ours for key in row} == {KEY_BYTES}


# ---------------------------------------------------------------- the store's cache

def test_the_stored_cache_is_read_by_the_next_run_and_merges_concurrent_writers(services,
                                                                               backbone):
    classifier_id = create(services)
    images = toy(4)
    one = StoredFeatureCache(services.store, classifier_id, max_bytes=2**30)
    two = StoredFeatureCache(services.store, classifier_id, max_bytes=2**30)
    assert one.get([b"x" * 32]) == {} and two.get([b"x" * 32]) == {}  # both read "no object"
    extract(images[:2], backbone, one)
    extract(images[2:], backbone, two)  # conflicts with one's write, reads it, merges
    assert two.summary["stored"] == 2 * 2 * (1 + VIEWS) and two.summary["note"] is None
    third = StoredFeatureCache(services.store, classifier_id, max_bytes=2**30)
    assert extract(images, backbone, third)[1] == 0
    assert third.summary["from_cache"] == third.summary["requested"] == 4 * (1 + VIEWS)


def test_the_bound_keeps_the_newest_rows(services, backbone):
    classifier_id = create(services)
    bound = 5 * ROW_BYTES + ROW_BYTES // 2  # room for five rows
    images = toy(4)
    first = StoredFeatureCache(services.store, classifier_id, max_bytes=bound)
    extract(images[:2], backbone, first)
    assert (first.summary["stored"], first.summary["dropped"]) == (5, 1)
    assert "HEADSTART_FEATURE_CACHE_BYTES" in first.summary["note"]
    second = StoredFeatureCache(services.store, classifier_id, max_bytes=bound)
    _, passes = extract(images[2:], backbone, second)
    assert passes == 2 * (1 + VIEWS)  # nothing of theirs was stored
    keys, rows = decode(services.store.load_features(classifier_id)[0])
    assert len(keys) == len(rows) == 5 and keys.nbytes + rows.nbytes <= bound
    hashes = [image_hash(data) for data in images[2:]]
    newest = view_keys(hashes, backbone, views=VIEWS, augmentation=AUGMENTATION, seed=0)
    assert [key.tobytes() for key in keys] == [key for row in newest for key in row][:5]


def test_a_cache_of_zero_bytes_stores_nothing(services, backbone):
    classifier_id = create(services)
    off = StoredFeatureCache(services.store, classifier_id, max_bytes=0)
    extract(toy(2), backbone, off)
    assert services.store.load_features(classifier_id) is None
    assert off.summary["computed"] == 2 * (1 + VIEWS) and "off" in off.summary["note"]


# ---------------------------------------------------------------- training jobs

def training_images(services) -> float:
    return services.metrics.registry.get_sample_value(
        "headstart_backbone_images_total", {"purpose": "training"})


def rerun(services, classifier_id) -> dict:
    """Runs the classifier's job again, as after a lost worker (its lease expired), and
    returns the new report's features section and the images the backbone passed."""
    before = training_images(services)
    mark_training(services, classifier_id, attempts=1, heartbeat_age_s=60)
    run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready"
    return (json.loads(services.store.load_report(record))["features"],
            training_images(services) - before)


def add_images(services, classifier_id, count: int) -> None:
    """What a new version with more images does to the stored dataset (its API is another
    branch's): the archive gains `count` images."""
    archive = io.BytesIO()
    services.store.load_dataset(classifier_id, archive)
    dataset = Dataset.from_archive(archive.getvalue())
    extra = [DatasetImage(label, f"{label}/new-{i}.png", image_bytes(COLOURS[label], seed=9000 + i))
             for i, label in zip(range(count), ["red", "blue"] * count)]
    dataset.images.extend(extra)
    services.store.save_dataset(classifier_id, io.BytesIO(dataset.to_archive()))


@pytest.fixture
def watched(services):
    services.metrics.watch_backbone(services.backbone.images_by_purpose)
    return services


def test_a_rerun_of_an_unchanged_dataset_runs_no_image_through_the_backbone(watched):
    services = watched
    classifier_id = create(services)
    before = training_images(services)
    run_training_job(services, classifier_id)
    assert training_images(services) - before == 8 * (1 + VIEWS)
    first = json.loads(services.store.load_report(services.store.load_record(classifier_id)))
    assert first["features"]["computed"] == first["features"]["stored"] == 8 * (1 + VIEWS)
    features, passed = rerun(services, classifier_id)
    assert passed == 0
    assert features["from_cache"] == features["requested"] == 8 * (1 + VIEWS)
    assert features["computed"] == 0


def test_on_s3_a_rerun_reads_the_cache_another_worker_wrote(watched, s3_store):
    """SeaweedFS's S3: the first run stores the cache; a second run (any worker) reads it."""
    on_s3 = dataclasses.replace(watched, store=ClassifierStore(s3_store))
    classifier_id = create(on_s3)
    run_training_job(on_s3, classifier_id)
    assert on_s3.store.load_features(classifier_id) is not None
    features, passed = rerun(on_s3, classifier_id)
    assert passed == 0 and features["from_cache"] == features["requested"] == 8 * (1 + VIEWS)
    delete_classifier(on_s3, classifier_id)
    assert s3_store.list(f"classifiers/{classifier_id}") == []


def test_a_rerun_with_added_images_runs_only_theirs(watched):
    services = watched
    classifier_id = create(services)
    run_training_job(services, classifier_id)
    add_images(services, classifier_id, 2)
    features, passed = rerun(services, classifier_id)
    assert passed == features["computed"] == 2 * (1 + VIEWS)
    assert features["from_cache"] == 8 * (1 + VIEWS)


def test_a_cached_run_trains_the_same_head_as_an_uncached_one(watched):
    services = watched
    cached = create(services)
    run_training_job(services, cached)
    rerun(services, cached)  # every feature from the cache
    uncached_services = with_settings(services, feature_cache_bytes=0)
    uncached = create(uncached_services)
    run_training_job(uncached_services, uncached)
    reports = [json.loads(services.store.load_report(services.store.load_record(i)))
               for i in (cached, uncached)]
    assert reports[0]["features"]["from_cache"] == 8 * (1 + VIEWS)
    assert reports[1]["features"]["from_cache"] == 0
    assert reports[0]["validation"] == reports[1]["validation"]
    assert reports[0]["history"] == reports[1]["history"]


def test_a_store_that_fails_the_cache_fails_only_the_cache(services):
    classifier_id = create(services)

    def unavailable(real, key, *args):
        if key.endswith("/features.npz"):
            raise StoreUnavailable("cannot read the store: Connection refused")
        return real(key, *args)

    services.store.blobs.around.update(get_versioned=unavailable, put_if=unavailable)
    run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready"
    features = json.loads(services.store.load_report(record))["features"]
    assert features["computed"] == 8 * (1 + VIEWS) and features["stored"] == 0
    assert "not stored" in features["note"] and "Connection refused" in features["note"]


def test_deleting_a_classifier_removes_its_cache(services):
    classifier_id = create(services)
    run_training_job(services, classifier_id)
    assert f"classifiers/{classifier_id}/features.npz" in files(services, classifier_id)
    delete_classifier(services, classifier_id)
    assert services.store.blobs.list(f"classifiers/{classifier_id}") == []


# ---------------------------------------------------------------- the metric

def test_a_celery_worker_counts_its_own_training_passes_on_its_metrics_port(tmp_path):
    """The API's /metrics counts what its process ran; a worker's training is on the worker's
    HEADSTART_WORKER_METRICS_PORT."""
    require_server(redis_server_program)
    redis_port, metrics_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HEADSTART_")}
    env.update(HEADSTART_STORE=str(tmp_path / "store"),
               HEADSTART_QUEUE=f"redis://127.0.0.1:{redis_port}/0",
               HEADSTART_BACKBONE_WEIGHTS="random", HEADSTART_IMAGE_SIZE="32",
               HEADSTART_WEIGHTS_CACHE=str(tmp_path / "cache"),
               HEADSTART_WORKER_METRICS_PORT=str(metrics_port))
    settings = Settings(store=env["HEADSTART_STORE"], queue=env["HEADSTART_QUEUE"],
                        backbone_weights="random", image_size=32,
                        weights_cache=tmp_path / "cache")
    with RedisServer(redis_port, tmp_path / "redis"), \
            open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "service.workers.worker"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = create_app(settings).test_client()
            wait_ready(client)
            created = post_dataset(client, make_zip(labelled_images(4)),
                                   OPTIONS.model_dump(mode="json", exclude_none=True))
            assert created.status_code == 202, created.json
            assert wait_status(client, created.json["id"], timeout=240)["status"] == "ready", \
                (tmp_path / "worker.log").read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                on_worker = response.read().decode()
            assert 'headstart_backbone_images_total{purpose="training"} 24.0' in on_worker
            on_api = client.get("/metrics").data.decode()
            assert 'headstart_backbone_images_total{purpose="training"} 0.0' in on_api
        finally:
            stop(worker)


def test_predict_passes_count_as_predict_and_the_rest_as_training(services, backbone):
    services.metrics.watch_backbone(services.backbone.images_by_purpose)
    counts = services.backbone.images_by_purpose()
    services.backbone.features(np.zeros((3, 32, 32, 3), np.uint8))  # the batching thread
    backbone.features(np.zeros((2, 32, 32, 3), np.uint8))  # any other thread: training
    with counted_as("predict"):
        backbone.features(np.zeros((1, 32, 32, 3), np.uint8))
    after = services.backbone.images_by_purpose()
    assert after["predict"] - counts["predict"] == 4
    assert after["training"] - counts["training"] == 2
    text = services.metrics.render().decode()
    assert f'headstart_backbone_images_total{{purpose="predict"}} {after["predict"]:.1f}' in text
    assert f'headstart_backbone_images_total{{purpose="training"}} {after["training"]:.1f}' in text

