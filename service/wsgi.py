"""gunicorn's entry point: `gunicorn -c service/gunicorn.conf.py service.wsgi:app`.

Imported by each worker after fork (never preload: TensorFlow is not fork-safe), so every worker
builds its own app, loads the backbone once and warms it up.
"""

import logging
import os

from service.app import create_app
from service.config import Settings

# gunicorn's WORKER_BOOT_ERROR: the arbiter halts instead of respawning a worker that cannot work.
WORKER_BOOT_ERROR = 3


def _refuse_to_start(error: BaseException) -> None:
    logging.getLogger("service.wsgi").critical(
        "Headstart cannot serve without its backbone; stopping. %s", error)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


app = create_app(Settings(), on_backbone_error=_refuse_to_start)
