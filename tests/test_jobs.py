"""The job lifecycle in process, on a real local store: claims, leases, commits, sweeps, deletes.

The races of the job protocol are each forced here into the interleaving that used to break it,
with events and hooks on a real store (never sleeps), so every test either passes or fails the
same way on every run. The same code runs in Celery workers; tests/test_cluster.py checks it
across real processes on SeaweedFS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections import Counter
from datetime import timedelta

import pytest

from models.options import TrainingOptions
from models.preprocessing import ImageDecodeError
from service.app import create_app
from service.config import Settings
from service.errors import Unprocessable
from service.jobs import recovery
from service.jobs.classifiers import create_classifier, delete_classifier
from service.jobs.runs import TrainingRun
from service.jobs.services import Services
from service.jobs.training import claim, run_training_job
from service.metrics import Metrics
from service.serving.backbone import BackboneHolder
from service.serving.heads import HeadCache
from service.storage.blobs import LocalBlobStore, StoreUnavailable
from service.storage.classifiers import ClassifierStore
from service.storage.records import ClassifierRecord, DatasetInfo, Lease, utc_now
from tests.helpers import COLOURS, CollectingRunner, image_bytes, labelled_images, make_zip

OPTIONS = TrainingOptions.model_validate({"max_epochs": 30, "augmentation": {"views": 1}})


class Spied:
    """A real `BlobStore`, wrapped: it counts every call by method (and by method and key), and
    `around[method]` (when set) runs in place of the call, given the real one to call."""

    def __init__(self, blobs):
        self.blobs = blobs
        self.calls: Counter[str] = Counter()
        self.keys: Counter[tuple[str, str]] = Counter()
        self.around: dict = {}

    def __getattr__(self, name):
        real = getattr(self.blobs, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            self.calls[name] += 1
            if args:
                self.keys[name, args[0]] += 1
            if hook := self.around.get(name):
                return hook(real, *args, **kwargs)
            return real(*args, **kwargs)

        return call


@pytest.fixture
def services(tmp_path, backbone):
    holder = BackboneHolder(lambda: backbone)
    holder.start()
    holder.get(wait=True)
    return Services(
        settings=Settings(store=str(tmp_path), lease_seconds=5, max_attempts=2,
                          backbone_weights="random", image_size=32),
        store=ClassifierStore(Spied(LocalBlobStore(tmp_path))), backbone=holder,
        heads=HeadCache(lambda record: None, capacity=1), runner=CollectingRunner(),
        metrics=Metrics())


def with_settings(services: Services, **changes) -> Services:
    return dataclasses.replace(services,
                               settings=services.settings.model_copy(update=changes))


def create(services, per_label: int = 6) -> str:
    return create_classifier(services, io.BytesIO(make_zip(labelled_images(per_label))),
                             OPTIONS).id


def mark_training(services, classifier_id, attempts: int, heartbeat_age_s: float = 0):
    """Writes the record as a worker would have left it: training, with a lease of that age."""
    current = services.store.load_versioned(classifier_id)
    record = current.record.model_copy(deep=True)
    record.status, record.attempts = "training", attempts
    record.lease = Lease(owner=f"worker:{attempts}:1",
                         heartbeat_at=utc_now() - timedelta(seconds=heartbeat_age_s))
    services.store.save_record(record, current.tag)
    return services.store.load_versioned(classifier_id)


def files(services, classifier_id, folder=""):
    return services.store.blobs.list(f"classifiers/{classifier_id}/{folder}".rstrip("/"))


def transitions(services, state: str) -> float:
    return services.metrics.registry.get_sample_value(
        "headstart_training_job_transitions_total", {"state": state}) or 0.0


def runs_of(services, classifier_id, folder) -> set[str]:
    """The training runs whose files are in a classifier's folder: a run's stages
    (`{run}-{stage}`) count as one."""
    return {key.rsplit("/", 1)[1].rsplit(".", 1)[0].rsplit("-", 1)[0]
            for key in files(services, classifier_id, folder)}


def run_of(record) -> str:
    return record.run.rsplit("-", 1)[0]


def is_final(data: bytes) -> bool:
    """A ready record without a lease: a run's final write."""
    return status_of(data) == "ready" and json.loads(data)["lease"] is None


def is_record(key: str, classifier_id: str) -> bool:
    return key == f"classifiers/{classifier_id}/record.json"


def status_of(data: bytes) -> str:
    return json.loads(data)["status"]


# ---------------------------------------------------------------- the lifecycle

def test_a_job_runs_and_names_its_run(services):
    classifier_id = create(services)
    run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready" and record.attempts == 1 and record.lease is None
    assert not record.refining and record.run.endswith(f"-{record.stage}")
    assert f"classifiers/{classifier_id}/heads/{record.run}.npz" in files(services, classifier_id,
                                                                          "heads")
    assert runs_of(services, classifier_id, "heads") == {run_of(record)}
    assert json.loads(services.store.load_report(record))["classifier_id"] == classifier_id
    assert record.training_seconds > 0
    assert services.store.active_ids() == []
    assert transitions(services, "ready") == 1


def test_a_delivery_of_a_finished_job_changes_nothing(services):
    classifier_id = create(services)
    run_training_job(services, classifier_id)
    before = services.store.load_versioned(classifier_id)
    run_training_job(services, classifier_id)
    assert services.store.load_versioned(classifier_id) == before


def test_a_delivery_under_a_live_lease_is_dropped(services):
    classifier_id = create(services)
    leased = mark_training(services, classifier_id, attempts=1)
    run_training_job(services, classifier_id)
    assert services.store.load_versioned(classifier_id) == leased


def test_a_run_over_the_time_limit_fails_with_the_reason(services):
    services = with_settings(services, job_time_limit_s=0.001)
    classifier_id = create(services)
    with pytest.raises(TimeoutError):
        run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "HEADSTART_JOB_TIME_LIMIT_S" in record.error.detail
    assert record.lease is None


def test_a_failed_head_write_fails_the_job_instead_of_leaving_it_training(services):
    classifier_id = create(services)

    def disk_full(real, key, data):
        if "/heads/" in key:
            raise StoreUnavailable("cannot write to the store: No space left on device")
        return real(key, data)

    services.store.blobs.around["put"] = disk_full
    with pytest.raises(StoreUnavailable):
        run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "No space left" in record.error.detail
    assert files(services, classifier_id, "heads") == files(services, classifier_id,
                                                            "reports") == []


# ---------------------------------------------------------------- claims

def in_step(services, workers: list[threading.Thread]) -> None:
    """Makes the first record read of each of `workers` wait for the others' first read, so all
    of them hold the same version before any of them writes. Other threads read freely."""
    all_read = threading.Barrier(len(workers))
    waiting = set(workers)

    def read_in_step(real, key):
        result = real(key)
        if threading.current_thread() in waiting:
            waiting.discard(threading.current_thread())
            all_read.wait(timeout=30)
        return result

    services.store.blobs.around["get_versioned"] = read_in_step


def test_of_two_workers_claiming_at_once_exactly_one_wins(services):
    """Both read the job queued, at the same version; the claim is a compare-and-set on it, so
    one write lands and the other is refused. No settle time, no re-read."""
    classifier_id = create(services)
    claims = []
    workers = [threading.Thread(target=lambda: claims.append(claim(services, classifier_id)))
               for _ in range(2)]
    in_step(services, workers)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    won = [c for c in claims if c is not None]
    assert len(claims) == 2 and len(won) == 1
    stored = services.store.load_versioned(classifier_id)
    assert stored.tag == won[0].tag and stored.record.lease.owner == won[0].record.lease.owner
    assert stored.record.attempts == 1 and transitions(services, "training") == 1


def test_two_workers_running_one_job_at_once_leave_one_consistent_classifier(services):
    classifier_id = create(services)
    workers = [threading.Thread(target=run_training_job, args=(services, classifier_id))
               for _ in range(2)]
    in_step(services, workers)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready" and record.attempts == 1
    assert runs_of(services, classifier_id, "heads") == {run_of(record)}
    assert runs_of(services, classifier_id, "reports") == {run_of(record)}
    assert services.store.load_head(record) and services.store.load_report(record)
    assert transitions(services, "training") == transitions(services, "ready") == 1


def test_a_job_taken_over_stops_without_committing(services):
    """A worker that stalled past its lease finds, at its next write, that the sweep re-queued
    the job: its compare-and-set is refused and it stops."""
    classifier_id = create(services)
    requeued = threading.Event()

    def requeue_under_it(real, key, data, tag):
        if is_record(key, classifier_id) and status_of(data) == "training" \
                and not requeued.is_set() and json.loads(data)["progress"]["stage"] == "training":
            requeued.set()
            current = services.store.load_versioned(classifier_id)
            recovery.requeue_or_fail(services, current)  # what the sweep does
        return real(key, data, tag)

    services.store.blobs.around["put_if"] = requeue_under_it
    run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert requeued.is_set() and record.status == "queued" and record.lease is None
    assert files(services, classifier_id, "heads") == []
    assert services.runner.submitted == [classifier_id, classifier_id]
    assert transitions(services, "ready") == 0


# ---------------------------------------------------------------- commit

class HandOverAfterTheFinalWrite:
    """The run's lock. When the committing thread leaves it right after the final write, a
    heartbeat thread takes it and renews before the commit goes on: the interleaving that made
    an earlier version read "ready" as "lease lost" and delete the run it had just committed."""

    def __init__(self, run: TrainingRun):
        self._lock, self.run = threading.Lock(), run
        self.committer: threading.Thread | None = None  # set once the final write has landed
        self.beats = 0

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc_info):
        self._lock.release()
        if self.committer is threading.current_thread() and not self.beats:
            self.beats += 1
            beat = threading.Thread(target=self.run.renew, name="heartbeat")
            beat.start()
            beat.join(timeout=30)


def test_a_heartbeat_after_the_final_write_changes_nothing(services, monkeypatch):
    classifier_id = create(services)
    runs: list[TrainingRun] = []
    original_init = TrainingRun.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.record.id != classifier_id:  # NB: another test's job, still refining
            return
        self._lock = HandOverAfterTheFinalWrite(self)
        runs.append(self)

    def note_the_final_write(real, key, data, tag):
        new_tag = real(key, data, tag)
        if is_record(key, classifier_id) and is_final(data):
            runs[0]._lock.committer = threading.current_thread()
        return new_tag

    monkeypatch.setattr(TrainingRun, "__init__", init)
    services.store.blobs.around["put_if"] = note_the_final_write
    run_training_job(services, classifier_id)

    (run,) = runs
    assert run._lock.beats == 1  # the heartbeat did run after the final write
    assert run.finished and run.stop_reason is None
    stored = services.store.load_versioned(classifier_id)
    assert stored.record.status == "ready" and stored.record.lease is None
    assert stored.tag == run._tag  # nothing was written after the final write
    assert runs_of(services, classifier_id, "heads") == {run_of(stored.record)}
    assert json.loads(services.store.load_report(stored.record))["classifier_id"] == classifier_id
    assert transitions(services, "ready") == 1


def test_a_first_commit_the_store_refuses_ends_failed_and_leaves_no_files(services):
    classifier_id = create(services)

    def refuse(real, key, data, tag):
        if is_record(key, classifier_id) and status_of(data) == "ready":
            raise StoreUnavailable("cannot write to the store: Input/output error")
        return real(key, data, tag)

    services.store.blobs.around["put_if"] = refuse
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        run_training_job(services, classifier_id)

    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "Input/output error" in record.error.detail
    assert record.run is None and record.lease is None
    assert files(services, classifier_id, "heads") == files(services, classifier_id,
                                                            "reports") == []
    assert transitions(services, "ready") == 0 and transitions(services, "failed") == 1


def test_a_final_write_that_landed_before_its_error_is_kept(services):
    """The store applied the write, then the call failed (a lost answer, a failed fsync): the
    run reads the record back, finds its own run named, and keeps its files."""
    classifier_id = create(services)

    def answer_lost(real, key, data, tag):
        new_tag = real(key, data, tag)
        if is_record(key, classifier_id) and is_final(data):
            raise StoreUnavailable("cannot reach the store: connection reset")
        return new_tag

    services.store.blobs.around["put_if"] = answer_lost
    run_training_job(services, classifier_id)

    record = services.store.load_record(classifier_id)
    assert record.status == "ready" and record.run is not None
    assert services.store.load_head(record) and services.store.load_report(record)
    assert transitions(services, "ready") == 1 and transitions(services, "failed") == 0


def test_a_store_outage_at_the_final_write_leaves_the_job_to_the_sweep(services):
    """The store goes away at the final write and stays away: nothing can be written or read
    back, so the job is left training; once its lease expires the sweep re-queues it. At no
    point is it ready without a head."""
    classifier_id = create(services)
    down = threading.Event()

    def outage(real, *args, **kwargs):
        if down.is_set():
            raise StoreUnavailable("cannot reach the store: connection refused")
        return real(*args, **kwargs)

    def go_down_at_the_final_write(real, key, data, tag):
        if is_record(key, classifier_id) and status_of(data) == "ready":
            down.set()
        return outage(real, key, data, tag)

    for method in ("get", "get_versioned", "put", "delete", "exists", "list"):
        services.store.blobs.around[method] = outage
    services.store.blobs.around["put_if"] = go_down_at_the_final_write
    with pytest.raises(StoreUnavailable):
        run_training_job(services, classifier_id)
    down.clear()
    services.store.blobs.around.clear()  # the store is back

    record = services.store.load_record(classifier_id)
    assert record.status == "training" and transitions(services, "ready") == 0
    mark_training(services, classifier_id, attempts=1, heartbeat_age_s=60)  # time passes
    recovery.sweep(services)
    assert services.store.load_record(classifier_id).status == "queued"
    assert services.runner.submitted == [classifier_id, classifier_id]
    run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready" and services.store.load_head(record)


def delete_while_it_waits(services, classifier_id, reached: threading.Event,
                          deleted: threading.Event) -> None:
    """Runs the job on a thread; once it has `reached` a point where it waits for `deleted`,
    deletes the classifier, lets it go on, and checks that it ends."""
    worker = threading.Thread(target=run_training_job, args=(services, classifier_id))
    worker.start()
    assert reached.wait(timeout=120)
    delete_classifier(services, classifier_id)
    deleted.set()
    worker.join(timeout=60)
    assert not worker.is_alive()


def test_a_delete_during_commit_leaves_nothing_under_the_prefix(services):
    """DELETE lands after the run saved its head and report, before its record write."""
    classifier_id = create(services)
    saved, deleted = threading.Event(), threading.Event()

    def hold_after_the_report(real, key, data):
        real(key, data)
        if key.startswith(f"classifiers/{classifier_id}/reports/"):
            saved.set()
            assert deleted.wait(timeout=60)

    services.store.blobs.around["put"] = hold_after_the_report
    delete_while_it_waits(services, classifier_id, saved, deleted)
    assert services.store.blobs.list(f"classifiers/{classifier_id}") == []
    assert services.store.active_ids() == []
    assert services.store.blobs.list("deleted") == [f"deleted/{classifier_id}"]
    assert transitions(services, "ready") == 0


def test_a_worker_writing_after_delete_stops_and_brings_nothing_back(services):
    """A real run, deleted while it trains: its next progress write is refused, it stops, and
    nothing of the classifier (record, files, index entry) comes back."""
    classifier_id = create(services)
    training, deleted = threading.Event(), threading.Event()

    def hold_while_training(real, key, data, tag):
        new_tag = real(key, data, tag)
        if is_record(key, classifier_id) and not training.is_set() \
                and (json.loads(data).get("progress") or {}).get("stage") == "training":
            training.set()
            assert deleted.wait(timeout=60)
        return new_tag

    services.store.blobs.around["put_if"] = hold_while_training
    delete_while_it_waits(services, classifier_id, training, deleted)
    assert not services.store.exists(classifier_id)
    assert services.store.blobs.list(f"classifiers/{classifier_id}") == []
    assert services.store.active_ids() == []
    assert transitions(services, "ready") == 0


# ---------------------------------------------------------------- the sweep

def test_the_sweep_requeues_an_expired_lease_then_fails_the_job(services):
    classifier_id = create(services)
    mark_training(services, classifier_id, attempts=1, heartbeat_age_s=6)
    recovery.sweep(services)
    requeued = services.store.load_record(classifier_id)
    assert requeued.status == "queued" and requeued.lease is None
    assert services.runner.submitted == [classifier_id, classifier_id]

    mark_training(services, classifier_id, attempts=2, heartbeat_age_s=6)
    recovery.sweep(services)
    failed = services.store.load_record(classifier_id)
    assert failed.status == "failed" and "2 times" in failed.error.detail
    assert services.store.active_ids() == []


def test_the_sweep_leaves_live_jobs_alone(services):
    classifier_id = create(services)
    leased = mark_training(services, classifier_id, attempts=1)
    recovery.sweep(services)
    assert services.store.load_versioned(classifier_id) == leased
    assert services.runner.submitted == [classifier_id]


@pytest.mark.parametrize("state", ["training, lease expired", "queued for long"])
def test_the_sweep_leaves_a_record_alone_that_changed_after_it_read_it(services, state):
    """Between the sweep's read and its write, the job's worker renews its lease (or a worker
    claims the queued job): the sweep's compare-and-set is refused, the newer write stays."""
    classifier_id = create(services)
    if state == "queued for long":
        services = with_settings(services, requeue_queued_after_s=1)
        current = services.store.load_versioned(classifier_id)
        stale = current.record.model_copy(update={"updated_at": utc_now() - timedelta(hours=1)})
        services.store.save_record(stale, current.tag)
    else:
        mark_training(services, classifier_id, attempts=1, heartbeat_age_s=60)
    newer = {}

    def change_after_the_read(real, key):
        data, tag = real(key)
        if is_record(key, classifier_id) and not newer:
            record = ClassifierRecord.model_validate_json(data)
            record.status, record.attempts = "training", record.attempts + 1
            record.lease = Lease(owner="worker:live:1", heartbeat_at=utc_now())
            newer["tag"] = services.store.save_record(record, tag)
        return data, tag

    services.store.blobs.around["get_versioned"] = change_after_the_read
    recovery.sweep(services)

    del services.store.blobs.around["get_versioned"]
    stored = services.store.load_versioned(classifier_id)
    assert stored.tag == newer["tag"] and stored.record.lease.owner == "worker:live:1"
    assert services.runner.submitted == [classifier_id]  # only the create's


def test_the_sweep_keeps_the_index_entry_of_a_classifier_being_created(services):
    """The index entry is written before the record; a sweep in between finds no record. It
    used to drop the entry, and the job was then invisible to every later sweep and scrape."""
    swept = []

    def sweep_in_between(real, key, data, tag):
        if key.endswith("/record.json") and tag is None and not swept:
            swept.append(services.store.active_ids())
            recovery.sweep(services)
        return real(key, data, tag)

    services.store.blobs.around["put_if"] = sweep_in_between
    classifier_id = create(services)
    assert swept == [[classifier_id]]
    assert services.store.active_ids() == [classifier_id]


def test_the_sweep_drops_index_entries_of_deleted_and_long_gone_classifiers(services):
    deleted, abandoned = create(services), "clf_00000001000000000000"
    services.store.delete(deleted)
    services.store.blobs.put(f"active/{deleted}", b"")  # a late writer's entry
    services.store.blobs.put(f"active/{abandoned}", b"")  # its create died long ago
    recovery.sweep(services)
    assert services.store.active_ids() == []


def test_the_sweep_and_a_scrape_read_only_the_jobs_in_flight(services, monkeypatch):
    """Twenty finished classifiers and two jobs in flight: a sweep reads two records; so does
    a scrape once the first (full) one is done. Counted on the real store's calls."""
    from service import metrics as metrics_module

    for number in range(20):
        services.store.create_record(finished_record(number))
    in_flight = [create(services, per_label=2) for _ in range(2)]
    blobs = services.store.blobs
    blobs.calls.clear()

    recovery.sweep(services)
    assert blobs.calls["get_versioned"] + blobs.calls["get"] == 2
    assert blobs.calls["list"] == 1 and blobs.keys["list", "active"] == 1

    monkeypatch.setattr(metrics_module, "STORE_SNAPSHOT_S", 0.0)  # every scrape reads again
    services.metrics.watch(services.store, lambda: 0, lambda: 0, full_scan_s=3600)
    first = services.metrics.render().decode()  # the full scan, once per full_scan_s
    assert 'headstart_classifiers{status="ready"} 20.0' in first
    assert 'headstart_classifiers{status="queued"} 2.0' in first
    blobs.calls.clear()
    blobs.keys.clear()
    again = services.metrics.render().decode()
    assert 'headstart_classifiers{status="ready"} 20.0' in again
    reads = {key for (method, key) in blobs.keys if method in ("get", "get_versioned")}
    assert reads == {f"classifiers/{i}/record.json" for i in in_flight}
    assert blobs.calls["list"] == 1 and blobs.keys["list", "active"] == 1


# ---------------------------------------------------------------- what training decodes

def mixed_sizes(per_label: int = 6) -> bytes:
    """Per label: `per_label` images of 20×20 (400 px) and one of 40×32 (1280 px)."""
    members = labelled_images(per_label, size=(20, 20))
    for label in ("red", "blue"):
        members[f"{label}/large.png"] = image_bytes(COLOURS[label], (40, 32), seed=9)
    return make_zip(members)


def test_an_upload_skips_images_above_the_pixel_limit(services):
    services = with_settings(services, max_image_pixels=1000)
    record = create_classifier(services, io.BytesIO(mixed_sizes()), OPTIONS)
    assert record.dataset.images == 12
    assert sorted(skip.path for skip in record.dataset.skipped) == ["blue/large.png",
                                                                   "red/large.png"]
    assert all("more than the limit of 1000" in skip.reason for skip in record.dataset.skipped)


def test_training_decodes_with_the_configured_pixel_limit(services):
    """A dataset stored under a larger limit (another replica's setting, or before the limit
    was lowered) is decoded at training with the worker's HEADSTART_MAX_IMAGE_PIXELS."""
    classifier_id = create_classifier(services, io.BytesIO(mixed_sizes()), OPTIONS).id
    assert services.store.load_record(classifier_id).dataset.images == 14
    with pytest.raises(ImageDecodeError, match="more than the limit of 1000"):
        run_training_job(with_settings(services, max_image_pixels=1000), classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "40x32 pixels, more than the limit of 1000" in \
        record.error.detail


def test_options_over_the_feature_budget_are_refused_before_anything_is_stored(services):
    dim = services.backbone.get().feature_dim
    # 12 images with 2 views (3 rows each), twice (numpy and the tensor): exactly the budget.
    services = with_settings(services, max_feature_bytes=12 * 3 * dim * 4 * 2)
    many_views = TrainingOptions.model_validate({"augmentation": {"views": 3}})
    with pytest.raises(Unprocessable, match="HEADSTART_MAX_FEATURE_BYTES") as refused:
        create_classifier(services, io.BytesIO(make_zip(labelled_images(6))), many_views)
    assert refused.value.errors[0]["field"] == "options.augmentation.views"
    assert "use fewer images or at most 2 views" in refused.value.detail
    assert services.store.blobs.list("classifiers") == []

    two_views = TrainingOptions.model_validate({"augmentation": {"views": 2}})
    create_classifier(services, io.BytesIO(make_zip(labelled_images(6))), two_views)


# ---------------------------------------------------------------- the list, through the API

def finished_record(number: int) -> ClassifierRecord:
    now = utc_now()
    return ClassifierRecord(
        id=f"clf_{number:08d}{'0' * 12}", name=f"finished {number}", status="ready",
        labels=["blue", "red"], created_at=now, updated_at=now,
        dataset=DatasetInfo(images=4, per_label={"blue": 2, "red": 2}),
        options=TrainingOptions())


def test_the_list_is_paginated_newest_first_through_the_api(tmp_path):
    app = create_app(Settings(store=str(tmp_path / "store"), backbone_weights="random",
                              image_size=32, weights_cache=tmp_path / "cache"))
    store, client = app.extensions["headstart"].store, app.test_client()
    for number in range(5):
        store.create_record(finished_record(number))

    names, cursor, pages = [], None, 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/classifiers{query}")
        assert page.status_code == 200, page.json
        names += [c["name"] for c in page.json["classifiers"]]
        cursor, pages = page.json["next_cursor"], pages + 1
        if cursor is None:
            break
    assert names == [f"finished {n}" for n in (4, 3, 2, 1, 0)] and pages == 3
    assert len(client.get("/v1/classifiers").json["classifiers"]) == 5
    for bad in ("limit=0", "limit=1001", "limit=two", "cursor=" + "x" * 65, "cursor=garbage"):
        assert client.get(f"/v1/classifiers?{bad}").status_code == 422, bad
