"""The store, on a local directory and on a real S3-compatible server (SeaweedFS, started here).

The `BlobStore` contract both keep, compare-and-set included; the `ClassifierStore` over each
(versions, the `active/` index, pages, tombstones); what only S3 has (multipart uploads, buckets,
a server that goes away); and the start-up check that refuses an S3 server ignoring conditional
writes (`rclone serve s3` does: it accepts both mismatching writes).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from models.options import TrainingOptions
from service.app import open_store
from service.config import Settings
from service.errors import NotFound
from service.storage.blobs import (ConditionalWritesUnsupported, LocalBlobStore,
                                   PreconditionFailed, StoreUnavailable)
from service.storage.classifiers import ClassifierStore
from service.storage.features import KEY_BYTES, StoredFeatureCache, decode
from service.storage.records import SCHEMA_VERSION, ClassifierRecord, DatasetInfo, utc_now
from service.storage.s3 import S3BlobStore, open_s3_blob_store, parse_s3_location, s3_client
from tools.localservers import (RcloneS3Server, SeaweedS3Server, free_port, rclone_program,
                                weed_program)

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "headstart"
ACCESS_KEY, SECRET_KEY = "headstart-test", "headstart-test-secret"


def settings_for(server, secret: str = SECRET_KEY, **overrides) -> Settings:
    return Settings(s3_endpoint_url=server.endpoint_url, s3_region="us-east-1",
                    s3_addressing_style="path", s3_access_key_id=ACCESS_KEY,
                    s3_secret_access_key=secret, **overrides)


def _needs(program) -> None:
    try:
        program()
    except FileNotFoundError as error:
        if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
            pytest.fail(str(error))
        pytest.skip(f"no S3-compatible server to test against: {error}")


def start_seaweed(data_dir, port=None) -> SeaweedS3Server:
    _needs(weed_program)
    return SeaweedS3Server(port or free_port(), data_dir, ACCESS_KEY, SECRET_KEY,
                           buckets=[BUCKET]).start()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = start_seaweed(tmp_path_factory.mktemp("seaweed") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    _needs(rclone_program)
    server = RcloneS3Server(free_port(), tmp_path_factory.mktemp("rclone") / "data",
                            ACCESS_KEY, SECRET_KEY)
    server.create_bucket(BUCKET)
    yield server.start()
    server.stop()


@pytest.fixture
def s3_client_for(seaweed):
    """Builds clients for the shared server and closes them after the test."""
    clients = []

    def build(secret=SECRET_KEY):
        clients.append(s3_client(settings_for(seaweed, secret), fast=True))
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


@pytest.fixture
def broken_store(store, tmp_path, s3_client_for):
    """A store of the same kind that cannot work: a directory under a file, a missing bucket."""
    if isinstance(store, LocalBlobStore):
        (tmp_path / "a-file").write_bytes(b"")
        return LocalBlobStore(tmp_path / "a-file" / "store")
    return S3BlobStore(s3_client_for(), "no-such-bucket")


# ---------------------------------------------------------------- the contract: both stores

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
    with pytest.raises(KeyError):
        store.get_versioned("classifiers/clf_missing/record.json")


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


def test_ping_passes_on_a_working_store_and_fails_on_a_broken_one(store, broken_store):
    store.ping()
    with pytest.raises(StoreUnavailable):
        broken_store.ping()


# ---------------------------------------------------------------- compare-and-set: both stores

KEY = "classifiers/clf_a/record.json"


def test_get_versioned_returns_the_tag_the_write_returned(store):
    tag = store.put_if(KEY, b"one", None)
    assert store.get_versioned(KEY) == (b"one", tag)
    newer = store.put_if(KEY, b"two", tag)
    assert newer != tag and store.get_versioned(KEY) == (b"two", newer)


def test_put_if_without_a_tag_only_creates(store):
    store.put_if(KEY, b"first", None)
    with pytest.raises(PreconditionFailed):
        store.put_if(KEY, b"second", None)
    assert store.get(KEY) == b"first"


def test_put_if_writes_on_the_current_tag_only(store):
    first = store.put_if(KEY, b"one", None)
    second = store.put_if(KEY, b"two", first)
    with pytest.raises(PreconditionFailed):
        store.put_if(KEY, b"stale", first)  # written on a version that is gone
    assert store.get_versioned(KEY) == (b"two", second)
    with pytest.raises(PreconditionFailed):
        store.put_if("classifiers/clf_b/record.json", b"x", first)  # no such object
    assert not store.exists("classifiers/clf_b/record.json")


@pytest.mark.parametrize("create", [True, False], ids=["create", "replace"])
def test_of_writers_racing_on_one_version_exactly_one_wins(store, create):
    tag = None if create else store.put_if(KEY, b"start", None)
    writers = 8
    start = threading.Barrier(writers)
    won, lost = [], []

    def write(number: int) -> None:
        data = f"writer {number}".encode()
        start.wait(timeout=30)
        try:
            won.append((data, store.put_if(KEY, data, tag)))
        except PreconditionFailed:
            lost.append(number)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(won) == 1 and len(lost) == writers - 1
    assert store.get_versioned(KEY) == won[0]


def test_delete_if_deletes_the_current_version_only(store):
    first = store.put_if(KEY, b"one", None)
    second = store.put_if(KEY, b"two", first)
    with pytest.raises(PreconditionFailed):
        store.delete_if(KEY, first)
    assert store.get(KEY) == b"two"
    store.delete_if(KEY, second)
    assert not store.exists(KEY)


def test_put_file_fsyncs_the_folder_so_the_rename_survives_power_loss(tmp_path, monkeypatch):
    """A spy on os.fsync (the real call still runs): the folder holding the object is synced
    after the file itself."""
    store = LocalBlobStore(tmp_path / "store")
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.put("classifiers/clf_a/record.json", b"{}")

    folder = tmp_path / "store" / "classifiers" / "clf_a"
    assert synced == [(folder / "record.json").stat().st_ino, folder.stat().st_ino]


# ---------------------------------------------------------------- records over both stores

def record(number: int, status: str = "queued") -> ClassifierRecord:
    now = utc_now() + timedelta(seconds=number)
    return ClassifierRecord(
        id=f"clf_{number:08d}{'0' * 12}", name=f"classifier {number}", status=status,
        labels=["blue", "red"], created_at=now, updated_at=now,
        dataset=DatasetInfo(images=4, per_label={"blue": 2, "red": 2}),
        options=TrainingOptions())


def test_records_change_by_compare_and_set_and_the_active_index_follows(store):
    classifiers = ClassifierStore(store)
    queued = record(1)
    tag = classifiers.create_record(queued)
    assert classifiers.active_ids() == [queued.id]
    with pytest.raises(PreconditionFailed):
        classifiers.create_record(queued)  # the id is taken

    current = classifiers.load_versioned(queued.id)
    assert current.tag == tag and current.record.schema_version == SCHEMA_VERSION
    assert current.record.model_dump(exclude={"schema_version"}) == \
        queued.model_dump(exclude={"schema_version"})
    ready = queued.model_copy(update={"status": "ready", "updated_at": utc_now()})
    tag = classifiers.save_record(ready, tag)
    assert classifiers.active_ids() == []
    assert classifiers.load_versioned(queued.id).tag == tag
    with pytest.raises(PreconditionFailed):  # a writer still holding the first version
        classifiers.save_record(queued, current.tag)
    assert classifiers.load_record(queued.id).status == "ready"


def test_a_write_after_delete_is_refused_and_leaves_only_the_tombstone(store):
    classifiers = ClassifierStore(store)
    queued = record(1)
    tag = classifiers.create_record(queued)
    classifiers.save_dataset(queued.id, io.BytesIO(b"zip"))
    classifiers.delete(queued.id)

    with pytest.raises(NotFound):
        classifiers.save_record(queued.model_copy(update={"status": "training"}), tag)
    assert store.list("classifiers") == [] and store.list("active") == []
    assert store.list("deleted") == [f"deleted/{queued.id}"]


def test_pages_are_newest_first_and_the_cursor_continues_them(store):
    classifiers = ClassifierStore(store)
    for number in range(5):
        classifiers.create_record(record(number))

    pages, cursor = [], None
    while True:
        records, cursor = classifiers.list_page(2, cursor)
        pages.append([r.name for r in records])
        if cursor is None:
            break
    assert pages == [["classifier 4", "classifier 3"], ["classifier 2", "classifier 1"],
                     ["classifier 0"]]
    # A last page that is exactly full says there is no next one.
    assert classifiers.list_page(5)[1] is None
    assert [r.name for r in classifiers.list_page(3, record(3).id)[0]] == [
        "classifier 2", "classifier 1", "classifier 0"]


def test_the_feature_cache_object_changes_by_compare_and_set_and_goes_with_its_classifier(
        store):
    classifiers = ClassifierStore(store)
    queued = record(1)
    classifiers.create_record(queued)
    assert classifiers.load_features(queued.id) is None
    tag = classifiers.save_features(queued.id, b"first", None)
    with pytest.raises(PreconditionFailed):
        classifiers.save_features(queued.id, b"again", None)  # there is one now
    newer = classifiers.save_features(queued.id, b"second", tag)
    with pytest.raises(PreconditionFailed):
        classifiers.save_features(queued.id, b"stale", tag)
    assert classifiers.load_features(queued.id) == (b"second", newer)
    classifiers.delete(queued.id)
    assert classifiers.load_features(queued.id) is None
    assert store.list("classifiers") == []
    with pytest.raises(NotFound):  # a run still writing after the delete leaves nothing
        classifiers.save_features(queued.id, b"late", None)
    assert store.list("classifiers") == []


def test_two_runs_writing_a_feature_cache_at_once_keep_both_runs_rows(store):
    """Both read "no cache", both write: the second's conditional write fails, and it merges
    the first's rows into its own."""
    classifiers = ClassifierStore(store)
    queued = record(1)
    classifiers.create_record(queued)
    keys = [bytes([i]) * KEY_BYTES for i in range(4)]
    rows = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    runs = [StoredFeatureCache(classifiers, queued.id, max_bytes=2**20) for _ in range(2)]
    for run in runs:
        assert run.get(keys) == {}
    runs[0].put(keys[:2], rows[:2])
    runs[1].put(keys[2:], rows[2:])
    stored_keys, stored_rows = decode(classifiers.load_features(queued.id)[0])
    assert [key.tobytes() for key in stored_keys] == keys[2:] + keys[:2]  # newest first
    np.testing.assert_array_equal(stored_rows, np.concatenate([rows[2:], rows[:2]]))
    found = StoredFeatureCache(classifiers, queued.id, max_bytes=2**20).get(keys)
    assert {key: row.tolist() for key, row in found.items()} == \
        {key: row.tolist() for key, row in zip(keys, rows)}


# ---------------------------------------------------------------- S3 only

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


def test_open_s3_blob_store_reaches_the_bucket(seaweed):
    store = open_s3_blob_store(f"s3://{BUCKET}/headstart/", settings_for(seaweed))
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
    server = start_seaweed(tmp_path / "data")
    client = s3_client(settings_for(server), fast=True)
    store = S3BlobStore(client, BUCKET, prefix="headstart")
    try:
        tag = store.put_if("classifiers/clf_a/record.json", b"{}", None)
        server.stop()

        for name, call in {
            "get": lambda: store.get("classifiers/clf_a/record.json"),
            "get_versioned": lambda: store.get_versioned("classifiers/clf_a/record.json"),
            "get_file": lambda: store.get_file("classifiers/clf_a/record.json", io.BytesIO()),
            "put": lambda: store.put("classifiers/clf_b/record.json", b"{}"),
            "put_if": lambda: store.put_if("classifiers/clf_a/record.json", b"[]", tag),
            "put_file": lambda: store.put_file("classifiers/clf_b/x", io.BytesIO(b"1")),
            "exists": lambda: store.exists("classifiers/clf_a/record.json"),
            "list": lambda: store.list("classifiers"),
            "delete": lambda: store.delete("classifiers/clf_a/record.json"),
            "delete_if": lambda: store.delete_if("classifiers/clf_a/record.json", tag),
            "delete_prefix": lambda: store.delete_prefix("classifiers/clf_a"),
            "ping": store.ping,
        }.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"cannot reach s3://{BUCKET} at "
                                                       f"{server.endpoint_url}"):
                call()
            assert time.monotonic() - started < 5, name

        server = start_seaweed(tmp_path / "data", port=server.port)
        assert store.get_versioned("classifiers/clf_a/record.json") == (b"{}", tag)
        store.ping()
    finally:
        server.stop()
        client.close()


def test_an_id_with_a_trailing_newline_is_no_classifier_id(tmp_path):
    store = ClassifierStore(LocalBlobStore(tmp_path / "store"))
    with pytest.raises(NotFound):
        store.delete("clf_" + "a" * 20 + "\n")
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


# ---------------------------------------------------------------- the start-up check

def test_a_server_that_ignores_conditional_writes_is_refused_at_start(rclone):
    settings = settings_for(rclone, store=f"s3://{BUCKET}/headstart")
    with pytest.raises(ConditionalWritesUnsupported) as refused:
        open_store(settings)
    message = str(refused.value)
    assert f"s3://{BUCKET} at {rclone.endpoint_url} accepted a PutObject" in message
    assert "ignores conditional writes" in message and "AWS S3, MinIO or SeaweedFS" in message
    client = s3_client(settings)
    try:
        assert S3BlobStore(client, BUCKET, "headstart").list("probes") == []  # cleaned up
    finally:
        client.close()


def test_a_server_that_honours_conditional_writes_passes_the_check(seaweed):
    store = open_store(settings_for(seaweed, store=f"s3://{BUCKET}/checked"))
    try:
        assert store.blobs.list("probes") == []  # the probe cleans up after itself
    finally:
        store.blobs.client.close()


def test_the_check_can_be_turned_off(rclone, monkeypatch):
    monkeypatch.setenv("HEADSTART_S3_CHECK_CONDITIONAL_WRITES", "false")
    settings = Settings(store=f"s3://{BUCKET}/unchecked", s3_endpoint_url=rclone.endpoint_url,
                        s3_region="us-east-1", s3_addressing_style="path",
                        s3_access_key_id=ACCESS_KEY, s3_secret_access_key=SECRET_KEY)
    assert settings.s3_check_conditional_writes is False
    open_store(settings).blobs.client.close()


def test_the_api_process_refuses_to_start_on_such_a_server(rclone, tmp_path):
    """What gunicorn imports in each worker: a clear log line and the boot-error status, which
    makes gunicorn's arbiter stop instead of respawning the worker."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HEADSTART_")}
    env.update(HEADSTART_STORE=f"s3://{BUCKET}/headstart",
               HEADSTART_S3_ENDPOINT_URL=rclone.endpoint_url, HEADSTART_S3_REGION="us-east-1",
               HEADSTART_S3_ADDRESSING_STYLE="path", HEADSTART_S3_ACCESS_KEY_ID=ACCESS_KEY,
               HEADSTART_S3_SECRET_ACCESS_KEY=SECRET_KEY, HEADSTART_BACKBONE_WEIGHTS="random",
               HEADSTART_IMAGE_SIZE="32", HEADSTART_WEIGHTS_CACHE=str(tmp_path / "cache"))
    started = subprocess.run([sys.executable, "-c", "import service.wsgi"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 3, started.stderr
    assert "Headstart cannot run on this store; stopping." in started.stderr
    assert "ignores conditional writes" in started.stderr
