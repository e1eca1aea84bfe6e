"""Bounds on how much work one process takes on at once, so a flood is refused, not queued."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import ServiceUnavailable

#: What a refused client is told to wait before trying again, in seconds.
RETRY_AFTER_S = 5


class UploadLimiter:
    """At most `limit` dataset uploads are received and checked at once in this process.

    An upload holds a web thread, memory for its decoded images and a temporary file for as long
    as it takes; beyond the limit a new one is refused at once with a 503, before its body is
    read, and the other threads stay free for predictions and reads.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the upload limit must be at least 1. Received: limit={limit}")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Holds one upload slot for the duration of the block.

        Raises:
            ServiceUnavailable: every slot is taken (with a Retry-After header).
        """
        if not self._slots.acquire(blocking=False):
            raise ServiceUnavailable(
                f"{self.limit} dataset uploads are already being processed by this server; "
                f"try again in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            yield
        finally:
            self._slots.release()
