"""Nothing accepted is lost: re-queue jobs whose worker died, re-publish jobs whose queue message
was lost, fail jobs that keep dying, end the refinement of a ready classifier whose worker died
(it keeps serving its last committed stage). Every change is a compare-and-set on the record
read, so a sweep never overwrites a newer write with the snapshot it listed."""

from __future__ import annotations

import logging
from datetime import timedelta

from service.errors import NotFound, ServiceUnavailable
from service.jobs.services import Services
from service.storage.classifiers import (PreconditionFailed, Versioned, classifier_age_s, job_id,
                                         parse_job_id)
from service.storage.records import ACTIVE_STATUSES, Error, Progress, utc_now

log = logging.getLogger(__name__)


def fail_interrupted(services: Services, current: Versioned) -> bool:
    """Marks a job that stopped `attempts` times without finishing as failed."""
    record = current.record.model_copy(deep=True)
    record.status, record.progress, record.lease = "failed", None, None
    record.error = Error(
        title="Training was interrupted",
        detail=f"training stopped {record.attempts} times without finishing (its worker was "
               "killed, ran out of memory or lost its node); create the classifier again, "
               "perhaps with fewer images or views")
    record.updated_at = utc_now()
    if not _replace(services, record, current.tag):
        return False
    services.metrics.job_event("failed")
    log.error("job %s: %s", record.id, record.error.detail)
    return True


def requeue_or_fail(services: Services, current: Versioned) -> None:
    """Queues an interrupted job again, or fails it after `max_attempts` runs."""
    if current.record.attempts >= services.settings.max_attempts:
        fail_interrupted(services, current)
        return
    record = current.record.model_copy(deep=True)
    record.status, record.progress, record.lease = "queued", Progress(stage="queued"), None
    record.updated_at = utc_now()
    tag = _replace(services, record, current.tag)
    if not tag:
        return
    try:
        services.runner.submit(job_id(record.id, record.version))
    except ServiceUnavailable as error:  # put it back as it was; the next sweep tries again
        _replace(services, current.record, tag)
        log.warning("job %s: cannot re-queue yet: %s", record.id, error.detail)
        return
    log.warning("job %s: re-queued after an interrupted run (attempt %d of %d)", record.id,
                record.attempts + 1, services.settings.max_attempts)


def end_refinement(services: Services, current: Versioned) -> bool:
    """Ends a refinement whose worker is gone: the classifier stays ready on its last committed
    stage, `refining` false. Not re-queued: a new run would start again from the preview, and
    the served head is already the best one committed."""
    record = current.record.model_copy(deep=True)
    record.refining, record.progress, record.lease = False, None, None
    record.updated_at = utc_now()
    if not _replace(services, record, current.tag):
        return False
    log.warning("job %s: its worker stopped while refining; it keeps serving stage %s",
                record.id, record.stage)
    return True


def recover_jobs(services: Services) -> None:
    """On start of the in-process runner: re-queue what a previous process left queued or
    training (it is gone: nothing else runs these jobs), fail a job that keeps dying, end a
    refinement it left running. Reads every record once (records older than the `active/`
    index are not in it; versions after the first are all younger)."""
    store = services.store
    for current in _active(services, sorted(set(store.classifier_ids()) | set(store.active_ids()),
                                            reverse=True)):
        if current.record.status in ACTIVE_STATUSES:
            requeue_or_fail(services, current)
        elif current.record.refining:
            end_refinement(services, current)


def sweep(services: Services) -> None:
    """Runs every few seconds in every API process; reads only the jobs in flight.

    - training, lease expired: the worker is gone; re-queue (or fail) the job;
    - ready and refining, lease expired: the worker is gone; end the refinement;
    - queued for longer than `requeue_queued_after_s`: its message may be lost (a broker
      restarted without persistence, a crash between saving and publishing); publish it again.
      A duplicate delivery is harmless: the claim is a compare-and-set.
    """
    settings, now = services.settings, utc_now()
    stale_queue = timedelta(seconds=settings.requeue_queued_after_s)
    for current in _active(services):
        record = current.record
        lost = record.lease is None or record.lease.expired(settings.lease_seconds)
        if record.status == "training" and lost:
            requeue_or_fail(services, current)
        elif record.refining and lost:
            end_refinement(services, current)
        elif record.status == "queued" and now - record.updated_at > stale_queue:
            _republish(services, current)


def _republish(services: Services, current: Versioned) -> None:
    record = current.record.model_copy(update={"updated_at": utc_now()})
    if _replace(services, record, current.tag):  # the next one waits another period
        try:
            services.runner.submit(job_id(record.id, record.version))
            log.warning("job %s: queued for a long time; published again", record.id)
        except ServiceUnavailable as error:
            log.warning("job %s: cannot publish again yet: %s", record.id, error.detail)


#: An index entry without a record is dropped only this long after its id was made: the entry
#: is written before the record, so a younger one may belong to a create still in progress.
CREATING_S = 600.0


def _active(services: Services, ids: list[str] | None = None):
    """The jobs in flight (by default those in the index), read with their tags; stale index
    entries are dropped."""
    store = services.store
    for job in store.active_ids() if ids is None else ids:
        classifier_id = parse_job_id(job)[0]
        try:
            current = store.load_job(job)
        except NotFound:
            # NB: a version's entry is written before its record, like a classifier's
            if store.is_deleted(classifier_id) or classifier_age_s(classifier_id) > CREATING_S:
                store.drop_from_active(job)
            continue
        if not current.record.in_flight:
            store.drop_from_active(job)
            continue
        yield current


def _replace(services: Services, record, tag: str) -> str | None:
    """The conditional write; None when someone else changed or deleted the record first."""
    try:
        return services.store.save_record(record, tag)
    except (PreconditionFailed, NotFound):
        return None
