"""gunicorn's gthread worker, guarded against slow clients (`worker_class` in gunicorn.conf.py).

gthread gives a connection to a request thread as soon as its first bytes arrive, and the thread
then reads the headers and the body from a blocking socket with no time limit: eight clients
sending a header byte every two seconds held all eight threads, and /healthz timed out with them.
This worker:

- reads each request's line and headers in its event loop, without a thread, then its body up to
  `BUFFERED_BODY_BYTES` (all of a small one); a client whose headers take longer than
  `ClientLimits.header_timeout_s`, or whose body falls behind `ClientLimits.min_bytes_per_s`, is
  answered 408 and disconnected;
- so a request thread is taken only by a request that is all there, or whose body has come that
  far at a useful pace. The thread reads the rest under the same rule (past it, the app answers
  408), and a client that reads a response slower than that is disconnected;
- serves the probes (`PROBE_PATHS`) on a thread of their own: liveness is answered while every
  request thread is busy;
- at its connection limit, closes the connection that has waited longest for its request, so a
  flood of idle connections cannot lock new clients out;
- lingers over a closing connection (RFC 9112 9.6: drain what the client still sends, so the last
  response is not cut by a reset) in the event loop: gthread does it on the loop, blocking it for
  up to two seconds per client that does not close its end.

It takes the limits from the app (`app.extensions["headstart.clients"]`). TLS and HTTP/2
connections, which Headstart does not use (TLS ends in front of it), keep gthread's handling.
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import struct
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from functools import partial

from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from service.api.limits import ClientLimits, ClientTooSlow
from service.api.problems import problem_body

log = logging.getLogger(__name__)

#: Paths served on the probe thread (GET or HEAD): answered even when every thread is busy.
PROBE_PATHS = frozenset({b"/healthz", b"/startupz"})
#: A body up to this size is read whole by the event loop; of a larger one, this much first.
BUFFERED_BODY_BYTES = 256 * 1024
#: A request head larger than this goes to a thread as it is, where gunicorn's parser applies its
#: own limits (431), still under the minimum rate.
MAX_HEAD_BYTES = 64 * 1024
_RECV_BYTES = 64 * 1024
#: How often the event loop looks for clients that are too slow.
_SWEEP_EVERY_S = 0.25
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Content-Length values longer than this are left to the parser (int() refuses 4300 digits).
_MAX_LENGTH_DIGITS = 18
#: How long, and for how many bytes, a closing connection is drained (gunicorn's own values).
_LINGER_S = 2.0
_LINGER_BYTES = 64 * 1024


class GuardedSocket:
    """A client connection's socket as gunicorn's parser and response see it: first the bytes the
    event loop has already read, then the socket itself, at no less than the minimum rate."""

    def __init__(self, sock: socket.socket, limits: ClientLimits):
        self._sock = sock
        self.limits = limits
        self._pending = memoryview(b"")
        self._started = 0.0  # when the rate clock of the request being served started
        self._received = 0
        self._swallow_continue = False

    def __getattr__(self, name: str):  # everything not guarded is the socket's own
        return getattr(self._sock, name)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_available(self, size: int) -> bytes:
        """What the (non-blocking) socket holds: for the event loop, unguarded."""
        return self._sock.recv(size)

    def send_available(self, data: bytes) -> int:
        """Sends what the (non-blocking) socket takes now: for the event loop."""
        return self._sock.send(data)

    def hand_over(self, data: bytes, started: float, received: int, continue_sent: bool) -> None:
        """Gives a request to a thread: `data` read so far, the rate clock's start and the body
        bytes it has counted, and whether the loop already answered 100 Continue."""
        self._pending = memoryview(data)
        self._started, self._received = started, received
        self._swallow_continue = continue_sent

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending[:size], self._pending[size:]
            return bytes(chunk)
        left = self._started + self.limits.allowed_s(self._received) - time.monotonic()
        if left <= 0:
            raise ClientTooSlow(_too_slow(self.limits))
        with self._timeout(left):
            try:
                data = self._sock.recv(size, flags)
            except TimeoutError:
                raise ClientTooSlow(_too_slow(self.limits)) from None
        self._received += len(data)
        return data

    def send(self, data: bytes, flags: int = 0) -> int:
        if self._swallow_continue and bytes(data) == _CONTINUE:
            self._swallow_continue = False  # NB: the event loop has answered it already
            return len(data)
        self.sendall(data, flags)
        return len(data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        with self._timeout(self.limits.allowed_s(len(data))):
            try:
                self._sock.sendall(data, flags)
            except TimeoutError:
                # A client that does not read its response: reset the connection.
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                log.info("a client read its response slower than %d bytes/s: disconnected",
                         self.limits.min_bytes_per_s)
                raise ConnectionResetError(errno.ECONNRESET, "client too slow to read") from None

    @contextmanager
    def _timeout(self, seconds: float) -> Iterator[None]:
        """The socket's timeout for one call: `seconds`, or less if the caller set less."""
        prior = self._sock.gettimeout()
        self._sock.settimeout(seconds if not prior else min(prior, seconds))
        try:
            yield
        finally:
            self._sock.settimeout(prior)


class _Incoming:
    """A request the event loop is reading: its head, then the start of its body."""

    def __init__(self, data: bytes, now: float):
        self.data = bytearray(data)
        self.started = now
        self.head_end: int | None = None  # where the body starts in `data`, once known
        self.body_started = now
        self.body_wanted = 0
        self.continue_sent = False

    @property
    def body_received(self) -> int:
        return 0 if self.head_end is None else len(self.data) - self.head_end


class _Connection(TConn):
    """A guarded connection, whose graceful close lingers in the worker's event loop."""

    def __init__(self, worker: GuardedThreadWorker, *args):
        super().__init__(*args)
        self._worker = worker

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self._worker.linger(self.sock)
        else:
            super().close()


class GuardedThreadWorker(ThreadWorker):
    """gthread, with requests read by the event loop first (see the module's documentation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = ClientLimits()
        self.reading: dict[TConn, None] = {}  # in the order they started waiting: oldest first
        self.lingering: dict[GuardedSocket, list] = {}  # → [deadline, bytes drained]
        self.probe_pool: futures.ThreadPoolExecutor | None = None
        self._next_sweep = 0.0

    def init_process(self):
        self.probe_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        self.limits = getattr(self.wsgi, "extensions", {}).get("headstart.clients", self.limits)

    def accept(self, listener):
        """Accepts a connection and starts reading its request in the event loop."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        server = listener.getsockname()
        if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, client_addr) or \
                negotiation.upgrade_allowed(self.cfg, client_addr):
            client_sock.setblocking(True)
            super().enqueue_req(TConn(self.cfg, client_sock, client_addr, server))
            return
        self.enqueue_req(_Connection(self, self.cfg, GuardedSocket(client_sock, self.limits),
                                     client_addr, server))

    def enqueue_req(self, conn):
        """Every request of a guarded connection (new, kept alive, pipelined) is read here
        before a thread takes it."""
        if not isinstance(conn.sock, GuardedSocket):
            super().enqueue_req(conn)
            return
        # NB: a pipelined client's next request may already sit in the parser's buffer.
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.incoming = _Incoming(ahead, time.monotonic())
        if self._request_ready(conn):
            self._dispatch(conn)
            return
        conn.sock.setblocking(False)
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock) -> None:
        try:
            data = conn.sock.recv_available(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._stop_reading(conn)
            self._close(conn)
            return
        conn.incoming.data += data
        if self._request_ready(conn):
            self._stop_reading(conn)
            self._dispatch(conn)

    def _request_ready(self, conn) -> bool:
        """Whether the request read so far may go to a thread: its head is complete and its body
        is in, or in as far as `BUFFERED_BODY_BYTES`; or its head has grown too large."""
        incoming = conn.incoming
        if incoming.head_end is None:
            end = incoming.data.find(b"\r\n\r\n")
            if end < 0:
                return len(incoming.data) > MAX_HEAD_BYTES
            incoming.head_end = end + 4
            incoming.body_started = time.monotonic()
            length, expects_continue = _body_length(bytes(incoming.data[:end]))
            incoming.body_wanted = min(length, BUFFERED_BODY_BYTES)
            if expects_continue and incoming.body_received < incoming.body_wanted:
                # The client waits for this before it sends the body the loop waits for.
                try:
                    sent = conn.sock.send_available(_CONTINUE)
                except OSError:
                    sent = 0
                incoming.continue_sent = sent == len(_CONTINUE)
        return incoming.body_received >= incoming.body_wanted

    def _dispatch(self, conn) -> None:
        incoming, conn.incoming = conn.incoming, None
        started = incoming.body_started if incoming.head_end is not None else time.monotonic()
        conn.sock.hand_over(bytes(incoming.data), started, incoming.body_received,
                            incoming.continue_sent)
        conn.data_ready = True  # NB: gthread would otherwise wait for the socket to be readable
        pool = self.probe_pool if _is_probe(incoming.data) else self.tpool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(
            lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def linger(self, sock: GuardedSocket) -> None:
        """Closes a connection gracefully without blocking the loop: sends FIN now, then drains
        and closes it once the client closes its end, or after `_LINGER_S`."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._drain_lingering)
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = [time.monotonic() + _LINGER_S, 0]

    def _drain_lingering(self, sock: GuardedSocket) -> None:
        try:
            data = sock.recv_available(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        state = self.lingering[sock]
        state[1] += len(data)
        if not data or state[1] >= _LINGER_BYTES:
            self._end_lingering(sock)

    def _end_lingering(self, sock: GuardedSocket) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    def murder_pending(self):
        """gthread's sweep of idle connections, and this worker's of slow requests and of
        lingering closes."""
        super().murder_pending()
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        for sock in [sock for sock, (deadline, _) in self.lingering.items() if now > deadline]:
            self._end_lingering(sock)
        for conn in list(self.reading):
            incoming = conn.incoming
            if incoming.head_end is None:
                late = now - incoming.started > self.limits.header_timeout_s
                why = (f"the request line and headers did not arrive within "
                       f"{self.limits.header_timeout_s:g} s")
            else:
                late = now - incoming.body_started > self.limits.allowed_s(incoming.body_received)
                why = _too_slow(self.limits)
            if late:
                self._stop_reading(conn)
                self.log.info("request from %s cut off: %s", conn.client[0], why)
                if not incoming.data:  # NB: a connection that sent nothing is just closed
                    self._close(conn)
                    continue
                try:
                    conn.sock.send_available(_timeout_response(why))
                except OSError:
                    pass
                self._close(conn, graceful=True)

    def set_accept_enabled(self, enabled):
        # NB: at the connection limit, the connection waiting longest for its request makes room
        # (while stopping, the listener closes as gthread closes it).
        if not enabled and self.alive and self.reading:
            oldest = next(iter(self.reading))
            self.log.info("connection limit reached: closing the one from %s, waiting longest "
                          "for its request", oldest.client[0])
            self._stop_reading(oldest)
            self._close(oldest)
            return
        super().set_accept_enabled(enabled)

    def handle_quit(self, sig, frame):
        if self.probe_pool is not None:
            self.probe_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    def _stop_reading(self, conn) -> None:
        self.reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, conn, graceful: bool = False) -> None:
        self.nr_conns -= 1
        conn.close(graceful)


def _body_length(head: bytes) -> tuple[int, bool]:
    """The Content-Length of a request head, and whether it expects 100 Continue; 0 for a
    chunked body, or a head gunicorn's parser will refuse (which it then does, in a thread)."""
    lines = head.split(b"\r\n")
    lengths, chunked, expects_continue = [], False, False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return 0, False
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"expect":
            expects_continue = value.lower() == b"100-continue"
    if chunked or len(lengths) != 1 or not lengths[0].isdigit() or \
            len(lengths[0]) > _MAX_LENGTH_DIGITS:
        return 0, False
    return int(lengths[0]), expects_continue and lines[0].endswith(b" HTTP/1.1")


def _is_probe(data: bytearray) -> bool:
    method, _, rest = bytes(data[:256]).partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    return method in (b"GET", b"HEAD") and target in PROBE_PATHS


def _too_slow(limits: ClientLimits) -> str:
    return (f"the request body arrived slower than {limits.min_bytes_per_s} bytes/s after the "
            f"first {limits.header_timeout_s:g} s")


def _timeout_response(detail: str) -> bytes:
    body = json.dumps(problem_body(408, "Request Timeout", detail)).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/problem+json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)
