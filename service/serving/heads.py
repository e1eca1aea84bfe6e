"""The per-process LRU cache of loaded heads, bounded in count and in bytes, and what it holds:
a served head.

A served head is the head model, its trust data and, for a fine-tuned classifier, its own upper
blocks (tens of megabytes, where a frozen head is tens of kilobytes): so the bound that matters
is memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.storage.records import ClassifierRecord

if TYPE_CHECKING:  # NB: no TensorFlow at import
    import keras

    from models.finetune import ServedBlocks
    from models.trust import Trust


@dataclass(frozen=True)
class ServedHead:
    """What predict needs of one committed head, loaded from its one stored file.

    Attributes:
        head: the Keras head (features → softmax probabilities).
        trust: calibration, default threshold and OOD detector; None for a head stored before
            them (temperature 1, nothing rejected unless a request sets a threshold).
        upper: a fine-tuned classifier's own blocks; None for a frozen one.
        nbytes: the memory its weights take: the head in float32, the blocks as held.
    """

    head: keras.Model
    trust: Trust | None = None
    upper: ServedBlocks | None = None
    nbytes: int = 0


def load_served_head(record: ClassifierRecord, data: bytes, backbone) -> ServedHead:
    """A record's committed head from its stored file (`ClassifierStore.load_head`): the
    fine-tuned blocks (`blocks.*`) are rebuilt on `backbone` (`models.backbone.Backbone`, of
    the precision the classifier was trained in)."""
    import io

    import numpy as np

    from models import trust  # NB: Keras (models.heads), after fork
    from models.finetune import load_upper
    from models.heads import HeadSpec, load_head, stored_arrays, trainable_parameters

    head = load_head(HeadSpec(**record.head.model_dump()), backbone.feature_dim,
                     len(record.labels), data)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        upper = load_upper(archive, backbone)
    nbytes = 4 * trainable_parameters(head) + (upper.nbytes if upper else 0)
    return ServedHead(head, trust.from_arrays(stored_arrays(data, trust.PREFIX)), upper, nbytes)


class HeadCache:
    """Least-recently-used served heads, one slot per classifier version, valid while the
    version's record names the same committed run (not the record's update time, which every
    progress write of a later training run changes); at most `capacity` of them and
    `max_bytes` of their weights."""

    def __init__(self, load: Callable[[ClassifierRecord], ServedHead], capacity: int,
                 max_bytes: int | None = None):
        self._load = load
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._heads: OrderedDict[tuple[str, int], tuple[Any, ServedHead]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(record: ClassifierRecord) -> Any:
        """What identifies the committed head of a record."""
        return record.run

    def get(self, record: ClassifierRecord) -> ServedHead:
        key, slot = self.key(record), (record.id, record.version)
        with self._lock:
            cached = self._heads.get(slot)
            if cached and cached[0] == key:
                self._heads.move_to_end(slot)
                return cached[1]
        served = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._drop(slot)
            self._heads[slot] = (key, served)
            self._bytes += getattr(served, "nbytes", 0)
            # NB: the newest head stays even if it alone is over the bound: it is being served.
            while len(self._heads) > 1 and (
                    len(self._heads) > self._capacity
                    or (self._max_bytes is not None and self._bytes > self._max_bytes)):
                self._drop(next(iter(self._heads)))
        return served

    def _drop(self, slot: tuple[str, int]) -> None:
        cached = self._heads.pop(slot, None)
        if cached:
            self._bytes -= getattr(cached[1], "nbytes", 0)

    def forget(self, classifier_id: str) -> None:
        """Drops every version's head of the classifier."""
        with self._lock:
            for slot in [slot for slot in self._heads if slot[0] == classifier_id]:
                self._drop(slot)

    @property
    def nbytes(self) -> int:
        """Memory of the cached heads' weights."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._heads)
