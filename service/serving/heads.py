"""The per-process LRU cache of loaded heads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from service.storage.records import ClassifierRecord


class HeadCache:
    """Least-recently-used heads, keyed by classifier id and version, and valid while the
    version's record names the same committed run."""

    def __init__(self, load: Callable[[ClassifierRecord], "keras.Model"],  # noqa: F821
                 capacity: int):
        self._load = load
        self._capacity = capacity
        self._heads: OrderedDict[tuple[str, int], tuple[object, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ClassifierRecord):
        key = (record.id, record.version)
        with self._lock:
            cached = self._heads.get(key)
            if cached and cached[0] == record.run:
                self._heads.move_to_end(key)
                return cached[1]
        head = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._heads[key] = (record.run, head)
            self._heads.move_to_end(key)
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
