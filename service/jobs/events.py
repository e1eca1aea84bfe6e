"""Server-sent events of one classifier: what changes in its stored record, as it changes.

`stream()` is a plain generator over a `read_record()` callable and a clock: it polls the record,
turns each change into events, and knows nothing of Flask or of the store. The record is read
from the store, so a stream works behind any API replica, and so does its resumption.

Events, in the order they are sent for one reading of the record:

    status    the status changed (and the first event of a stream), or `refining` did (a ready
              classifier whose run still trains a later stage): the resource's key fields
    version   the served version changed (only for records that have versions)
    epoch     one learning-curve row of the fit now running, each row once
    progress  the progress changed: stage, images done and total, epoch, and the last row's metrics
    done      the classifier is finished (ready with nothing left to train: not refining, no
              progress; failed, cancelled) or was deleted; the stream then ends

Event ids are cursors. An id says everything the client has been sent, so that any replica can
resume from it with nothing but the stored record and send no event twice:

    {seq}.{index}.{status}.{version}.{progress:08x}.{fit:08x}.{rows}.{done}

`seq` is the record's `updated_at` in milliseconds (never less than the previous id's) and `index`
the event's place among those sent for that record: together they make ids increase. The rest is
the state sent so far: the status (`ready_refining` while refining), the version (`-` without one), a checksum of the progress
(without its rows), a checksum of the running fit's first row (another fit has another), how
many of that fit's rows were sent, and 1 once `done` was sent. Clients treat ids as opaque.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from service.errors import BadRequest, NotFound, ServiceUnavailable

#: What a refused stream's Retry-After says, in seconds.
RETRY_AFTER_S = 5

#: How long a browser's EventSource waits before it reconnects, in milliseconds.
RECONNECT_MS = 1000
#: Fields of the classifier resource that a `status` event carries, where the record has them.
STATUS_FIELDS = ("id", "name", "status", "labels", "updated_at", "metrics", "error", "version",
                 "aliases", "refining")
ACTIVE = ("queued", "training")
_CURSOR = re.compile(r"(\d{1,16})\.(\d{1,9})\.([a-z_]{1,32})\.(-|\d{1,9})\.([0-9a-f]{8})"
                     r"\.([0-9a-f]{8})\.(\d{1,9})\.([01])")


class RecordUnavailable(Exception):
    """`read_record` could not read the record this time (the store is down); try again later."""


@dataclass(frozen=True)
class Cursor:
    """What a client has been sent so far; every event's id encodes the cursor after it."""

    seq: int
    index: int
    status: str
    version: int | None
    progress: int
    fit: int
    rows: int
    done: bool = False

    def encode(self) -> str:
        version = "-" if self.version is None else str(self.version)
        return (f"{self.seq}.{self.index}.{self.status}.{version}.{self.progress:08x}."
                f"{self.fit:08x}.{self.rows}.{int(self.done)}")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises ValueError for anything that is not an id this module made."""
        match = _CURSOR.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not an event id of this server: {text[:100]!r}")
        seq, index, status, version, progress, fit, rows, done = match.groups()
        return cls(int(seq), int(index), status, None if version == "-" else int(version),
                   int(progress, 16), int(fit, 16), int(rows), done == "1")


@dataclass(frozen=True)
class Event:
    """One server-sent event: `kind` is its `event:` field, `data` its JSON `data:`."""

    kind: str
    data: dict[str, Any]
    id: str

    def encode(self) -> str:
        data = json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {data}\n\n"


def changes(record: dict[str, Any] | None, cursor: Cursor | None,
            classifier_id: str) -> tuple[list[Event], Cursor, bool]:
    """The events that bring a client at `cursor` up to date with `record`.

    Args:
        record: the classifier resource as JSON-ready data, or None once it was deleted.
        cursor: what the client has been sent; None for a new stream.

    Returns:
        (events, the cursor after them, whether the classifier is finished: no more events).
    """
    sent: list[Event] = []
    seq = max(cursor.seq if cursor else 0, _millis(record["updated_at"]) if record else 0)
    index = cursor.index + 1 if cursor and cursor.seq == seq else 0
    state = cursor or Cursor(seq, index, "", None, 0, 0, 0)

    def send(kind: str, data: dict[str, Any], **changed) -> None:
        nonlocal state, index
        state = replace(state, seq=seq, index=index, **changed)
        sent.append(Event(kind, data, state.encode()))
        index += 1

    if record is None:
        send("done", {"id": classifier_id, "status": "deleted"}, status="deleted", done=True)
        return sent, state, True
    status, version = record["status"], record.get("version")
    refining = bool(record.get("refining"))
    if cursor is None or _status_key(status, refining) != cursor.status:
        send("status", {name: record[name] for name in STATUS_FIELDS if name in record},
             status=_status_key(status, refining))
    if version is not None and version != state.version:
        send("version", {name: record.get(name) for name in ("version", "versions", "aliases")},
             version=version)
    progress = dict(record.get("progress") or {})
    rows = progress.pop("history", None) or []
    fit = _checksum(rows[0]) if rows else 0
    done = state.rows if fit == state.fit else 0
    for number, row in enumerate(rows[done:], start=done + 1):
        send("epoch", row, fit=fit, rows=number)
    state = replace(state, fit=fit, rows=max(done, len(rows)))
    digest = _checksum(progress) if progress else 0
    if progress and digest != state.progress:
        last = {name: value for name, value in rows[-1].items() if name != "epoch"} \
            if rows else None
        send("progress", {**progress, "metrics": last}, progress=digest)
    finished = status not in ACTIVE and not progress and not refining
    state = replace(state, progress=digest, done=state.done and finished)
    if finished and not state.done:
        send("done", {name: record.get(name) for name in ("id", "status", "metrics", "error",
                                                          "version")}, done=True)
    return sent, state, finished


def stream(read_record: Callable[[], dict[str, Any] | None], classifier_id: str, *,
           cursor: Cursor | None = None, first: dict[str, Any] | None = None,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.5,
           keepalive_s: float = 15.0, max_s: float = 300.0,
           stopping: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The text of an event stream: events as the record changes, keep-alive comments, the end.

    Args:
        read_record: the classifier resource as JSON-ready data, None once deleted; raises
            RecordUnavailable when it cannot read it this time.
        cursor: resume after this cursor (the Last-Event-ID), sending nothing already sent.
        first: the record as already read (by the caller, to answer 404 before streaming).
        poll_s: how often the record is read; keepalive_s: longest silence before a `:` comment;
        max_s: the stream ends after this long, and the client reconnects with its last id.
        stopping: True ends the stream at its next reading (the server is shutting down).
    """
    started = last_sent = clock()
    yield f"retry: {RECONNECT_MS}\n\n"
    record: Any = first if first is not None else _UNREAD
    while True:
        if record is _UNREAD:
            with suppress(RecordUnavailable):
                record = read_record()
        if record is not _UNREAD:
            events, cursor, finished = changes(record, cursor, classifier_id)
            for event in events:
                yield event.encode()
            if events:
                last_sent = clock()
            if finished:
                return
        now = clock()
        if now - started >= max_s:
            yield ": the stream reached its time limit; reconnect with Last-Event-ID\n\n"
            return
        if stopping():
            yield ": the server is shutting down; reconnect with Last-Event-ID\n\n"
            return
        if now - last_sent >= keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = now
        sleep(max(0.0, min(poll_s, started + max_s - now)))
        record = _UNREAD


_UNREAD = object()


def _status_key(status: str, refining: bool) -> str:
    """The status as a cursor keeps it: refining is a state of its own."""
    return f"{status}_refining" if refining else status


def _millis(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


def _checksum(value: Any) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


# ---------------------------------------------------------------- bounds and wiring


class StreamSlots:
    """At most `limit` event streams are open at once in this process: each holds a thread.
    `shut_down()` ends them all at their next reading, and refuses new ones."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the event stream limit must be at least 1. Received: limit={limit}")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._stopping = threading.Event()

    def shut_down(self) -> None:
        """Safe from a signal handler: it only sets a flag."""
        self._stopping.set()

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def take(self) -> Callable[[], None]:
        """Takes a slot and returns the function that gives it back (safe to call twice).

        Raises:
            ServiceUnavailable: every slot is taken (with a Retry-After header).
        """
        if self.stopping():
            raise ServiceUnavailable("this server is shutting down; try another, or again in "
                                     f"{RETRY_AFTER_S} s",
                                     headers={"Retry-After": str(RETRY_AFTER_S)})
        if not self._slots.acquire(blocking=False):
            raise ServiceUnavailable(
                f"{self.limit} event streams are already open on this server; try again in "
                f"{RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._slots.release()
        return release


class EventStream:
    """The response body of an event stream. The WSGI server calls `close()` when the stream
    ends or the client goes away, even if it never started iterating: that frees the slot."""

    def __init__(self, text: Iterator[str], release: Callable[[], None]):
        self._text, self._release = text, release

    def __iter__(self) -> Iterator[str]:
        return self._text

    def close(self) -> None:
        try:
            self._text.close()
        finally:
            self._release()


def follow(resource: Callable[[], dict[str, Any]], settings, slots: StreamSlots,
           classifier_id: str, last_event_id: str | None) -> EventStream | None:
    """Opens the event stream of a classifier, or None when a resuming client has already been
    sent everything there will ever be (its last event was `done`).

    Raises:
        BadRequest: `last_event_id` is not an id of this server.
        ServiceUnavailable: too many streams are open (503 with Retry-After).
        NotFound: no such classifier (or it was deleted).
    """
    try:
        cursor = Cursor.decode(last_event_id) if last_event_id else None
    except ValueError as error:
        raise BadRequest(f"Last-Event-ID: {error}; send an id this server sent, or none") from None
    release = slots.take()
    try:
        first = resource()
        events, _, finished = changes(first, cursor, classifier_id)
        if finished and not events:
            release()
            return None
    except BaseException:
        release()
        raise

    def read() -> dict[str, Any] | None:
        try:
            return resource()
        except NotFound:
            return None
        except ServiceUnavailable as error:
            raise RecordUnavailable(error.detail) from None

    text = stream(read, classifier_id, cursor=cursor, first=first, poll_s=settings.event_poll_s,
                  keepalive_s=settings.event_keepalive_s, max_s=settings.event_stream_max_s,
                  stopping=slots.stopping)
    return EventStream(text, release)
