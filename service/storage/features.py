"""A classifier's feature cache in the store: backbone features by (image, view) key, kept for
its next training run (a requeued job, a new version), so that run passes only the images it has
not seen through the backbone.

One object per classifier (`ClassifierStore.save_features`: `classifiers/{id}/features.npz`,
so deleting the classifier removes it): an `.npz` without pickles holding `keys` (uint8
(rows, 32): `models.features.view_keys`) and `rows` (float32 (rows, feature_dim)), newest
first. A run reads it once, before extraction, and writes it once, after, by a compare-and-set
on the version it read: of two runs writing at once, the second reads the first's object again
and merges, so neither's rows are lost and no object is ever half written.

Bounded: an object holds at most `max_bytes` of keys and rows. Past it, the newest rows are
kept — this run's computed rows, then the rows it read from the cache, then the older ones —
and the rest is dropped (the summary says how many). A cache that fails (the store is down) is
only a cache: the run goes on, and the summary says why nothing was stored.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np

from service.errors import NotFound, ServiceUnavailable
from service.storage.classifiers import ClassifierStore, PreconditionFailed

log = logging.getLogger(__name__)

SCHEMA = 1
KEY_BYTES = 32  # models.features.KEY_BYTES; storage imports nothing of models
#: Writes tried (each after merging with the other run's object) before a run stops storing.
WRITE_ATTEMPTS = 3


def encode(keys: np.ndarray, rows: np.ndarray) -> bytes:
    """The stored object of uint8 `keys` (n, KEY_BYTES) and float32 `rows` (n, dim)."""
    buffer = io.BytesIO()
    np.savez(buffer, schema=np.int64(SCHEMA), keys=keys.astype(np.uint8, copy=False),
             rows=rows.astype(np.float32, copy=False))
    return buffer.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(keys, rows) of a stored object; empty arrays for one of another schema or unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            if int(stored["schema"]) != SCHEMA:
                raise ValueError(f"schema {int(stored['schema'])}")
            keys, rows = stored["keys"], stored["rows"]
        if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or rows.ndim != 2 or \
                len(rows) != len(keys):
            raise ValueError(f"shapes {keys.shape} and {rows.shape}")
    except (OSError, KeyError, ValueError) as error:
        log.warning("feature cache object ignored (%s): it is rebuilt", error)
        return np.zeros((0, KEY_BYTES), np.uint8), np.zeros((0, 0), np.float32)
    return keys, rows


class StoredFeatureCache:
    """`models.features.FeatureCache` over one classifier's object in the store.

    Args:
        max_bytes: the bound on the object's keys and rows (0: nothing is read or stored).
    """

    def __init__(self, store: ClassifierStore, classifier_id: str, max_bytes: int):
        self.store, self.classifier_id, self.max_bytes = store, classifier_id, max_bytes
        self._read: tuple[np.ndarray, np.ndarray, str | None] | None = None
        self._hits: list[bytes] = []
        self.summary: dict = {"max_bytes": max_bytes, "requested": 0, "from_cache": 0,
                              "computed": 0, "stored": 0, "dropped": 0, "bytes": 0,
                              "note": None}

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        self.summary["requested"] += len(keys)
        if self.max_bytes <= 0:
            self.summary["note"] = "the feature cache is off (HEADSTART_FEATURE_CACHE_BYTES=0)"
            return {}
        stored_keys, rows, _ = self._load()
        index = {key.tobytes(): i for i, key in enumerate(stored_keys)}
        found = {key: rows[index[key]] for key in keys if key in index}
        self._hits = list(found)
        self.summary["from_cache"] += len(found)
        return found

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        self.summary["computed"] += len(keys)
        if self.max_bytes <= 0:
            return
        new_keys = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES)
        for _ in range(WRITE_ATTEMPTS):
            old_keys, old_rows, tag = self._load()
            merged_keys, merged_rows, dropped = self._merge(new_keys, np.asarray(rows, np.float32),
                                                            old_keys, old_rows)
            try:
                self.store.save_features(self.classifier_id, encode(merged_keys, merged_rows), tag)
            except PreconditionFailed:  # another run wrote it meanwhile: merge with theirs
                self._read = None
                continue
            except (NotFound, ServiceUnavailable) as error:
                self._give_up(f"not stored: {getattr(error, 'detail', error)}")
                return
            self.summary.update(stored=len(merged_keys), dropped=dropped,
                                bytes=merged_keys.nbytes + merged_rows.nbytes)
            if dropped:
                self.summary["note"] = (f"{dropped} rows over HEADSTART_FEATURE_CACHE_BYTES "
                                        f"({self.max_bytes} bytes) were not stored: the newest "
                                        "are kept")
            return
        self._give_up(f"not stored: {WRITE_ATTEMPTS} runs wrote it at the same time")

    def _give_up(self, note: str) -> None:
        log.warning("classifier %s: feature cache %s", self.classifier_id, note)
        self.summary["note"] = note

    def _load(self) -> tuple[np.ndarray, np.ndarray, str | None]:
        """The object as last read (read once; again after a conflicting write)."""
        if self._read is None:
            try:
                stored = self.store.load_features(self.classifier_id)
            except (NotFound, ServiceUnavailable) as error:
                log.warning("classifier %s: feature cache not read: %s", self.classifier_id,
                            getattr(error, "detail", error))
                self.summary["note"] = f"not read: {getattr(error, 'detail', error)}"
                stored = None
            if stored is None:
                self._read = (np.zeros((0, KEY_BYTES), np.uint8), np.zeros((0, 0), np.float32),
                              None)
            else:
                self._read = (*decode(stored[0]), stored[1])
            keys, rows, _ = self._read
            self.summary.update(stored=len(keys), bytes=keys.nbytes + rows.nbytes)
        return self._read

    def _merge(self, new_keys: np.ndarray, new_rows: np.ndarray, old_keys: np.ndarray,
               old_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """New rows first, then the old rows this run read, then the other old rows (each
        key once); cut to the bound. Returns (keys, rows, rows dropped)."""
        if old_rows.shape[1:] != new_rows.shape[1:]:  # another feature size: nothing to keep
            old_keys, old_rows = old_keys[:0], np.zeros((0, *new_rows.shape[1:]), np.float32)
        seen = {key.tobytes() for key in new_keys}
        hits = set(self._hits) - seen
        old = [key.tobytes() for key in old_keys]
        order = [i for i, key in enumerate(old) if key in hits] + \
                [i for i, key in enumerate(old) if key not in hits and key not in seen]
        keys = np.concatenate([new_keys, old_keys[order]])
        rows = np.concatenate([new_rows, old_rows[order]])
        capacity = self.max_bytes // (KEY_BYTES + rows.itemsize * int(np.prod(rows.shape[1:])))
        return keys[:capacity], rows[:capacity], max(0, len(keys) - capacity)
