"""One worker's run of a training job: it holds the job's lease from the claim to the commit.

Every write of the record is a compare-and-set on the version tag of this run's own previous
write, so anything another process did meanwhile (a delete, a sweep that re-queued the job, a
second worker's claim) makes the write fail instead of being overwritten, and the run stops.
After its final write the run writes nothing more: a late heartbeat cannot undo a commit.
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
        self._last_stage = claimed.record.progress.stage if claimed.record.progress else None

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
        if progress.stage != self._last_stage or now - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_stage = progress.stage
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

    def commit(self, head: bytes, report: dict[str, Any], head_options: dict) -> None:
        """Head and report first, under this run's id; then the record that names them.

        Raises:
            ServiceUnavailable: the final write failed. This run's files are removed again,
                unless the record cannot be read to tell whether the write landed after all.
        """
        store, record_id = self.services.store, self.record.id
        store.save_head(record_id, self.run_id, head)
        store.save_report(record_id, self.run_id, json.dumps(report, default=_plain).encode())
        validation = report["validation"]

        def ready(record: ClassifierRecord) -> None:
            record.status, record.progress, record.run = "ready", None, self.run_id
            record.head = HeadOptions(**head_options)
            record.metrics = Metrics(val_accuracy=validation["accuracy"],
                                     val_loss=validation["loss"])
            record.training_seconds = round(time.monotonic() - self._started, 3)
            record.threshold = report.get("threshold")

        try:
            self._write(ready, final=True)
        except ServiceUnavailable:
            landed = self._landed_after_all()
            if landed is False:
                self._discard_files()
            if not landed:  # NB: unknown (None): the files stay, a record may name them
                raise
        if not self.finished:
            self._discard_files()

    def fail(self, title: str, detail: str) -> None:
        def failed(record: ClassifierRecord) -> None:
            record.status, record.progress = "failed", None
            record.error = Error(title=title, detail=detail)

        self._write(failed, final=True)
        log.error("job %s: %s: %s", self.record.id, title, detail)

    def _landed_after_all(self) -> bool | None:
        """After the final write raised: whether it landed anyway (an error can come after the
        store applied it), read back from the record; None when the record cannot be read."""
        try:
            current = self.services.store.load_versioned(self.record.id)
        except NotFound:
            self.stop_reason = "deleted"
            return False
        except ServiceUnavailable as error:
            log.warning("job %s: cannot tell whether run %s was committed: %s", self.record.id,
                        self.run_id, error.detail)
            return None
        if current.record.run != self.run_id:
            return False
        with self._lock:
            self.record, self._tag, self.finished = current.record, current.tag, True
        return True

    def _discard_files(self) -> None:
        """This run's head and report, which no record names; a deleted classifier's prefix is
        purged again, since the delete may have run before they were written."""
        store = self.services.store
        try:
            if self.stop_reason == "deleted":
                store.purge(self.record.id)
            else:
                store.delete_run(self.record.id, self.run_id)
        except ServiceUnavailable as error:
            log.warning("job %s: cannot remove run %s's files: %s", self.record.id, self.run_id,
                        error.detail)

    def _write(self, change: Callable[[ClassifierRecord], None] | None = None,
               final: bool = False) -> None:
        """Applies `change` and renews the lease (or ends it, if `final`) by a compare-and-set
        on this run's last write. A conflict or a deletion sets `stop_reason`. A store outage
        is retried at the next beat, except on the final write, where it raises."""
        with self._lock:
            if self.stop_reason or self.finished:
                return
            record = self.record.model_copy(deep=True)
            if change:
                change(record)
            record.lease = None if final else Lease(owner=self.owner, heartbeat_at=utc_now())
            record.updated_at = utc_now()
            try:
                self._tag = self.services.store.save_record(record, self._tag)
                self.record, self.finished = record, final
            except PreconditionFailed:
                self.stop_reason = LEASE_LOST
            except NotFound:
                self.stop_reason = "deleted"
            except ServiceUnavailable as error:
                if final:
                    raise
                log.warning("job %s: cannot write progress: %s", record.id, error.detail)
            self._last_write = time.monotonic()


def _plain(value: Any) -> Any:
    """JSON for the numpy scalars and arrays a report may hold."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
