"""Integration: the distributed topology `make run-cluster` starts, from real parts.

Redis, SeaweedFS's S3 gateway, two gunicorn APIs and two Celery training workers, launched by
`python -m tools.cluster` exactly as `make run-cluster` does (random weights, 32 px). The tests
read the job bookkeeping straight from the bucket, kill workers and the S3 server, and check the
lifecycle promises: a lost worker's job is re-run or failed within 2 minutes, a duplicate
delivery runs once, DELETE stops a running job, SIGTERM lets a job finish.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.localservers import SeaweedS3Server, free_port, redis_server_program, weed_program
from tests.helpers import COLOURS, call, dataset_zip, image_bytes, multipart, stop

ROOT = Path(__file__).resolve().parents[1]
LEASE_SECONDS = 6
LOST_WORKER_BOUND_S = 120  # the promise: re-run or failed within 2 minutes
SMALL = {"max_epochs": 20, "augmentation": {"views": 1}}
# Long enough (~15 s on two cores) to be caught mid-run: many views, no early stop, and a fixed
# Adam-trained head, so that the first (preview) stage trains for seconds too.
LONG = {"max_epochs": 150, "patience": 150, "augmentation": {"views": 6},
        "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}


def _missing_servers() -> str | None:
    try:
        weed_program()
        redis_server_program()
    except FileNotFoundError as error:
        return str(error)
    return None


def _free_port_pair() -> int:
    """A free port whose successor is free too: the APIs listen on $PORT and $PORT+1."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := _missing_servers():
        if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
            pytest.fail(f"integration servers are required here: {reason}")
        pytest.skip(f"integration tests need Redis and SeaweedFS: {reason}")
    tmp = tmp_path_factory.mktemp("cluster")
    port = _free_port_pair()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HEADSTART_")}
    env.update(PORT=str(port), HEADSTART_CLUSTER_DIR=str(tmp / "data"),
               HEADSTART_BACKBONE_WEIGHTS="random", HEADSTART_IMAGE_SIZE="32",
               HEADSTART_WEIGHTS_CACHE=str(tmp / "cache"),
               HEADSTART_LEASE_SECONDS=str(LEASE_SECONDS))
    log_path = tmp / "cluster.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tools.cluster"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    running = Cluster(process, tmp / "data", log_path)
    try:
        running.wait_ready()
        yield running
    finally:
        stop(process)
        running.close()


class Cluster:
    def __init__(self, process, data: Path, log_path: Path):
        self.process, self.data, self.log_path = process, data, log_path
        self.state: dict = {}
        self.s3 = None
        self.extra_servers: list = []

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the cluster exited:\n{self.log()[-5000:]}")
            if (self.data / "cluster.json").is_file():
                self.state = json.loads((self.data / "cluster.json").read_text())
                if all(_ready(api) for api in self.state["apis"]):
                    break
            assert time.monotonic() < deadline, f"not ready:\n{self.log()[-5000:]}"
            time.sleep(0.5)
        import boto3
        from botocore.config import Config

        from tools.cluster import S3_ACCESS_KEY, S3_SECRET_KEY

        self.s3 = boto3.client(
            "s3", endpoint_url=self.state["s3_endpoint_url"], region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def close(self) -> None:
        for server in self.extra_servers:
            server.stop()
        if self.s3 is not None:
            self.s3.close()

    @property
    def apis(self) -> list[str]:
        return self.state["apis"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record(self, classifier_id: str) -> dict:
        """The stored record, with the bookkeeping the API does not show (lease, attempts, run)."""
        body = self.s3.get_object(Bucket="headstart",
                                  Key=f"classifiers/{classifier_id}/record.json")["Body"]
        return json.loads(body.read())

    def keys(self, classifier_id: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket="headstart", Prefix=f"classifiers/{classifier_id}/")
        return sorted(item["Key"] for item in listing.get("Contents", []))


def _ready(api: str) -> bool:
    try:
        return call("GET", api + "/readyz", timeout=5)[0] == 200
    except OSError:
        return False


def create(api: str, options: dict, per_label: int = 8) -> str:
    body, content_type = multipart({"dataset": [("toys.zip", dataset_zip(per_label))],
                                    "options": json.dumps(options)})
    status, _, created = call("POST", api + "/v1/classifiers", body, content_type)
    assert status == 202, created
    return created["id"]


def wait_for(api: str, classifier_id: str, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, _, resource = call("GET", f"{api}/v1/classifiers/{classifier_id}")
        if status == 200 and done(resource):
            return resource
        assert time.monotonic() < deadline, resource
        time.sleep(0.2)


def finished(resource: dict) -> bool:
    """The run has ended: no longer queued or training, nor ready and refining."""
    return resource["status"] not in ("queued", "training") and not resource["refining"]


def refining(resource: dict) -> bool:
    """Ready on a committed stage while the run trains the next one."""
    return resource["status"] == "ready" and resource["refining"]


def well_underway(resource: dict) -> bool:
    """Training, past the first progress write (so a lease and a worker are on record)."""
    progress = resource.get("progress") or {}
    return resource["status"] == "training" and progress.get("stage") == "training"


def owner_pid(cluster: Cluster, classifier_id: str) -> int:
    return int(cluster.record(classifier_id)["lease"]["owner"].split(":")[1])


def predict(api: str, classifier_id: str) -> dict:
    body, content_type = multipart({"image": [
        ("a.png", image_bytes(COLOURS["red"], seed=71)),
        ("b.png", image_bytes(COLOURS["blue"], seed=72))]})
    status, _, predicted = call("POST", f"{api}/v1/classifiers/{classifier_id}/predict?top_k=2",
                                body, content_type)
    assert status == 200, predicted
    return predicted


def test_created_through_one_api_ready_and_identical_through_the_other(cluster):
    first, second = cluster.apis
    classifier_id = create(first, SMALL)
    resource = wait_for(second, classifier_id, finished, 120)
    assert resource["status"] == "ready", resource
    assert predict(first, classifier_id) == predict(second, classifier_id)
    status, _, report = call("GET", f"{second}/v1/classifiers/{classifier_id}/report")
    assert status == 200 and report["device"]  # the worker names the device it trained on
    metrics = call_text(second + "/metrics")
    assert "headstart_queue_depth " in metrics
    assert _sample(metrics, "headstart_training_job_seconds_count") >= 1


def call_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def _sample(metrics: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith(name + " "))


def test_the_same_task_delivered_twice_runs_once(cluster):
    from service.workers.broker import TASK_NAME, celery_app
    from service.config import Settings

    publisher = celery_app(Settings(queue=cluster.state["queue"]))
    api = cluster.apis[0]
    classifier_id = create(api, SMALL)
    publisher.send_task(TASK_NAME, args=[classifier_id])  # a redelivery, while it runs
    resource = wait_for(api, classifier_id, finished, 120)
    assert resource["status"] == "ready", resource
    record = cluster.record(classifier_id)
    assert record["attempts"] == 1
    heads = [key for key in cluster.keys(classifier_id) if "/heads/" in key]
    assert f"classifiers/{classifier_id}/heads/{record['run']}.npz" in heads
    run = record["run"].rsplit("-", 1)[0]  # its stages are {run}-{stage}
    assert all(key.rsplit("/", 1)[1].startswith(f"{run}-") for key in heads), heads

    publisher.send_task(TASK_NAME, args=[classifier_id])  # and one after it finished
    time.sleep(3)
    assert cluster.record(classifier_id) == record
    assert f"job {classifier_id}: classifier is ready, nothing to do" in cluster.log()


def test_a_version_is_a_worker_job_on_s3_and_an_alias_moves_production_back(cluster):
    first, second = cluster.apis
    classifier_id = create(first, SMALL, per_label=6)
    assert wait_for(second, classifier_id, finished, 120)["status"] == "ready"
    before = predict(second, classifier_id)
    body, content_type = multipart({
        "dataset": [("more.zip", dataset_zip(4, labels=("green",)))],
        "options": json.dumps({"promote": "always"})})
    status, headers, queued = call("POST", f"{first}/v1/classifiers/{classifier_id}/versions",
                                   body, content_type)
    assert status == 202 and queued["version"] == 2, queued
    assert cluster.s3.head_object(Bucket="headstart", Key=f"active/{classifier_id}.v2")
    version = f"{second}/v1/classifiers/{classifier_id}/versions/2"
    deadline = time.monotonic() + 120
    while (resource := call("GET", version)[2])["promotion"] is None:
        assert time.monotonic() < deadline, resource
        time.sleep(0.3)
    assert resource["status"] == "ready" and resource["aliases"] == ["production"], resource
    stored = json.loads(cluster.s3.get_object(
        Bucket="headstart", Key=f"classifiers/{classifier_id}/versions/2/record.json")["Body"]
        .read())
    assert stored["version"] == 2 and stored["attempts"] == 1 and stored["lease"] is None
    assert f"job {classifier_id}.v2: ready" in cluster.log()  # a worker ran it, by its job id
    assert predict(first, classifier_id)["version"] == 2
    status, _, aliases = call("PUT", f"{second}/v1/classifiers/{classifier_id}/aliases/"
                                     "production", json.dumps({"version": 1}).encode(),
                              "application/json")
    assert status == 200 and aliases["aliases"] == {"production": 1}
    assert predict(first, classifier_id) == predict(second, classifier_id) == before


def test_a_killed_worker_s_job_is_rerun_within_the_bound(cluster):
    api = cluster.apis[0]
    classifier_id = create(api, LONG, per_label=30)
    wait_for(api, classifier_id, well_underway, 120)
    os.kill(owner_pid(cluster, classifier_id), signal.SIGKILL)
    killed = time.monotonic()
    resource = wait_for(api, classifier_id, finished, LOST_WORKER_BOUND_S)
    assert resource["status"] == "ready", resource
    assert time.monotonic() - killed < LOST_WORKER_BOUND_S
    assert cluster.record(classifier_id)["attempts"] == 2


def test_a_worker_killed_while_refining_leaves_its_served_head_within_the_bound(cluster):
    api = cluster.apis[0]
    classifier_id = create(api, {"max_epochs": 150, "patience": 150,
                                 "augmentation": {"views": 6}}, per_label=30)
    served = wait_for(api, classifier_id, refining, 120)
    os.kill(owner_pid(cluster, classifier_id), signal.SIGKILL)
    killed = time.monotonic()
    resource = wait_for(api, classifier_id, finished, LOST_WORKER_BOUND_S)
    assert resource["status"] == "ready" and resource["stage"] == served["stage"], resource
    assert time.monotonic() - killed < LOST_WORKER_BOUND_S
    record = cluster.record(classifier_id)
    assert record["attempts"] == 1 and record["lease"] is None  # ended, not re-run
    assert predict(api, classifier_id)["predictions"][0]["label"] in ("red", "blue")


def test_delete_stops_a_running_job_and_leaves_nothing(cluster):
    first, second = cluster.apis
    classifier_id = create(first, LONG, per_label=30)
    wait_for(first, classifier_id, well_underway, 120)
    assert call("DELETE", f"{second}/v1/classifiers/{classifier_id}")[0] == 204
    deleted = time.monotonic()
    assert call("GET", f"{first}/v1/classifiers/{classifier_id}")[0] == 404
    while f"job {classifier_id}: stopped: deleted" not in cluster.log():
        assert time.monotonic() - deleted < 10, "the worker did not stop within 10 s"
        time.sleep(0.2)
    assert cluster.keys(classifier_id) == []


def test_sigterm_lets_the_running_job_finish(cluster):
    api = cluster.apis[1]
    classifier_id = create(api, {**LONG, "max_epochs": 60, "patience": 60}, per_label=20)
    wait_for(api, classifier_id, well_underway, 120)
    pid = owner_pid(cluster, classifier_id)
    os.kill(pid, signal.SIGTERM)
    resource = wait_for(api, classifier_id, finished, 120)
    assert resource["status"] == "ready", resource
    assert cluster.record(classifier_id)["attempts"] == 1  # finished by the same worker
    assert "Warm shutdown" in cluster.log()


def test_the_store_going_away_is_a_fast_503_and_recovers(cluster):
    """Last in this module: it replaces the cluster's S3 server."""
    api = cluster.apis[0]
    classifier_id = create(api, SMALL)
    wait_for(api, classifier_id, finished, 120)
    s3 = cluster.state["servers"]["seaweedfs-s3"]
    os.kill(s3["pid"], signal.SIGKILL)

    started = time.monotonic()
    status, headers, problem = call("GET", api + "/v1/classifiers")
    assert status == 503 and headers["Retry-After"], problem
    assert time.monotonic() - started < 5
    status, _, readiness = call("GET", api + "/readyz")
    assert status == 503 and readiness["checks"]["store"] != "ok", readiness

    from tools.cluster import BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY

    replacement = SeaweedS3Server(s3["port"], s3["data"], S3_ACCESS_KEY, S3_SECRET_KEY,
                                  buckets=[BUCKET])
    cluster.extra_servers.append(replacement)
    replacement.start()
    deadline = time.monotonic() + 30
    while not all(_ready(api) for api in cluster.apis):
        assert time.monotonic() < deadline, "the APIs did not recover"
        time.sleep(0.5)
    status, _, listing = call("GET", api + "/v1/classifiers")
    assert status == 200 and classifier_id in [c["id"] for c in listing["classifiers"]]
