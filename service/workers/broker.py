"""Training jobs through Celery, when `HEADSTART_QUEUE` is a broker URL.

Messages carry a job id (the classifier id, plus `.v{n}` for its version n ≥ 2) and nothing else;
workers (`python -m service.workers.worker`) read the dataset from the store and write progress, heads and reports back to it. Delivery is at least
once (late acknowledgement), and the job's lease in the store makes every extra delivery
harmless: a worker drops a job that is finished, deleted, or running under a live lease.

Redis is the broker we run and test (README, "Scaling out", says why). Celery's AMQP transport
works through the same code, but is not exercised by the tests.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from service.errors import ServiceUnavailable
from service.config import Settings

log = logging.getLogger(__name__)

TASK_NAME = "headstart.train"
QUEUE_NAME = "headstart.training"


class QueueUnavailable(ServiceUnavailable):
    title = "Queue unavailable"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "5"})


def celery_app(settings: Settings) -> Celery:
    """The Celery app shared by the API (which publishes) and the workers (which consume)."""
    app = Celery("headstart", broker=settings.queue, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE_NAME,
        task_serializer="json", accept_content=["json"],
        task_ignore_result=True,          # results live in the store, not in a result backend
        task_acks_late=True,              # acknowledged when the job has finished, not when taken
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,     # a worker holds no job in reserve that another could run
        # A long job must not be delivered again while it runs: Redis does that after the
        # visibility timeout, so it is set above any job's length (the lease guards beyond it).
        broker_transport_options={"visibility_timeout": settings.queue_visibility_timeout},
        # A worker that loses the broker keeps its job running; the lease decides who owns it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Publishing fails fast (a 503 to the caller) instead of retrying for minutes.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 1},
        worker_hijack_root_logger=False,
    )
    return app


class CeleryRunner:
    """Publishes training jobs to the broker; training workers run them."""

    def __init__(self, settings: Settings):
        self.app = celery_app(settings)
        self._url = settings.queue.split("@")[-1]  # without credentials, for messages

    def submit(self, job: str) -> None:
        try:
            self.app.send_task(TASK_NAME, args=[job], queue=QUEUE_NAME)
        except (KombuError, OSError) as error:
            raise QueueUnavailable(f"cannot queue the training job on {self._url}: {error}") \
                from error

    def cancel(self, job: str) -> None:
        """Nothing to send: deleting the record is the signal. The worker checks the record at
        every progress write (about once a second) and stops within a batch."""

    def ping(self) -> None:
        self.depth()

    def depth(self) -> int:
        try:
            with self.app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
                queue = self.app.amqp.queues[QUEUE_NAME](connection.default_channel)
                return queue.queue_declare().message_count
        except (OperationalError, KombuError, OSError) as error:
            raise QueueUnavailable(f"the broker {self._url} is unreachable: {error}") from error
