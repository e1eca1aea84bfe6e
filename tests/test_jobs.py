"""The job lifecycle in process, on a real local store: claims, leases, sweeps, double runs.

The same code runs in Celery workers; tests/test_cluster.py checks it across real processes.
"""

import io
import threading
import time
from datetime import timedelta

import pytest

from service import jobs
from service.errors import NotFound
from service.metrics import Metrics
from service.api.schemas import Lease, TrainingOptions, utc_now
from service.serving.backbone import BackboneHolder, HeadCache
from service.config import Settings
from service.storage.store import ClassifierStore, LocalBlobStore
from tests.helpers import dataset_zip

OPTIONS = TrainingOptions.model_validate({"max_epochs": 30, "augmentation": {"views": 1}})


class CollectingRunner:
    """The runner interface, keeping what was submitted; the tests run the jobs themselves."""

    def __init__(self):
        self.submitted: list[str] = []

    def submit(self, classifier_id):
        self.submitted.append(classifier_id)

    def cancel(self, classifier_id):
        pass

    def ping(self):
        pass

    def depth(self):
        return len(self.submitted)


@pytest.fixture
def services(tmp_path, backbone):
    holder = BackboneHolder(lambda: backbone)
    holder.start()
    holder.get(wait=True)
    services = jobs.Services(
        settings=Settings(store=str(tmp_path), lease_seconds=5, max_attempts=2,
                          backbone_weights="random", image_size=32),
        store=ClassifierStore(LocalBlobStore(tmp_path)), backbone=holder,
        heads=None, runner=CollectingRunner(), metrics=Metrics())
    services.heads = HeadCache(lambda record: None, capacity=1)
    return services


def create(services) -> str:
    return jobs.create_classifier(services, io.BytesIO(dataset_zip(6)), OPTIONS).id


def mark_training(services, classifier_id, attempts: int, heartbeat_age_s: float = 0):
    """Writes the record as a worker would have left it: training, with a lease of that age."""
    record = services.store.load_record(classifier_id)
    record.status, record.attempts = "training", attempts
    record.lease = Lease(owner=f"worker:{attempts}:1",
                         heartbeat_at=utc_now() - timedelta(seconds=heartbeat_age_s))
    services.store.save_record(record)
    return record


def files(services, classifier_id, folder):
    return [key for key in services.store.blobs.list(f"classifiers/{classifier_id}/{folder}")]


def test_a_job_runs_and_names_its_run(services):
    classifier_id = create(services)
    jobs.run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "ready" and record.attempts == 1 and record.lease is None
    assert files(services, classifier_id, "heads") == [
        f"classifiers/{classifier_id}/heads/{record.run}.npz"]
    assert services.store.load_report(record).classifier_id == classifier_id
    assert record.training_seconds > 0


def test_a_delivery_of_a_finished_job_changes_nothing(services):
    classifier_id = create(services)
    jobs.run_training_job(services, classifier_id)
    before = services.store.load_record(classifier_id)
    jobs.run_training_job(services, classifier_id)
    assert services.store.load_record(classifier_id) == before


def test_a_delivery_under_a_live_lease_is_dropped(services):
    classifier_id = create(services)
    record = mark_training(services, classifier_id, attempts=1)
    jobs.run_training_job(services, classifier_id)
    assert services.store.load_record(classifier_id) == record


def test_two_workers_claiming_at_once_leave_one_consistent_classifier(services):
    """Both read the job as queued and both claim it (S3 has no compare-and-set): the run whose
    lease was overwritten notices at its next write and stops; one run commits."""
    classifier_id = create(services)
    both_read = threading.Barrier(2)
    load = services.store.load_record
    first_read = threading.local()

    def load_in_step(some_id):
        record = load(some_id)
        if not getattr(first_read, "done", False):
            first_read.done = True
            both_read.wait(timeout=10)
        return record

    services.store.load_record = load_in_step
    workers = [threading.Thread(target=jobs.run_training_job, args=(services, classifier_id))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    record = load(classifier_id)
    assert record.status == "ready" and record.attempts == 1
    assert files(services, classifier_id, "heads") == [
        f"classifiers/{classifier_id}/heads/{record.run}.npz"]
    assert files(services, classifier_id, "reports") == [
        f"classifiers/{classifier_id}/reports/{record.run}.json"]


def test_the_sweep_requeues_an_expired_lease_then_fails_the_job(services):
    classifier_id = create(services)
    mark_training(services, classifier_id, attempts=1, heartbeat_age_s=6)
    jobs.requeue_lost_jobs(services)
    requeued = services.store.load_record(classifier_id)
    assert requeued.status == "queued" and requeued.lease is None
    assert services.runner.submitted == [classifier_id, classifier_id]

    mark_training(services, classifier_id, attempts=2, heartbeat_age_s=6)
    jobs.requeue_lost_jobs(services)
    failed = services.store.load_record(classifier_id)
    assert failed.status == "failed" and "2 times" in failed.error.detail


def test_the_sweep_leaves_live_jobs_alone(services):
    classifier_id = create(services)
    record = mark_training(services, classifier_id, attempts=1)
    jobs.requeue_lost_jobs(services)
    assert services.store.load_record(classifier_id) == record


def test_a_worker_write_after_delete_does_not_bring_the_classifier_back(services):
    classifier_id = create(services)
    record = services.store.load_record(classifier_id)
    services.store.delete(classifier_id)
    with pytest.raises(NotFound):
        services.store.save_record(record)  # a late progress write from a worker
    assert not services.store.exists(classifier_id)
    assert services.store.blobs.list(f"classifiers/{classifier_id}") == []


def test_a_job_taken_over_stops_without_committing(services, monkeypatch):
    """A worker that stalled past its lease finds the job re-queued at its next write."""
    classifier_id = create(services)
    taken_over = threading.Event()

    def stall_then_lose(progress):
        if not taken_over.is_set():
            taken_over.set()
            record = services.store.load_record(classifier_id)
            record.status, record.lease = "queued", None  # what the sweep writes
            services.store.save_record(record)

    original = jobs._TrainingRun.on_progress

    def on_progress(self, progress):
        stall_then_lose(progress)
        original(self, progress)

    monkeypatch.setattr(jobs._TrainingRun, "on_progress", on_progress)
    started = time.monotonic()
    jobs.run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "queued" and time.monotonic() - started < 30
    assert files(services, classifier_id, "heads") == []


def test_a_run_over_the_time_limit_fails_with_the_reason(services):
    services.settings = services.settings.model_copy(update={"job_time_limit_s": 0.001})
    classifier_id = create(services)
    with pytest.raises(TimeoutError):
        jobs.run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "HEADSTART_JOB_TIME_LIMIT_S" in record.error.detail
    assert record.lease is None


def test_a_failed_commit_fails_the_job_instead_of_leaving_it_training(services, monkeypatch):
    from service.storage.store import StoreUnavailable

    classifier_id = create(services)

    def disk_full(*args):
        raise StoreUnavailable("cannot write to the store: No space left on device")

    monkeypatch.setattr(services.store, "save_head", disk_full)
    with pytest.raises(StoreUnavailable):
        jobs.run_training_job(services, classifier_id)
    record = services.store.load_record(classifier_id)
    assert record.status == "failed" and "No space left" in record.error.detail
