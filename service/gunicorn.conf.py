"""gunicorn settings for Headstart. Every value can be overridden on the command line."""

import os
import signal

from service.config import Settings

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "gthread"
# One process per machine: it holds the backbone and the in-process training runner, and
# TensorFlow already spreads one call over every core. Threads overlap decoding and I/O.
workers = int(os.environ.get("HEADSTART_WEB_WORKERS", "1"))
# Event streams (GET …/events) each hold a thread for minutes; they get their own threads on top,
# and past HEADSTART_MAX_EVENT_STREAMS they are refused, so they never starve other requests.
_event_streams = int(os.environ.get("HEADSTART_MAX_EVENT_STREAMS",
                                    Settings.model_fields["max_event_streams"].default))
threads = int(os.environ.get("HEADSTART_WEB_THREADS", "8")) + _event_streams
# NB: never preload. TensorFlow is not fork-safe; each worker loads it after fork.
preload_app = False
timeout = 300          # a predict batch or a large upload may take minutes on a small CPU
graceful_timeout = 60  # SIGTERM lets in-flight requests finish
keepalive = 5
# NB: no control socket: it lives in $HOME, which a read-only container does not have, and two
# servers on one machine (make run-cluster) would share it.
control_socket_disable = True
# NB: the default access_log_format logs no request headers, so API keys (Authorization) never
# reach the log; a custom format must not add %({authorization}i)s.
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("HEADSTART_LOG_LEVEL", "info")
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                             "stream": "ext://sys.stderr"}},
    "root": {"level": loglevel.upper(), "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}


def post_worker_init(worker):
    """On SIGTERM, event streams end at once (their clients reconnect, to another replica), so
    they never hold up the graceful shutdown that lets other requests finish."""
    streams = worker.wsgi.extensions["headstart.event_streams"]
    previous = signal.getsignal(signal.SIGTERM)

    def end_streams_then_stop(signum, frame):
        streams.shut_down()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, end_streams_then_stop)
