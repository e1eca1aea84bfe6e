"""The per-process backbone: loaded once after fork, on a thread, then fed through the shared
batching queue."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.serving.batching import FeatureBatcher
from service.errors import ServiceUnavailable
from service.config import Settings

log = logging.getLogger(__name__)


def load_configured_backbone(settings: Settings):
    """The backbone `HEADSTART_BACKBONE_WEIGHTS` and `HEADSTART_IMAGE_SIZE` ask for."""
    from models.backbone import load_backbone  # NB: TensorFlow is imported here, after fork
    from service.weights import local_weights

    weights, source = local_weights(settings)
    return load_backbone(weights, settings.image_size, source=source,
                         precision=settings.precision)


def batching_options(settings: Settings) -> dict:
    return {"max_batch": settings.predict_max_batch,
            "max_wait_s": settings.predict_max_wait_ms / 1000,
            "max_queued": settings.predict_max_queued_images,
            "timeout_s": settings.predict_timeout_s}


class BackboneHolder:
    """Loads the backbone on a background thread so the process answers /healthz meanwhile.

    `get()` raises 503 until the backbone is loaded and warmed up; a failed load keeps its reason
    for /readyz and is passed to `on_error` (the gunicorn entry point exits the worker there).
    """

    def __init__(self, load: Callable[[], "Backbone"],  # noqa: F821
                 on_error: Callable[[BaseException], None] | None = None,
                 batching: dict | None = None):
        self._load = load
        self._on_error = on_error
        self._batching = batching or {"max_batch": 32, "max_wait_s": 0.002,
                                      "max_queued": 256, "timeout_s": 30.0}
        self._backbone = None
        self._batcher: FeatureBatcher | None = None
        self._batcher_lock = threading.Lock()
        self.batcher_restarts = 0
        self.error: str | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="backbone-loader", daemon=True).start()

    def _run(self) -> None:
        try:
            backbone = self._load()
            backbone.warm_up()
            self._batcher = FeatureBatcher(backbone, **self._batching).start()
            self._backbone = backbone
            log.info("backbone ready: %s", backbone.identity.as_dict())
        except Exception as error:  # any failure must surface in /readyz and the log
            self.error = f"{type(error).__name__}: {error}"
            log.critical("backbone failed to load: %s", self.error)
            if self._on_error:
                self._on_error(error)
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._backbone is not None

    @property
    def passes(self) -> int:
        """Images this process has sent through the backbone."""
        return self._backbone.passes if self._backbone is not None else 0

    def get(self, wait: bool = False):
        """The loaded backbone; with `wait`, blocks until loading has finished."""
        if wait:
            self._ready.wait()
        if self._backbone is None:
            raise ServiceUnavailable(
                f"the backbone failed to load: {self.error}" if self.error
                else "the backbone is still loading; retry shortly",
                headers={"Retry-After": "5"})
        return self._backbone

    def identity(self):
        return self.get().identity

    def features(self, images, then=None, upper=None):
        """Backbone features for a request's images through the shared batching queue, with
        `then` applied to them on the batching thread (`upper`: a fine-tuned classifier's
        own blocks)."""
        self.get()
        self.check_batcher()
        return self._batcher.features(images, then, upper)

    def check_batcher(self) -> str:
        """"ok" while the batching thread runs; if it has stopped, starts a new one and says
        why it had stopped (so /readyz fails once, and the next request is served)."""
        with self._batcher_lock:
            dead = self._batcher
            if dead is None or dead.alive:
                return "ok" if dead is not None else "loading"
            self._batcher = FeatureBatcher(dead.backbone, **self._batching).start()
            self.batcher_restarts += 1
        reason = f"{type(dead.stopped_by).__name__}: {dead.stopped_by}"
        log.error("the batching thread had stopped (%s); started a new one", reason)
        return f"restarted: the batching thread had stopped ({reason})"

    @property
    def queued_images(self) -> int:
        return self._batcher.queued if self._batcher else 0
