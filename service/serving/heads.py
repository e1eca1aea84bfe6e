"""The per-process LRU cache of loaded heads, and what it holds: a served head."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.storage.records import ClassifierRecord

if TYPE_CHECKING:  # NB: no TensorFlow at import
    import keras

    from models.trust import Trust


@dataclass(frozen=True)
class ServedHead:
    """What predict needs of one committed head, loaded from its one stored file.

    Attributes:
        head: the Keras head (features → softmax probabilities).
        trust: calibration, default threshold and OOD detector; None for a head stored before
            them (temperature 1, nothing rejected unless a request sets a threshold).
    """

    head: keras.Model
    trust: Trust | None = None


def load_served_head(record: ClassifierRecord, data: bytes, feature_dim: int) -> ServedHead:
    """A record's committed head from its stored file (`ClassifierStore.load_head`)."""
    from models import trust  # NB: Keras (models.heads), after fork
    from models.heads import HeadSpec, load_head, stored_arrays

    head = load_head(HeadSpec(**record.head.model_dump()), feature_dim, len(record.labels), data)
    return ServedHead(head, trust.from_arrays(stored_arrays(data, trust.PREFIX)))


class HeadCache:
    """Least-recently-used served heads, one slot per classifier version, valid while the
    version's record names the same committed run (not the record's update time, which every
    progress write of a later training run changes)."""

    def __init__(self, load: Callable[[ClassifierRecord], ServedHead], capacity: int):
        self._load = load
        self._capacity = capacity
        self._heads: OrderedDict[tuple[str, int], tuple[Any, ServedHead]] = OrderedDict()
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
        head = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._heads[slot] = (key, head)
            self._heads.move_to_end(slot)
            while len(self._heads) > self._capacity:
                self._heads.popitem(last=False)
        return head

    def forget(self, classifier_id: str) -> None:
        """Drops every version's head of the classifier."""
        with self._lock:
            for key in [key for key in self._heads if key[0] == classifier_id]:
                del self._heads[key]

    def __len__(self) -> int:
        return len(self._heads)
