"""`make run-cluster`: Headstart's distributed topology on one machine, from real parts.

    Redis (the broker)                      unless HEADSTART_QUEUE names one
    SeaweedFS's S3 on a fresh data folder   unless HEADSTART_STORE names a store
    two API processes (gunicorn)            on $PORT and $PORT+1
    two training workers                    python -m service.workers.worker

Every other HEADSTART_* variable passes through, as with `make run`. Output is one stream, each
line prefixed by the process it came from. A worker that exits is restarted after a pause, as
Kubernetes would; an API that exits, Ctrl-C or SIGTERM stops everything. Where everything is
(ports, pids, data) is written to `{data folder}/cluster.json`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.localservers import LocalServer, RedisServer, SeaweedS3Server, free_port

log = logging.getLogger("tools.cluster")

BUCKET = "headstart"
S3_ACCESS_KEY, S3_SECRET_KEY = "headstart", "headstart-local-secret"
WORKERS = 2
RESTART_PAUSE_S = 2.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Child:
    """One supervised process: an API or a worker."""

    name: str
    command: list[str]
    env: dict[str, str]
    restart: bool
    process: subprocess.Popen | None = None
    started: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        threading.Thread(target=_relay, args=(self.name, self.process.stdout), daemon=True).start()


def _relay(name: str, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
        sys.stdout.flush()


class Cluster:
    def __init__(self, port: int, data: Path, env: dict[str, str]):
        self.port, self.data = port, data
        self.env = dict(env)
        self.servers: list[LocalServer] = []
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if "HEADSTART_QUEUE" not in self.env:
            redis = RedisServer(self._free_port(), self.data / "redis")
            self._serve(redis)
            self.env["HEADSTART_QUEUE"] = redis.url
        if "HEADSTART_STORE" not in self.env:
            s3 = SeaweedS3Server(self._free_port(), self.data / "s3", S3_ACCESS_KEY,
                                 S3_SECRET_KEY, buckets=[BUCKET])
            self._serve(s3)
            self.env.update(HEADSTART_STORE=f"s3://{BUCKET}/",
                            HEADSTART_S3_ENDPOINT_URL=s3.endpoint_url,
                            HEADSTART_S3_ADDRESSING_STYLE="path", HEADSTART_S3_REGION="us-east-1",
                            HEADSTART_S3_ACCESS_KEY_ID=S3_ACCESS_KEY,
                            HEADSTART_S3_SECRET_ACCESS_KEY=S3_SECRET_KEY)
        python = sys.executable
        for index in range(2):
            self.children.append(Child(
                f"api-{index + 1}",
                [python, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
                {**self.env, "PORT": str(self.port + index)}, restart=False))
        for index in range(WORKERS):
            self.children.append(Child(f"worker-{index + 1}", [python, "-m", "service.workers.worker"],
                                       self.env, restart=True))
        for child in self.children:
            child.start()
        self._write_state()
        log.info("APIs on http://127.0.0.1:%d and http://127.0.0.1:%d; store %s; queue %s; "
                 "data in %s", self.port, self.port + 1, self.env["HEADSTART_STORE"],
                 self.env["HEADSTART_QUEUE"], self.data)

    def _free_port(self) -> int:
        """A free port that is not one the APIs are about to take."""
        while (port := free_port()) in (self.port, self.port + 1):
            pass
        return port

    def _serve(self, server: LocalServer) -> None:
        server.start()
        self.servers.append(server)
        log.info("%s on port %d (log %s)", server.name, server.port, server.log_path)

    def supervise(self) -> int:
        """Until stopped: restarts workers that exit; stops everything when an API exits."""
        while not self.stopping.wait(0.5):
            for child in self.children:
                status = child.process.poll()
                if status is None:
                    continue
                if not child.restart:
                    log.error("%s exited with status %s; stopping the cluster", child.name, status)
                    return status or 1
                if time.monotonic() - child.started >= RESTART_PAUSE_S:
                    log.warning("%s exited with status %s; restarting it", child.name, status)
                    child.start()
                    self._write_state()
        return 0

    def stop(self) -> None:
        """SIGTERM to APIs and workers (workers finish their job: warm shutdown), SIGKILL after
        30 s, then the servers."""
        self.stopping.set()
        running = [child.process for child in self.children
                   if child.process and child.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in reversed(self.servers):
            server.stop()

    def _write_state(self) -> None:
        state = {
            "apis": [f"http://127.0.0.1:{self.port + index}" for index in range(2)],
            "store": self.env["HEADSTART_STORE"],
            "queue": self.env["HEADSTART_QUEUE"],
            "s3_endpoint_url": self.env.get("HEADSTART_S3_ENDPOINT_URL"),
            "servers": {server.name: {"port": server.port, "pid": server.pid,
                                      "data": str(server.data_dir)} for server in self.servers},
            "processes": {child.name: child.process.pid for child in self.children},
        }
        temp = self.data / "cluster.json.tmp"
        temp.write_text(json.dumps(state, indent=2))
        temp.replace(self.data / "cluster.json")


def _stop_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, so killing `make` stops the cluster."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[cluster] %(message)s", stream=sys.stdout)
    _stop_with_parent()
    port = int(os.environ.get("PORT", "8000"))
    data = Path(os.environ.get("HEADSTART_CLUSTER_DIR") or
                f"var/cluster/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if data.exists() and any(data.iterdir()):
        print(f"{data} is not empty; the cluster starts on a fresh data folder", file=sys.stderr)
        return 2
    cluster = Cluster(port, data, {key: value for key, value in os.environ.items()})

    def stop_on_signal(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        cluster.stopping.set()

    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        cluster.start()
        status = cluster.supervise()
    finally:
        cluster.stop()
    log.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
