"""Training runners: how a queued job reaches a worker.

`TrainingRunner` is the interface the use cases see. `ThreadRunner` is the embedded default: one
background thread in the API process runs jobs one at a time. `service.workers.broker.CeleryRunner`
implements the same interface over a distributed queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from service.errors import ServiceUnavailable

log = logging.getLogger(__name__)

#: How long `cancel` waits for a running job to notice before the caller deletes its data.
CANCEL_WAIT_S = 10.0


class TrainingRunner(Protocol):
    def submit(self, job: str) -> None:
        """Queues a job; returns at once."""

    def cancel(self, job: str) -> None:
        """Stops a queued or running job; returns once it has stopped (or after a bound)."""

    def ping(self) -> None:
        """Raises `ServiceUnavailable` when jobs cannot be queued."""

    def depth(self) -> int | None:
        """Jobs waiting for a worker; raises `ServiceUnavailable` when the queue is unreachable."""


JobFunction = Callable[[str, Callable[[], bool]], None]


class ThreadRunner:
    """Runs jobs one at a time on a daemon thread, once `start(work)` names the work:
    `work(job, should_stop)`, with a job id (a classifier and its version). Jobs submitted
    before the start wait in the queue."""

    def __init__(self):
        self._job: JobFunction | None = None
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._finished = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._loop, name="training-runner", daemon=True)

    def start(self, job: JobFunction) -> None:
        self._job = job
        self._thread.start()

    def submit(self, job: str) -> None:
        with self._lock:
            self._cancelled.discard(job)
        self._queue.put(job)

    def cancel(self, job: str) -> None:
        with self._lock:
            self._cancelled.add(job)
            self._finished.wait_for(lambda: self._running != job, timeout=CANCEL_WAIT_S)

    def ping(self) -> None:
        if not self._thread.is_alive():
            raise ServiceUnavailable("the training runner thread has stopped")

    def depth(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                if job in self._cancelled:
                    self._cancelled.discard(job)
                    continue
                self._running = job
            try:
                self._job(job, lambda: job in self._cancelled)
            except Exception:
                log.exception("training job %s failed", job)
            finally:
                with self._lock:
                    self._running = None
                    self._cancelled.discard(job)
                    self._finished.notify_all()
