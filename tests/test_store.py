"""The `BlobStore` contract, run against a local directory and against S3 on a real
`rclone serve s3`; then what only S3 has: multipart uploads, buckets, a server that goes away."""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid

import pytest

from service.errors import NotFound
from tools.localservers import RcloneS3Server, free_port, rclone_program
from service.storage.s3 import S3BlobStore, open_s3_blob_store, parse_s3_location, s3_client
from service.config import Settings
from service.storage.store import ClassifierStore, LocalBlobStore, StoreUnavailable

BUCKET = "headstart"
ACCESS_KEY, SECRET_KEY = "headstart-test", "headstart-test-secret"


def settings_for(server: RcloneS3Server, secret: str = SECRET_KEY) -> Settings:
    return Settings(s3_endpoint_url=server.endpoint_url, s3_region="us-east-1",
                    s3_addressing_style="path", s3_access_key_id=ACCESS_KEY,
                    s3_secret_access_key=secret)


def start_rclone(data_dir, port=None) -> RcloneS3Server:
    try:
        rclone_program()
    except FileNotFoundError as error:
        pytest.skip(f"no S3-compatible server to test against: {error}")
    server = RcloneS3Server(port or free_port(), data_dir, ACCESS_KEY, SECRET_KEY)
    server.create_bucket(BUCKET)
    return server.start()


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    server = start_rclone(tmp_path_factory.mktemp("rclone") / "data")
    yield server
    server.stop()


@pytest.fixture
def s3_client_for(rclone):
    """Builds clients for the shared server and closes them after the test."""
    clients = []

    def build(secret=SECRET_KEY):
        clients.append(s3_client(settings_for(rclone, secret), fast=True))
        return clients[-1]

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def s3_store(s3_client_for):
    """A fresh prefix for each test, so tests share the server but not their keys."""
    return S3BlobStore(s3_client_for(), BUCKET, prefix=f"tests/{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


# The contract: both stores.

def test_put_then_get_returns_the_bytes(store):
    store.put("classifiers/clf_a/record.json", b'{"id": "clf_a"}')
    store.put("classifiers/clf_a/empty", b"")

    assert store.get("classifiers/clf_a/record.json") == b'{"id": "clf_a"}'
    assert store.get("classifiers/clf_a/empty") == b""


def test_put_overwrites(store):
    store.put("classifiers/clf_a/head.npz", b"first")
    store.put("classifiers/clf_a/head.npz", b"second, longer")

    assert store.get("classifiers/clf_a/head.npz") == b"second, longer"


def test_get_of_a_missing_key_is_a_key_error(store):
    store.put("classifiers/clf_a/record.json", b"{}")

    with pytest.raises(KeyError, match="classifiers/clf_a/report.json"):
        store.get("classifiers/clf_a/report.json")
    with pytest.raises(KeyError):
        store.get("classifiers/clf_missing/record.json")


def test_exists(store):
    store.put("classifiers/clf_a/record.json", b"{}")

    assert store.exists("classifiers/clf_a/record.json")
    assert not store.exists("classifiers/clf_a/report.json")
    assert not store.exists("classifiers/clf_a")  # a prefix is not a key


def test_list_returns_sorted_keys_under_the_prefix_only(store):
    for key in ["classifiers/a/record.json", "classifiers/a/x/deep.bin",
                "classifiers/ab/record.json", "classifiers/a-z/record.json",
                "classifiers-old/a/record.json", "other/a"]:
        store.put(key, b"1")

    assert store.list("classifiers/a") == ["classifiers/a/record.json", "classifiers/a/x/deep.bin"]
    assert store.list("classifiers") == [
        "classifiers/a-z/record.json", "classifiers/a/record.json", "classifiers/a/x/deep.bin",
        "classifiers/ab/record.json"]
    assert store.list("nothing") == []


def test_delete_is_idempotent(store):
    store.put("classifiers/clf_a/record.json", b"{}")

    store.delete("classifiers/clf_a/record.json")
    store.delete("classifiers/clf_a/record.json")
    store.delete("classifiers/clf_never/record.json")

    assert not store.exists("classifiers/clf_a/record.json")
    with pytest.raises(KeyError):
        store.get("classifiers/clf_a/record.json")


def test_delete_prefix_removes_everything_under_it_and_nothing_else(store):
    for name in ["record.json", "dataset.zip", "head.npz", "report.json", "extra/nested.bin"]:
        store.put(f"classifiers/clf_a/{name}", b"1")
    store.put("classifiers/clf_ab/record.json", b"kept")

    store.delete_prefix("classifiers/clf_a")
    store.delete_prefix("classifiers/clf_a")
    store.delete_prefix("classifiers/clf_never")

    assert store.list("classifiers") == ["classifiers/clf_ab/record.json"]
    assert store.get("classifiers/clf_ab/record.json") == b"kept"


def test_put_file_and_get_file_stream_round_trip(store, tmp_path):
    data = os.urandom(300_000)
    source = tmp_path / "source.bin"
    source.write_bytes(data)

    with source.open("rb") as file:
        store.put_file("classifiers/clf_a/dataset.zip", file)
    target = io.BytesIO()
    store.get_file("classifiers/clf_a/dataset.zip", target)

    assert target.getvalue() == data
    assert store.get("classifiers/clf_a/dataset.zip") == data


def test_get_file_of_a_missing_key_is_a_key_error(store):
    with pytest.raises(KeyError, match="classifiers/clf_a/dataset.zip"):
        store.get_file("classifiers/clf_a/dataset.zip", io.BytesIO())


def test_ping(store):
    store.ping()


# S3 only.

def test_large_files_go_up_in_parts_and_come_back_whole(s3_store, tmp_path):
    parts = []
    s3_store.client.meta.events.register("before-call.s3.UploadPart",
                                         lambda **kwargs: parts.append(kwargs))
    data = os.urandom(20 * 1024**2)
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    source.write_bytes(data)

    with source.open("rb") as file:
        s3_store.put_file("classifiers/clf_a/dataset.zip", file)
    with target.open("wb") as file:
        s3_store.get_file("classifiers/clf_a/dataset.zip", file)

    assert len(parts) == 3  # 8 + 8 + 4 MiB
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_keys_live_under_the_store_prefix(s3_store, s3_client_for):
    s3_store.put("classifiers/clf_a/record.json", b"{}")
    whole_bucket = S3BlobStore(s3_client_for(), BUCKET)
    name = f"{s3_store.prefix}/classifiers/clf_a/record.json"

    assert whole_bucket.get(name) == b"{}"
    assert whole_bucket.list(s3_store.prefix) == [name]


def test_ping_of_a_missing_bucket_says_so(s3_client_for):
    with pytest.raises(StoreUnavailable, match="bucket no-such-bucket does not exist"):
        S3BlobStore(s3_client_for(), "no-such-bucket").ping()


def test_reads_and_writes_in_a_missing_bucket_are_store_unavailable(s3_client_for):
    store = S3BlobStore(s3_client_for(), "no-such-bucket")

    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        store.get("classifiers/clf_a/record.json")
    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        store.put("classifiers/clf_a/record.json", b"{}")
    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        store.list("classifiers")


def test_refused_credentials_are_store_unavailable(s3_client_for):
    store = S3BlobStore(s3_client_for(secret="wrong-secret"), BUCKET)

    with pytest.raises(StoreUnavailable, match="access denied"):
        store.ping()
    with pytest.raises(StoreUnavailable, match="access denied"):
        store.get("classifiers/clf_a/record.json")


def test_open_s3_blob_store_reaches_the_bucket(rclone):
    store = open_s3_blob_store(f"s3://{BUCKET}/headstart/", settings_for(rclone))
    try:
        assert (store.bucket, store.prefix) == (BUCKET, "headstart")
        store.ping()
    finally:
        store.client.close()


@pytest.mark.parametrize("location, expected", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/headstart/prod/", ("bucket", "headstart/prod")),
])
def test_s3_locations(location, expected):
    assert parse_s3_location(location) == expected


@pytest.mark.parametrize("location", [
    "s3://", "s3:///prefix", "s3://bucket//prefix", "s3://bucket/a/../b", "s3://bad bucket/x",
    "http://bucket/prefix", "bucket/prefix"])
def test_bad_s3_locations_are_value_errors(location):
    with pytest.raises(ValueError, match="s3://bucket/prefix. Received"):
        parse_s3_location(location)


def test_a_server_that_goes_away_is_store_unavailable_until_it_returns(tmp_path):
    server = start_rclone(tmp_path / "data")
    client = s3_client(settings_for(server), fast=True)
    store = S3BlobStore(client, BUCKET, prefix="headstart")
    try:
        store.put("classifiers/clf_a/record.json", b"{}")
        server.stop()

        for name, call in {
            "get": lambda: store.get("classifiers/clf_a/record.json"),
            "get_file": lambda: store.get_file("classifiers/clf_a/record.json", io.BytesIO()),
            "put": lambda: store.put("classifiers/clf_b/record.json", b"{}"),
            "put_file": lambda: store.put_file("classifiers/clf_b/x", io.BytesIO(b"1")),
            "exists": lambda: store.exists("classifiers/clf_a/record.json"),
            "list": lambda: store.list("classifiers"),
            "delete": lambda: store.delete("classifiers/clf_a/record.json"),
            "delete_prefix": lambda: store.delete_prefix("classifiers/clf_a"),
            "ping": store.ping,
        }.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"cannot reach s3://{BUCKET} at "
                                                       f"{server.endpoint_url}"):
                call()
            assert time.monotonic() - started < 5, name

        server = start_rclone(tmp_path / "data", port=server.port)
        assert store.get("classifiers/clf_a/record.json") == b"{}"
        store.ping()
    finally:
        server.stop()
        client.close()


def test_an_id_with_a_trailing_newline_is_no_classifier_id(tmp_path):
    store = ClassifierStore(LocalBlobStore(tmp_path / "store"))
    with pytest.raises(NotFound):
        store.delete("clf_" + "a" * 20 + "\n")
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
