"""One worker's run of a training job: it holds the job's lease from the claim to the final
commit.

Every write of the record is a compare-and-set on the version tag of this run's own previous
write, so anything another process did meanwhile (a delete, a sweep that re-queued the job or
ended its refinement, a second worker's claim) makes the write fail instead of being
overwritten, and the run stops. After its final write the run writes nothing more: a late
heartbeat cannot undo a commit.

Training is staged (`models.training.STAGES`): each stage that beats the served one is
committed without ending the run (`commit_stage`: ready, `refining`, its head named by the
record under the run id `{run}-{stage}`, lease and progress kept), and the final write
(`finish`, or `end_refinement` when the run is cancelled or fails after a committed stage)
ends it: `refining` false, no progress, no lease. Heads of superseded stages stay in the store
until the classifier is deleted (a reader may still hold a record naming one).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from models.options import HeadOptions
from service.errors import NotFound, ServiceUnavailable
from service.jobs.services import Services
from service.storage.classifiers import PreconditionFailed, Versioned
from service.storage.records import ClassifierRecord, Error, Lease, Metrics, Progress, utc_now

log = logging.getLogger(__name__)

#: Progress is written to the store at most this often (plus at every stage change).
PROGRESS_INTERVAL_S = 1.0

LEASE_LOST = "the job was handed to another worker (lease lost)"


class Stopped(Exception):
    """Raised into the training loop when the run must stop (cancelled, deleted, lease lost)."""


class TrainingRun:
    def __init__(self, services: Services, claimed: Versioned,
                 should_stop: Callable[[], bool]):
        self.services = services
        self.record, self._tag = claimed.record, claimed.tag
        self.owner = claimed.record.lease.owner
        self.run_id = f"{claimed.record.attempts}-{secrets.token_hex(4)}"
        self.stop_reason: str | None = None
        self.finished = False  # the final write landed; nothing is written after it
        self._should_stop = should_stop
        self._lock = threading.Lock()
        self._started = self._last_write = time.monotonic()
        self._last_stage = _stage_of(claimed.record.progress)
        self._attempted_at = None  # updated_at of the last write tried (to tell if it landed)
        self.served_run: str | None = None  # the committed stage's run id, once there is one

    def is_stopped(self) -> bool:
        """Whether the run must stop; polled between batches and epochs. No side effects but
        noting a cancellation."""
        if self.stop_reason is None and self._should_stop():
            self.stop_reason = "cancelled"
        return self.stop_reason is not None

    def check_time_limit(self) -> None:
        """Raises TimeoutError (the job fails with that reason) past the job time limit."""
        limit = self.services.settings.job_time_limit_s
        if time.monotonic() - self._started > limit:
            raise TimeoutError(f"training ran longer than the limit of {limit:g} s "
                               "(HEADSTART_JOB_TIME_LIMIT_S)")

    def should_stop(self) -> bool:
        """The training loop's stop check: the time limit, then cancellation."""
        self.check_time_limit()
        return self.is_stopped()

    def on_progress(self, progress: Any) -> None:
        """Called by the training loop between batches and epochs with a `models` Progress."""
        now = time.monotonic()
        stage = _stage_of(progress)
        if stage != self._last_stage or now - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_stage = stage
            fields = {key: value for key, value in vars(progress).items()}
            fields["history"] = list(fields.get("history") or ())
            self._write(lambda record: setattr(record, "progress", Progress(**fields)))
        if self.should_stop():
            raise Stopped(self.stop_reason)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renews the lease on a thread, so slow stages (a big download) keep it too."""
        interval = self.services.settings.lease_seconds / 6
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                if time.monotonic() - self._last_write >= interval:
                    self.renew()

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.record.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def renew(self) -> None:
        """Renews the lease (a no-op once the run has stopped or finished)."""
        self._write()

    def commit_stage(self, stage: str, head: bytes, report: dict[str, Any], head_options: dict,
                     stages: list[dict], fine_tuned: dict | None = None) -> None:
        """Serves a stage's head while the run goes on: head and report first, under the run
        id `{run}-{stage}`; then the record that names them (ready, refining; progress, lease
        and the `active/` entry kept; `fine_tuned` as the report has it, None when frozen).

        Raises:
            Stopped: the record changed under the run (deleted, taken over); the stage's files
                are removed again.
            ServiceUnavailable: the write failed; the files are removed again, unless the
                record cannot be read to tell whether the write landed after all.
        """
        run_id = f"{self.run_id}-{stage}"
        store, record_id = self.services.store, self.record.id
        store.save_head(record_id, run_id, head)
        store.save_report(record_id, run_id, json.dumps(report, default=_plain).encode())
        validation = report["validation"]
        first = self.served_run is None

        def serve(record: ClassifierRecord) -> None:
            record.status, record.run, record.stage, record.refining = "ready", run_id, stage, True
            record.head = HeadOptions(**head_options)
            record.fine_tuned = fine_tuned
            record.metrics = Metrics(val_accuracy=validation["accuracy"],
                                     val_loss=validation["loss"])
            record.stages, record.error = list(stages), None
            record.training_seconds = round(time.monotonic() - self._started, 3)
            record.threshold = report.get("threshold")

        if not self._commit(serve, run_id):
            raise Stopped(self.stop_reason)
        self.served_run = run_id
        if first:
            self.services.metrics.job_event("ready")

    def finish(self, stages: list[dict], report: dict[str, Any]) -> None:
        """The final write once every stage has run: the served head stays, refining ends, the
        lease is given back. The served head's `report` is stored again first: what it says of
        the whole run (the features extracted, `features`) is complete only now.

        Raises:
            ServiceUnavailable: the write failed and cannot be told to have landed.
        """
        if self.served_run is None:
            raise RuntimeError("finish() before any stage was committed")
        self.services.store.save_report(self.record.id, self.served_run,
                                        json.dumps(report, default=_plain).encode())

        def done(record: ClassifierRecord) -> None:
            record.refining, record.progress, record.stages = False, None, list(stages)
            record.training_seconds = round(time.monotonic() - self._started, 3)

        self._commit(done, final=True)

    def end_refinement(self, error: Error | None = None) -> None:
        """After a committed stage, when the run stops early (cancelled, failed): the final
        write, keeping the served head; `error` says why a failed refinement stopped. A no-op
        when no stage was committed or the record is no longer this run's."""
        if self.served_run is None:
            return

        def ended(record: ClassifierRecord) -> None:
            record.refining, record.progress, record.error = False, None, error

        self._commit(ended, final=True, after_cancel=True)

    def fail(self, title: str, detail: str) -> None:
        def failed(record: ClassifierRecord) -> None:
            record.status, record.progress = "failed", None
            record.error = Error(title=title, detail=detail)

        self._write(failed, final=True)
        log.error("job %s: %s: %s", self.record.id, title, detail)

    def _commit(self, change: Callable[[ClassifierRecord], None], run_id: str | None = None,
                final: bool = False, after_cancel: bool = False) -> bool:
        """A write that must land (a stage's, or the final one); whether it did. A stage whose
        write did not land has its files (`run_id`) removed again."""
        try:
            landed = self._write(change, final=final, must_land=True, after_cancel=after_cancel)
        except ServiceUnavailable:
            landed = self._landed_after_all(final)
            if landed is False and run_id:
                self._discard_files(run_id)
            if not landed:  # NB: unknown (None): the files stay, a record may name them
                raise
        if not landed and run_id:
            self._discard_files(run_id)
        return landed

    def _landed_after_all(self, final: bool) -> bool | None:
        """After a write raised: whether it landed anyway (an error can come after the store
        applied it), read back from the record; None when the record cannot be read."""
        try:
            current = self.services.store.load_versioned(self.record.id, self.record.version)
        except NotFound:
            self.stop_reason = "deleted"
            return False
        except ServiceUnavailable as error:
            log.warning("job %s: cannot tell whether run %s's write landed: %s", self.record.id,
                        self.run_id, error.detail)
            return None
        if current.record.updated_at != self._attempted_at:
            return False
        with self._lock:
            self.record, self._tag, self.finished = current.record, current.tag, final
        return True

    def _discard_files(self, run_id: str) -> None:
        """A stage's head and report, which no record names; a deleted classifier's prefix is
        purged again, since the delete may have run before they were written."""
        store = self.services.store
        try:
            if self.stop_reason == "deleted":
                store.purge(self.record.id)
            else:
                store.delete_run(self.record.id, run_id)
        except ServiceUnavailable as error:
            log.warning("job %s: cannot remove run %s's files: %s", self.record.id, run_id,
                        error.detail)

    def _write(self, change: Callable[[ClassifierRecord], None] | None = None,
               final: bool = False, must_land: bool = False, after_cancel: bool = False) -> bool:
        """Applies `change` and renews the lease (or ends it, if `final`) by a compare-and-set
        on this run's last write; whether it landed. A conflict or a deletion sets
        `stop_reason`. A store outage is retried at the next beat, except on a write that must
        land, where it raises. After a cancellation only a write `after_cancel` (ending the
        refinement) is made."""
        with self._lock:
            cancelled_only = after_cancel and self.stop_reason == "cancelled"
            if (self.stop_reason and not cancelled_only) or self.finished:
                return False
            record = self.record.model_copy(deep=True)
            if change:
                change(record)
            record.lease = None if final else Lease(owner=self.owner, heartbeat_at=utc_now())
            record.updated_at = self._attempted_at = utc_now()
            landed = False
            try:
                self._tag = self.services.store.save_record(record, self._tag)
                self.record, self.finished, landed = record, final, True
            except PreconditionFailed:
                self.stop_reason = LEASE_LOST
            except NotFound:
                self.stop_reason = "deleted"
            except ServiceUnavailable as error:
                if final or must_land:
                    raise
                log.warning("job %s: cannot write progress: %s", record.id, error.detail)
            self._last_write = time.monotonic()
            return landed


def _stage_of(progress: Any) -> tuple[str | None, str | None]:
    """What makes a progress write immediate when it changes: the step and the stage."""
    if progress is None:
        return None, None
    return progress.stage, getattr(progress, "training_stage", None)


def _plain(value: Any) -> Any:
    """JSON for the numpy scalars and arrays a report may hold."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
