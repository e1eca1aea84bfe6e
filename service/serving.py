"""Per-process serving state: the backbone, loaded once after fork, and an LRU cache of heads."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from service.batching import FeatureBatcher
from service.errors import ServiceUnavailable
from service.schemas import ClassifierRecord
from service.settings import Settings

log = logging.getLogger(__name__)


def load_configured_backbone(settings: Settings):
    """The backbone `HEADSTART_BACKBONE_WEIGHTS` and `HEADSTART_IMAGE_SIZE` ask for."""
    from models.backbone import load_backbone  # NB: TensorFlow is imported here, after fork
    from service.weights_source import local_weights

    return load_backbone(local_weights(settings), settings.image_size,
                         cache_dir=settings.weights_cache, precision=settings.precision)


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
        self.error: str | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="backbone-loader", daemon=True).start()

    def _run(self) -> None:
        try:
            backbone = self._load()
            backbone.warm_up()
            self._batcher = FeatureBatcher(backbone, **self._batching)
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

    def features(self, images, then=None):
        """Backbone features for a request's images through the shared batching queue, with
        `then` applied to them on the batching thread."""
        self.get()
        return self._batcher.features(images, then)

    @property
    def queued_images(self) -> int:
        return self._batcher.queued if self._batcher else 0


class HeadCache:
    """Least-recently-used heads, keyed by classifier id and the record's update time."""

    def __init__(self, load: Callable[[ClassifierRecord], "keras.Model"],  # noqa: F821
                 capacity: int):
        self._load = load
        self._capacity = capacity
        self._heads: OrderedDict[str, tuple[object, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ClassifierRecord):
        with self._lock:
            cached = self._heads.get(record.id)
            if cached and cached[0] == record.updated_at:
                self._heads.move_to_end(record.id)
                return cached[1]
        head = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._heads[record.id] = (record.updated_at, head)
            self._heads.move_to_end(record.id)
            while len(self._heads) > self._capacity:
                self._heads.popitem(last=False)
        return head

    def forget(self, classifier_id: str) -> None:
        with self._lock:
            self._heads.pop(classifier_id, None)

    def __len__(self) -> int:
        return len(self._heads)
