"""Staged training in the service: a run serves its preview head while it refines, replaces it
only with a better stage, and ends its refinement when it finishes, is cancelled, deleted, fails
or dies (the sweep). Every interleaving is forced with hooks on a real local store, as in
tests/test_jobs.py, never with sleeps."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import timedelta

import pytest

from models import training
from service.api.schemas import Classifier, Report
from service.app import _load_head
from service.jobs import events, prediction, recovery
from service.jobs.classifiers import delete_classifier, get_report
from service.jobs.training import run_training_job
from service.serving.heads import HeadCache
from service.storage.records import Lease, utc_now
from service.workers.thread import ThreadRunner
from tests.helpers import COLOURS, forced_loss, image_bytes
from tests.test_jobs import (create, delete_while_it_waits, files, is_record,  # noqa: F401
                             services, transitions)


@pytest.fixture
def loads():
    """The runs whose heads `serving` loaded from the store, in order."""
    return []


@pytest.fixture
def serving(services, loads):  # noqa: F811
    """The job services with heads loaded from the store, as the API loads them."""
    def load(record):
        loads.append(record.run)
        return _load_head(services.store, services.backbone, record)

    return dataclasses.replace(services, heads=HeadCache(load, capacity=4))


def at_first_commit(wired, classifier_id, then):
    """Runs `then(record)` once, right after the first stage commit (ready, refining) landed,
    inside the training thread: what any reader sees while the run refines."""
    done = []

    def hook(real, key, data, tag):
        new_tag = real(key, data, tag)
        if is_record(key, classifier_id) and json.loads(data).get("refining") and not done:
            done.append(True)
            then(wired.store.load_record(classifier_id))
        return new_tag

    wired.store.blobs.around["put_if"] = hook
    return done


RED = image_bytes(COLOURS["red"], seed=7)


def test_the_first_stage_serves_while_later_ones_run_then_the_run_ends(serving):
    classifier_id = create(serving)
    seen = {}

    def look(record):
        seen["record"], seen["active"] = record, serving.store.active_ids()
        seen["report"] = Report.model_validate(get_report(serving, classifier_id))
        seen["resource"] = Classifier.from_record(record)
        seen["predicted"] = prediction.predict(serving, record, [RED], top_k=2)

    at_first_commit(serving, classifier_id, look)
    run_training_job(serving, classifier_id)

    during = seen["record"]
    assert during.status == "ready" and during.refining and during.stage == "preview"
    assert during.run.endswith("-preview") and during.lease is not None
    assert during.progress is not None and seen["active"] == [classifier_id]
    assert seen["resource"].refining and seen["resource"].stage == "preview"
    assert seen["report"].final is False and seen["report"].stage == "preview"
    assert [s.stage for s in seen["report"].stages] == ["preview"]
    (answer,) = seen["predicted"]
    assert {label for label, _ in answer.top_k} == {"red", "blue"}

    after = serving.store.load_record(classifier_id)
    assert after.status == "ready" and not after.refining and after.lease is None
    assert after.progress is None and serving.store.active_ids() == []
    assert [s["stage"] for s in after.stages] == ["preview", "augmented"]
    served = [s["stage"] for s in after.stages if s["served"]]
    assert after.stage == served[-1] and after.run.endswith(f"-{after.stage}")
    report = Report.model_validate(get_report(serving, classifier_id))
    assert report.final is True and report.stage == after.stage
    assert report.validation.loss == after.metrics.val_loss
    assert transitions(serving, "ready") == 1


@pytest.mark.parametrize("losses, served", [((0.5, 0.3), ["preview", "augmented"]),
                                            ((0.3, 0.5), ["preview"]),
                                            ((0.3, 0.3), ["preview"])])
def test_a_later_stage_replaces_the_served_head_only_when_its_loss_is_lower(
        serving, loads, monkeypatch, losses, served):
    monkeypatch.setattr(training, "STAGES", (
        ("preview", forced_loss(training.preview_stage, losses[0])),
        ("augmented", forced_loss(training.augmented_stage, losses[1]))))
    classifier_id = create(serving)
    heads_served = []

    def predict_each_commit(real, key, data, tag):
        new_tag = real(key, data, tag)
        document = json.loads(data) if is_record(key, classifier_id) else {}
        if document.get("status") == "ready" and document["run"] not in heads_served:
            heads_served.append(document["run"])
            prediction.predict(serving, serving.store.load_record(classifier_id), [RED], 2)
        return new_tag

    serving.store.blobs.around["put_if"] = predict_each_commit
    run_training_job(serving, classifier_id)

    record = serving.store.load_record(classifier_id)
    assert [run.rsplit("-", 1)[1] for run in heads_served] == served
    assert record.stage == served[-1] and not record.refining
    assert [s["served"] for s in record.stages] == [True, len(served) == 2]
    assert [s["val_loss"] for s in record.stages] == list(losses)
    # Superseded heads stay until the classifier is deleted; each served one was loaded once.
    assert sorted(files(serving, classifier_id, "heads")) == sorted(
        f"classifiers/{classifier_id}/heads/{run}.npz" for run in heads_served)
    assert loads == heads_served
    prediction.predict(serving, record, [RED], 2)
    assert loads == heads_served  # the final write changed no head: nothing reloaded


def test_the_head_cache_keys_by_the_committed_run_not_the_update_time(serving, loads):
    classifier_id = create(serving)
    run_training_job(serving, classifier_id)
    record = serving.store.load_record(classifier_id)
    head = serving.heads.get(record)
    touched = record.model_copy(update={"updated_at": utc_now() + timedelta(seconds=1)})
    assert serving.heads.get(touched) is head and loads == [record.run]


def test_a_cancel_while_refining_keeps_the_served_head_and_ends_the_run(serving):
    classifier_id = create(serving)
    cancelled = threading.Event()
    at_first_commit(serving, classifier_id, lambda record: cancelled.set())
    run_training_job(serving, classifier_id, should_stop=cancelled.is_set)

    record = serving.store.load_record(classifier_id)
    assert record.status == "ready" and not record.refining and record.lease is None
    assert record.progress is None and record.stage == "preview" and record.error is None
    assert [s["stage"] for s in record.stages] == ["preview"]  # the augmented stage stopped
    assert serving.store.active_ids() == []
    assert Report.model_validate(get_report(serving, classifier_id)).final is True
    assert transitions(serving, "ready") == transitions(serving, "cancelled") == 1
    (answer,) = prediction.predict(serving, record, [RED], top_k=1)
    assert answer.top_k[0][0] in ("red", "blue")


def test_a_delete_while_refining_stops_the_in_process_run_and_purges(serving):
    """The in-process runner: DELETE cancels the run (it ends its refinement) and then
    removes everything."""
    runner = ThreadRunner()
    serving = dataclasses.replace(serving, runner=runner)
    classifier_id = create(serving)
    committed = threading.Event()
    at_first_commit(serving, classifier_id, lambda record: committed.set())
    finished = threading.Event()

    def job(job_id, should_stop):
        try:
            run_training_job(serving, job_id, should_stop)
        finally:
            finished.set()

    runner.start(job)
    assert committed.wait(timeout=120)
    delete_classifier(serving, classifier_id)
    assert finished.wait(timeout=60)
    assert serving.store.blobs.list(f"classifiers/{classifier_id}") == []
    assert serving.store.active_ids() == []
    assert serving.store.blobs.list("deleted") == [f"deleted/{classifier_id}"]


def test_a_delete_while_refining_stops_a_worker_that_gets_no_signal(serving):
    """A Celery worker: the delete is its only signal; its next write is refused and it stops,
    bringing nothing back."""
    classifier_id = create(serving)
    committed, deleted = threading.Event(), threading.Event()

    def hold(record):
        committed.set()
        assert deleted.wait(timeout=60)

    at_first_commit(serving, classifier_id, hold)
    delete_while_it_waits(serving, classifier_id, committed, deleted)
    assert not serving.store.exists(classifier_id)
    assert serving.store.blobs.list(f"classifiers/{classifier_id}") == []
    assert serving.store.active_ids() == []


class WorkerDied(BaseException):
    """What a SIGKILL looks like from inside: the run writes nothing more."""


def crash_after_the_first_commit(wired, classifier_id):
    def die(record):
        raise WorkerDied()

    at_first_commit(wired, classifier_id, die)
    with pytest.raises(WorkerDied):
        run_training_job(wired, classifier_id)
    wired.store.blobs.around.clear()
    record = wired.store.load_record(classifier_id)
    assert record.status == "ready" and record.refining and record.lease is not None
    return record


def expire_lease(wired, classifier_id, age_s=60):
    current = wired.store.load_versioned(classifier_id)
    record = current.record.model_copy(deep=True)
    record.lease = Lease(owner=record.lease.owner,
                         heartbeat_at=utc_now() - timedelta(seconds=age_s))
    wired.store.save_record(record, current.tag)


def test_a_crash_while_refining_leaves_the_last_committed_stage_serving(serving):
    classifier_id = create(serving)
    before = crash_after_the_first_commit(serving, classifier_id)

    recovery.sweep(serving)  # a live lease: left alone
    assert serving.store.load_record(classifier_id).refining

    expire_lease(serving, classifier_id)
    recovery.sweep(serving)
    record = serving.store.load_record(classifier_id)
    assert record.status == "ready" and not record.refining and record.lease is None
    assert record.progress is None and record.run == before.run and record.stage == "preview"
    assert serving.store.active_ids() == [] and serving.runner.submitted == [classifier_id]
    assert Report.model_validate(get_report(serving, classifier_id)).final is True
    (answer,) = prediction.predict(serving, record, [RED], top_k=1)
    assert answer.top_k[0][0] in ("red", "blue")
    run_training_job(serving, classifier_id)  # a late delivery: nothing to do
    assert serving.store.load_record(classifier_id) == record


def test_a_restart_ends_a_refinement_the_previous_process_left(serving):
    classifier_id = create(serving)
    crash_after_the_first_commit(serving, classifier_id)
    recovery.recover_jobs(serving)  # the in-process runner's start: the old process is gone
    record = serving.store.load_record(classifier_id)
    assert record.status == "ready" and not record.refining and record.lease is None
    assert serving.store.active_ids() == []


def test_a_failure_while_refining_keeps_the_served_head_and_says_why(serving, monkeypatch):
    def broken(staged):
        raise ValueError("the augmented stage broke")

    monkeypatch.setattr(training, "STAGES", (training.STAGES[0], ("augmented", broken)))
    classifier_id = create(serving)
    with pytest.raises(ValueError):
        run_training_job(serving, classifier_id)
    record = serving.store.load_record(classifier_id)
    assert record.status == "ready" and not record.refining and record.lease is None
    assert record.stage == "preview" and record.error.title == "Refinement failed"
    assert "the augmented stage broke" in record.error.detail
    assert serving.store.active_ids() == []


def test_events_while_refining_end_with_done_only_after_the_final_stage(serving):
    classifier_id = create(serving)
    resources = []

    def keep_every_write(real, key, data, tag):
        new_tag = real(key, data, tag)
        if is_record(key, classifier_id):
            resources.append(Classifier.from_record(
                serving.store.load_record(classifier_id)).model_dump(mode="json"))
        return new_tag

    serving.store.blobs.around["put_if"] = keep_every_write
    run_training_job(serving, classifier_id)

    sent, cursor = [], None
    for resource in resources:
        new, cursor, finished = events.changes(resource, cursor, classifier_id)
        sent += new
        assert finished == (resource is resources[-1])
    statuses = [(e.data["status"], e.data.get("refining")) for e in sent if e.kind == "status"]
    assert statuses == [("training", False), ("ready", True), ("ready", False)]
    kinds = [e.kind for e in sent]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    ready_at = next(i for i, e in enumerate(sent) if e.kind == "status" and e.data["refining"])
    refining = [e.data["training_stage"] for e in sent[ready_at:] if e.kind == "progress"]
    assert "augmented" in refining
    # A client resuming from an event sent while refining gets the rest, nothing twice.
    resumed = events.Cursor.decode(sent[ready_at].id)
    rest, _, _ = events.changes(resources[-1], resumed, classifier_id)
    assert [e.kind for e in rest] == ["status", "done"]
