"""A training worker: `python -m service.workers.worker`, with `HEADSTART_QUEUE` set to the broker URL.

One job at a time (Celery's solo pool, prefetch 1, late acks), so one worker per GPU. It loads
and warms the backbone before it takes a job, uses the GPU when there is one (with memory
growth on), and names the device in each report. SIGTERM is a warm shutdown: the running job
finishes first. A worker killed mid-job (SIGKILL, out of memory, lost node) stops renewing the
job's lease, and the API's sweep re-queues the job within `HEADSTART_LEASE_SECONDS` and a bit.

Extra arguments go to `celery worker`, e.g. `--loglevel DEBUG`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from service.app import open_runner, open_store
from service.config import Settings
from service.jobs.services import Services
from service.jobs.training import run_training_job
from service.metrics import Metrics
from service.serving.backbone import BackboneHolder, load_configured_backbone
from service.serving.heads import HeadCache
from service.storage.blobs import ConditionalWritesUnsupported, StoreUnavailable
from service.workers.broker import QUEUE_NAME, TASK_NAME, celery_app

log = logging.getLogger("service.workers.worker")

WORKER_BOOT_ERROR = 3


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if settings.queue == "local":
        print("HEADSTART_QUEUE is 'local': the API trains in-process, and a worker needs a broker "
              "URL such as redis://localhost:6379/0", file=sys.stderr)
        return 2
    try:
        store = open_store(settings)
    except (ConditionalWritesUnsupported, StoreUnavailable) as error:
        log.critical("the worker cannot take jobs from this store; stopping. %s", error)
        return WORKER_BOOT_ERROR
    services = Services(
        settings=settings, store=store,
        backbone=BackboneHolder(lambda: load_configured_backbone(settings),
                                on_error=_refuse_to_start),
        heads=HeadCache(_no_heads, capacity=1), runner=open_runner(settings), metrics=Metrics())
    services.backbone.start()
    services.backbone.get(wait=True)  # warm before taking a job; a failure has exited already
    services.metrics.watch_backbone(services.backbone.images_by_purpose)

    app = celery_app(settings)

    @app.task(name=TASK_NAME)
    def train(job: str) -> None:  # a job id: the classifier and its version
        run_training_job(services, job)

    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, registry=services.metrics.registry)
    log.info("worker ready: backbone %s, queue %s", services.backbone.identity().as_dict(),
             QUEUE_NAME)
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1",
                     f"--queues={QUEUE_NAME}", "--without-gossip", "--without-mingle",
                     "--without-heartbeat", "--loglevel=INFO",
                     f"--hostname=headstart@{socket.gethostname()}-{os.getpid()}",
                     *(argv if argv is not None else sys.argv[1:])])
    return 0


def _no_heads(record):
    raise RuntimeError("training workers do not serve predictions")


def _refuse_to_start(error: BaseException) -> None:
    log.critical("the worker cannot train without its backbone; stopping. %s", error)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
