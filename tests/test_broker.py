"""The API against a real Redis broker that is down, then up: readiness, a fast 503 that stores
nothing, then queued jobs (no worker runs here: the message waits in the queue)."""

import time

import pytest

from service.app import create_app
from tools.localservers import RedisServer, free_port, redis_server_program
from service.config import Settings
from tests.helpers import dataset_zip, require_server
from tests.test_api import post_dataset, wait_ready


@pytest.fixture
def redis_port():
    require_server(redis_server_program)
    return free_port()


def test_a_broker_outage_is_a_fast_503_and_recovers(tmp_path, redis_port):
    settings = Settings(store=str(tmp_path / "store"), queue=f"redis://127.0.0.1:{redis_port}/0",
                        backbone_weights="random", image_size=32,
                        weights_cache=tmp_path / "cache")
    client = create_app(settings).test_client()
    deadline = time.monotonic() + 60
    while client.get("/readyz").json["checks"]["backbone"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    readiness = client.get("/readyz")
    assert readiness.status_code == 503
    assert "unreachable" in readiness.json["checks"]["queue"]
    started = time.monotonic()
    refused = post_dataset(client, dataset_zip(3))
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert time.monotonic() - started < 10
    assert client.get("/v1/classifiers").json["classifiers"] == []  # nothing left behind

    with RedisServer(redis_port, tmp_path / "redis"):
        wait_ready(client)
        accepted = post_dataset(client, dataset_zip(3))
        assert accepted.status_code == 202
        assert client.get(accepted.headers["Location"]).json["status"] == "queued"
        assert "headstart_queue_depth 1.0" in client.get("/metrics").data.decode()
