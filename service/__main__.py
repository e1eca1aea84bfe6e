"""`python -m service api|worker|weights`: the container's entrypoint.

    api      gunicorn serving the API on $PORT (service/gunicorn.conf.py); the default
    worker   a training worker taking jobs from HEADSTART_QUEUE (service/worker.py)
    weights  resolve and check HEADSTART_BACKBONE_WEIGHTS, then exit (the image build runs it)

Every setting comes from the environment. Extra arguments go to gunicorn or Celery.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("api", [])
    if command == "api":
        config = Path(__file__).with_name("gunicorn.conf.py")
        # exec: gunicorn becomes the container's main process and receives its signals.
        os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(config),
                                   "service.wsgi:app", *rest])
    if command == "worker":
        from service.workers.worker import main as worker

        return worker(rest)
    if command == "weights":
        from service.weights import main as weights

        return weights()
    print(f"unknown command {command!r}; one of:\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
