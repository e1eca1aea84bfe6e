"""gunicorn's entry point: `gunicorn -c service/gunicorn.conf.py service.wsgi:app`.

Imported by each worker after fork (never preload: TensorFlow is not fork-safe), so every worker
builds its own app, loads the backbone once and warms it up. A worker that cannot work (no
backbone, a store that ignores conditional writes or cannot be checked) logs why and exits with
gunicorn's boot-error status, so the server stops instead of respawning it.
"""

import logging
import os

from service.app import create_app
from service.config import Settings
from service.storage.blobs import ConditionalWritesUnsupported, StoreUnavailable

# gunicorn's WORKER_BOOT_ERROR: the arbiter halts instead of respawning a worker that cannot work.
WORKER_BOOT_ERROR = 3


def _refuse_to_start(error: BaseException) -> None:
    _stop("Headstart cannot serve without its backbone; stopping. %s", error)


def _stop(message: str, error: BaseException) -> None:
    logging.getLogger("service.wsgi").critical(message, error)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


try:
    app = create_app(Settings(), on_backbone_error=_refuse_to_start)
except ConditionalWritesUnsupported as unsafe:
    _stop("Headstart cannot run on this store; stopping. %s", unsafe)
except StoreUnavailable as unreachable:  # the start-up check of an s3:// store could not run
    _stop("Headstart cannot check its store at start; stopping. %s", unreachable)
