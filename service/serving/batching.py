"""Dynamic batching in front of the shared backbone.

Every request thread of a process hands its decoded images to one `FeatureBatcher`; a single
thread runs the backbone over whatever has gathered while the previous pass ran (plus at most
`max_wait_s` for stragglers), up to `max_batch` images, so concurrent requests for any mix of
classifiers share passes. Batches are not padded: the backbone's compiled function has a `None`
batch dimension, so no batch size retraces it, and on a CPU a pass costs in proportion to its
images, so padding to bucket sizes wasted up to half a pass (measured: 0.77 of the raw
throughput at concurrency 8 with power-of-two buckets, 1.0 without). Each request's head is applied right after the pass, on the same thread:
TensorFlow calls from request threads running beside the backbone's pass slowed it 2.4x here
(thread pools and the GIL fighting), so request threads only decode images.

A process may hold a second backbone, in another precision, for classifiers trained in it
(`service.serving.backbone`): its requests go through the same queue and thread, and a pass
takes only chunks of one backbone (that of the oldest waiting chunk), so two backbones never
run at once and neither waits behind the other for more than a pass.

The queue is bounded in images: a request that would overflow it is refused at once with a 503
(`Overloaded`), and a request waits at most `timeout_s` for its features. Should the batching
thread ever stop, `alive` says so (the holder restarts it, /readyz reports it) and the requests it
held fail at once instead of waiting out their timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class Overloaded(ServiceUnavailable):
    title = "Overloaded"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "1"})


@dataclass(eq=False)
class _Chunk:
    """At most `max_batch` images of one request, and where their features go."""

    images: np.ndarray
    then: Callable[[np.ndarray], np.ndarray] | None = None
    upper: object | None = None  # a fine-tuned classifier's own blocks (models.finetune)
    backbone: object = None  # the backbone of the precision the classifier was trained in
    done: threading.Event = field(default_factory=threading.Event)
    features: np.ndarray | None = None
    error: BaseException | None = None
    abandoned: bool = False


class FeatureBatcher:
    """Shared backbone passes; `start()` starts its thread."""

    def __init__(self, backbone, *, max_batch: int, max_wait_s: float, max_queued: int,
                 timeout_s: float):
        self.backbone = backbone
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.max_queued, self.timeout_s = max_queued, timeout_s
        self._pending: deque[_Chunk] = deque()
        self._in_pass: list[_Chunk] = []
        self._queued = 0  # images waiting, not yet in a pass
        self._cond = threading.Condition()
        self.batches = 0  # passes run, for metrics and tests
        self.stopped_by: BaseException | None = None  # what ended the thread, if anything did
        self._thread = threading.Thread(target=self._run, name="feature-batcher", daemon=True)

    def start(self) -> FeatureBatcher:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the batching thread runs (False once anything has stopped it)."""
        return self._thread.is_alive() and self.stopped_by is None

    @property
    def queued(self) -> int:
        return self._queued

    def features(self, images: np.ndarray,
                 then: Callable[[np.ndarray], np.ndarray] | None = None,
                 upper=None, deadline: float | None = None, backbone=None) -> np.ndarray:
        """Backbone features of `images` (batch, size, size, 3), computed in shared passes, with
        `then` (e.g. a classifier's head) applied to them on the batching thread. `upper` is a
        fine-tuned classifier's own blocks: its rows share the frozen blocks' pass, then go
        through them instead of the shared ones. `deadline` (time.monotonic) replaces now +
        `timeout_s`, for a request that spent time before. `backbone` (default: this
        batcher's) is the one to compute them with: a pass holds one backbone's chunks only.

        Raises:
            Overloaded: the queue holds too many images already; retry shortly.
            ServiceUnavailable: the features did not come within `timeout_s`.
        """
        backbone = backbone if backbone is not None else self.backbone
        chunks = [_Chunk(images[start:start + self.max_batch], then, upper, backbone)
                  for start in range(0, len(images), self.max_batch)]
        with self._cond:
            if not self.alive:
                raise self._stopped_error()
            if self._queued + len(images) > self.max_queued:
                raise Overloaded(f"{self._queued} images are waiting for the backbone (the limit "
                                 f"is {self.max_queued}); retry shortly")
            self._pending.extend(chunks)
            self._queued += len(images)
            self._cond.notify()
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        for chunk in chunks:
            if not chunk.done.wait(max(0.0, deadline - time.monotonic())):
                self._abandon(chunks)
                raise ServiceUnavailable(
                    f"prediction did not finish within {self.timeout_s:g} s; the server is busy",
                    headers={"Retry-After": "5"})
            if chunk.error is not None:
                raise chunk.error
        return np.concatenate([chunk.features for chunk in chunks])

    def _abandon(self, chunks: list[_Chunk]) -> None:
        with self._cond:
            for chunk in chunks:
                chunk.abandoned = True
                if chunk in self._pending:
                    self._pending.remove(chunk)
                    self._queued -= len(chunk.images)

    def _take_batch(self) -> list[_Chunk]:
        """Blocks for work; then gathers up to max_batch images, waiting max_wait_s at most.
        Never returns an empty batch."""
        with self._cond:
            while True:
                while not self._pending:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_s
                while self._queued < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, count, skipped = [], 0, []
                backbone = self._pending[0].backbone if self._pending else None
                while self._pending:
                    if self._pending[0].backbone is not backbone:  # another precision: next pass
                        skipped.append(self._pending.popleft())
                        continue
                    if count + len(self._pending[0].images) > self.max_batch:
                        break
                    chunk = self._pending.popleft()
                    batch.append(chunk)
                    count += len(chunk.images)
                self._pending.extendleft(reversed(skipped))
                self._queued -= count
                # NB: every request that was waiting may have timed out (`_abandon`) meanwhile.
                if batch:
                    self._in_pass = batch
                    return batch

    def _run(self) -> None:
        from models.backbone import counted_as  # NB: TensorFlow, loaded by now (after fork)

        try:
            with counted_as("predict"):  # /metrics headstart_backbone_images_total{purpose}
                self._loop()
        except BaseException as error:  # NB: a bug here must not hang every later request
            self.stopped_by = error
            log.critical("the batching thread stopped: %s: %s", type(error).__name__, error,
                         exc_info=error)
            with self._cond:
                failed = [*self._in_pass, *self._pending]
                self._pending.clear()
                self._queued = 0
            for chunk in failed:
                if not chunk.done.is_set():
                    chunk.error = self._stopped_error()
                    chunk.done.set()

    def _stopped_error(self) -> ServiceUnavailable:
        why = "was never started" if self.stopped_by is None else \
            f"stopped ({type(self.stopped_by).__name__}: {self.stopped_by})"
        return ServiceUnavailable(f"the batching thread {why}; retry shortly",
                                  headers={"Retry-After": "1"})

    def _pass(self, batch: list[_Chunk]) -> np.ndarray:
        images = np.concatenate([chunk.images for chunk in batch])
        backbone = batch[0].backbone
        if all(chunk.upper is None for chunk in batch):
            return backbone.features(images)
        from models.finetune import mixed_pass  # NB: TensorFlow, loaded by now (after fork)

        return mixed_pass(backbone, images,
                          [chunk.upper for chunk in batch for _ in range(len(chunk.images))])

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                features = self._pass(batch)
            except Exception as error:  # handed to the waiting requests, which raise it
                log.exception("backbone pass failed")
                for chunk in batch:
                    chunk.error = error
                    chunk.done.set()
                self._in_pass = []
                continue
            self.batches += 1
            offset = 0
            for chunk in batch:
                own = features[offset:offset + len(chunk.images)]
                offset += len(chunk.images)
                try:
                    chunk.features = chunk.then(own) if chunk.then else own
                except Exception as error:  # this request's head failed; the others go on
                    chunk.error = error
                chunk.done.set()
            self._in_pass = []

