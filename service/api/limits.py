"""Bounds on how much work one process takes on at once, so a flood is refused, not queued, and
on how slowly a client may talk to it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.errors import ServiceUnavailable

#: What a refused client is told to wait before trying again, in seconds.
RETRY_AFTER_S = 5


class UploadLimiter:
    """At most `limit` dataset uploads are checked at once in this process.

    Checking an upload holds a web thread, memory for its decoded images and a temporary file
    for as long as it takes; beyond the limit a new one is refused at once with a 503 (once its
    body is in: receiving it is bounded by `ClientLimits`), and the other threads stay free for
    predictions and reads.
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


@dataclass(frozen=True)
class ClientLimits:
    """How slowly a client may send a request or read a response before it is cut off.

    A request's line and headers must arrive within `header_timeout_s`. Its body, and each
    response write, must then keep up `min_bytes_per_s` on average after a grace of
    `header_timeout_s`: n bytes may take `allowed_s(n)`. Enforced by the gunicorn worker
    (`service.api.gthread`), which takes these from the app.
    """

    header_timeout_s: float = 10.0
    min_bytes_per_s: int = 32 * 1024

    def allowed_s(self, count: int) -> float:
        """Seconds `count` bytes may take, grace included."""
        return self.header_timeout_s + count / self.min_bytes_per_s


class ClientTooSlow(TimeoutError):
    """A client sent its request slower than `ClientLimits` allow (a TimeoutError, as a socket
    timeout is, so that gunicorn's drain of an unread body stops on it)."""
