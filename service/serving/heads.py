"""The per-process LRU cache of loaded heads, bounded in count and in bytes.

A served head is the head model and, for a fine-tuned classifier, its own upper blocks (tens of
megabytes, where a frozen head is tens of kilobytes): so the bound that matters is memory.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.storage.classifiers import ClassifierStore
from service.storage.records import ClassifierRecord


@dataclass(frozen=True)
class ServedHead:
    """What predict needs of one committed head.

    Attributes:
        head: the Keras head (features → probabilities).
        upper: a fine-tuned classifier's own blocks (`models.finetune.UpperBlocks`), or None.
        nbytes: the memory its weights take.
    """

    head: object
    upper: object | None = None
    nbytes: int = 0


class HeadCache:
    """Least-recently-used served heads, keyed by classifier id and the record's committed run
    (not its update time, which every progress write changes)."""

    def __init__(self, load: Callable[[ClassifierRecord], ServedHead], capacity: int,
                 max_bytes: int | None = None):
        self._load = load
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._heads: OrderedDict[str, tuple[str | None, ServedHead]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, record: ClassifierRecord) -> ServedHead:
        with self._lock:
            cached = self._heads.get(record.id)
            if cached and cached[0] == record.run:
                self._heads.move_to_end(record.id)
                return cached[1]
        served = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._drop(record.id)
            self._heads[record.id] = (record.run, served)
            self._bytes += getattr(served, "nbytes", 0)
            # NB: the newest head stays even if it alone is over the bound: it is being served.
            while len(self._heads) > 1 and (
                    len(self._heads) > self._capacity
                    or (self._max_bytes is not None and self._bytes > self._max_bytes)):
                self._drop(next(iter(self._heads)))
        return served

    def _drop(self, classifier_id: str) -> None:
        cached = self._heads.pop(classifier_id, None)
        if cached:
            self._bytes -= getattr(cached[1], "nbytes", 0)

    def forget(self, classifier_id: str) -> None:
        with self._lock:
            self._drop(classifier_id)

    @property
    def nbytes(self) -> int:
        """Memory of the cached heads' weights."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._heads)


def load_served_head(store: ClassifierStore, backbone, record: ClassifierRecord) -> ServedHead:
    """The committed head of `record` (its `heads/{run}.npz`) and, when it is fine-tuned (the
    file holds `blocks.*` arrays), its own upper blocks on the backbone of the precision it was
    trained in (`backbone`: the `BackboneHolder`)."""
    import numpy as np  # NB: Keras and TensorFlow below, after fork

    from models.finetune import load_upper
    from models.heads import HeadSpec, load_head, trainable_parameters

    data = store.load_head(record)
    computing = backbone.get(precision=record.features_precision)
    head = load_head(HeadSpec(**record.head.model_dump()), computing.feature_dim,
                     len(record.labels), data)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        upper = load_upper(archive, computing)
    # float32 in memory: the head's weights, and the blocks' (stored as float16)
    nbytes = 4 * (trainable_parameters(head) + (upper.parameters() if upper else 0))
    return ServedHead(head, upper, nbytes)
