"""The per-process backbone: loaded once after fork, on a thread, then fed through the shared
batching queue.

The process computes in the precision `HEADSTART_PRECISION` resolves to on its device (`auto`:
`models.precision`). A classifier is created in the precision of the process that creates it
(its record's `backbone.precision`; `features_precision` is float32 for records from before),
and is trained and served on features of that precision: a process that computes in another
trains or serves it through a copy of the backbone in the classifier's precision, loaded on first
use and kept. So its answers are those of the backbone it was trained on, at that precision's
speed (for the float32 classifiers of before: the speed they had). The log says so once, and
/readyz lists the precisions loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.serving.batching import FeatureBatcher
from service.errors import ServiceUnavailable
from service.config import Settings

log = logging.getLogger(__name__)


def load_configured_backbone(settings: Settings):
    """The backbone `HEADSTART_BACKBONE_WEIGHTS`, `HEADSTART_IMAGE_SIZE` and
    `HEADSTART_PRECISION` ask for."""
    from models.backbone import load_backbone  # NB: TensorFlow is imported here, after fork
    from models.precision import resolve
    from service.weights import local_weights

    choice = resolve(settings.precision)
    log.info("backbone precision: %s (%s)", choice.policy, choice.reason)
    weights, source = local_weights(settings)
    return load_backbone(weights, settings.image_size, source=source, precision=choice)


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
        self._others: dict[str, object] = {}  # precision → a copy for classifiers trained in it
        self._others_lock = threading.Lock()

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
        """Images this process has sent through the backbone (in every precision)."""
        return sum(self.images_by_purpose().values())

    def images_by_purpose(self) -> dict[str, int]:
        """Images this process has sent through the backbone, in every precision, by purpose
        ("training", "predict": `models.backbone.PURPOSES`)."""
        counts = dict.fromkeys(("training", "predict"), 0)
        if self._backbone is None:
            return counts
        for backbone in (self._backbone, *list(self._others.values())):
            for purpose, images in list(backbone.images.items()):
                counts[purpose] = counts.get(purpose, 0) + images
        return counts

    def get(self, wait: bool = False, precision: str | None = None):
        """The loaded backbone; with `wait`, blocks until loading has finished.

        Args:
            precision: the precision the caller's classifier was trained in
                (`ClassifierRecord.features_precision`);
                another than the process's loads a copy in that precision, once.
        """
        if wait:
            self._ready.wait()
        if self._backbone is None:
            raise ServiceUnavailable(
                f"the backbone failed to load: {self.error}" if self.error
                else "the backbone is still loading; retry shortly",
                headers={"Retry-After": "5"})
        if precision is None or precision == self._backbone.precision:
            return self._backbone
        return self._other(precision)

    def _other(self, precision: str):
        from models.precision import Choice, POLICIES

        if precision not in POLICIES:
            raise ValueError(f"a classifier names an unknown precision {precision!r}")
        with self._others_lock:  # NB: one load per precision, even when requests race
            if precision in self._others:
                return self._others[precision]
            primary = self._backbone
            log.warning(
                "a classifier's features are %s and this process computes %s (%s): loading a %s "
                "copy of the backbone for such classifiers, so they are trained and served on "
                "the features they were made for, at that precision's speed (classifiers "
                "created by this process use its own)",
                precision, primary.precision, primary.identity.precision_reason, precision)
            try:
                other = primary.in_precision(Choice(
                    precision, f"for classifiers trained in {precision}; this process chose "
                               f"{primary.precision} ({primary.identity.precision_reason})"))
                other.warm_up()
            except Exception as error:
                log.error("cannot load a %s backbone: %s", precision, error)
                raise ServiceUnavailable(
                    f"this classifier was trained on {precision} features, and this process "
                    f"cannot load a {precision} backbone: {type(error).__name__}: {error}",
                    headers={"Retry-After": "60"}) from error
            self._others[precision] = other
            return other

    @property
    def precisions(self) -> list[str]:
        """The precisions this process computes in: its own first, then the copies loaded for
        classifiers trained in another."""
        if self._backbone is None:
            return []
        return [self._backbone.precision, *self._others]

    def identity(self):
        return self.get().identity

    def features(self, images, then=None, upper=None, deadline: float | None = None,
                 precision: str | None = None):
        """Backbone features for a request's images through the shared batching queue, with
        `then` applied to them on the batching thread (`upper`: a fine-tuned classifier's
        own blocks); `deadline` (time.monotonic) bounds the wait instead of the batcher's own
        timeout; `precision` as for `get`."""
        backbone = self.get(precision=precision)
        self.check_batcher()
        return self._batcher.features(images, then, upper, deadline=deadline, backbone=backbone)

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
