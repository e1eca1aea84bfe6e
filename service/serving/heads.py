"""The per-process LRU cache of loaded heads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from service.storage.records import ClassifierRecord


class HeadCache:
    """Least-recently-used heads, keyed by classifier id and the record's `run` (the committed
    head): progress writes while a classifier refines change `updated_at`, not the head."""

    def __init__(self, load: Callable[[ClassifierRecord], "keras.Model"],  # noqa: F821
                 capacity: int):
        self._load = load
        self._capacity = capacity
        self._heads: OrderedDict[str, tuple[object, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ClassifierRecord):
        with self._lock:
            cached = self._heads.get(record.id)
            if cached and cached[0] == record.run:
                self._heads.move_to_end(record.id)
                return cached[1]
        head = self._load(record)  # outside the lock: a slow store read blocks no other head
        with self._lock:
            self._heads[record.id] = (record.run, head)
            self._heads.move_to_end(record.id)
            while len(self._heads) > self._capacity:
                self._heads.popitem(last=False)
        return head

    def forget(self, classifier_id: str) -> None:
        with self._lock:
            self._heads.pop(classifier_id, None)

    def __len__(self) -> int:
        return len(self._heads)
