"""Server-sent events: the stream generator on made-up record sequences (no Flask), the learning
curve the training loop reports, and the endpoint through a real gunicorn with a real client."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest

from models import training
from models.augmentation import Augmentation
from models.heads import HeadSpec
from service.client import Client
from service.jobs.events import (Cursor, EventStream, RecordUnavailable, StreamSlots, changes,
                            follow, stream)
from service.errors import BadRequest, NotFound, ServiceUnavailable
from service.api.schemas import Classifier, ProgressOut
from service.storage.records import (ClassifierRecord, DatasetInfo, Lease, Progress,
                                     TrainingOptions)
from service.config import Settings
from service.storage.blobs import LocalBlobStore
from service.storage.classifiers import ClassifierStore, new_classifier_id
from tests import sse
from tests.helpers import COLOURS, image_bytes
from tests.live import ADMIN_KEY, PREDICT_KEY, create_classifier, start_server

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def row(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "loss": loss, "accuracy": 0.5, "val_loss": loss + 0.1,
            "val_accuracy": 0.6}


def record(second: float, status: str = "training", **progress) -> dict:
    """A classifier resource as JSON-ready data, written `second` s after T0."""
    history = progress.pop("history", None)
    if history is not None:
        progress["history"] = history
    return {"id": "clf_x", "name": "toys", "status": status, "labels": ["red", "blue"],
            "updated_at": (T0 + timedelta(seconds=second)).isoformat(), "metrics": None,
            "error": None, "progress": progress or None}


FIT_1 = [row(1, 0.9), row(2, 0.8), row(3, 0.7)]
FIT_2 = [row(1, 0.95), row(2, 0.6)]
#: A job as a stream sees it, one record per reading: queued, extraction, two fits, ready.
LIFE = [
    record(0, "queued", stage="queued"),
    record(1, stage="extracting"),
    record(2, stage="extracting", images_done=0, images_total=40),
    record(3, stage="extracting", images_done=32, images_total=40),
    record(3.5, stage="training", epoch=1, max_epochs=9, candidate="1/2", history=FIT_1[:1]),
    record(4.5, stage="training", epoch=3, max_epochs=9, candidate="1/2", history=FIT_1),
    record(4.5, stage="training", epoch=3, max_epochs=9, candidate="1/2", history=FIT_1),
    record(5.5, stage="training", epoch=2, max_epochs=9, candidate="2/2", history=FIT_2),
    {**record(6, "ready"), "metrics": {"val_accuracy": 0.9, "val_loss": 0.3}},
]


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(records: list, cursor: Cursor | None = None, **options) -> list[sse.Message]:
    """Streams `records` (one per reading, the last one repeating; an exception is raised by
    that reading) with a fake clock, to its end."""
    readings = iter(records)

    def read():
        item = next(readings, records[-1])
        if isinstance(item, Exception):
            raise item
        return item

    fake = FakeTime()
    options = {"poll_s": 0.5, "keepalive_s": 15, "max_s": 300, **options}
    text = "".join(stream(read, "clf_x", cursor=cursor, clock=fake.clock, sleep=fake.sleep,
                          **options))
    return sse.parse_text(text)


def events_of(messages: list[sse.Message]) -> list[sse.Message]:
    return [message for message in messages if message.kind]


# ---------------------------------------------------------------- the generator


def test_a_job_streams_status_progress_each_row_once_then_done():
    events = events_of(run(LIFE))

    kinds = [event.kind for event in events]
    assert kinds[:3] == ["status", "progress", "status"]  # queued, its progress, then training
    assert kinds[-2:] == ["status", "done"]
    assert [event.data["status"] for event in events if event.kind == "status"] == [
        "queued", "training", "ready"]
    extraction = [event.data.get("images_done") for event in events
                  if event.kind == "progress" and event.data["stage"] == "extracting"]
    assert extraction == [None, 0, 32]
    rows = [(event.data["epoch"], event.data["loss"]) for event in events if event.kind == "epoch"]
    assert rows == [(1, 0.9), (2, 0.8), (3, 0.7), (1, 0.95), (2, 0.6)]  # each once, both fits
    last_progress = [event for event in events if event.kind == "progress"][-1].data
    assert last_progress["candidate"] == "2/2" and "history" not in last_progress
    assert last_progress["metrics"] == {"loss": 0.6, "accuracy": 0.5, "val_loss": 0.7,
                                        "val_accuracy": 0.6}
    assert events[-1].data == {"id": "clf_x", "status": "ready",
                               "metrics": {"val_accuracy": 0.9, "val_loss": 0.3},
                               "error": None, "version": None}
    ids = [sse.order(event.id) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # every event has an id; they increase


def test_resuming_from_any_event_sends_exactly_what_was_not_yet_sent():
    full = events_of(run(LIFE))
    for seen, last in enumerate(full, start=1):
        # The record that produced `last` is the one a reconnecting client finds first.
        produced_by = next(i for i, item in enumerate(LIFE)
                           if last.id in {e.id for e in events_of(run(LIFE[:i + 1]))})
        rest = run(LIFE[produced_by:], cursor=Cursor.decode(last.id))
        assert [(e.kind, e.id, e.data) for e in full[:seen] + events_of(rest)] == \
            [(e.kind, e.id, e.data) for e in full], f"resumed after {last.kind} {last.id}"


def test_resuming_later_skips_what_changed_meanwhile_but_repeats_nothing():
    first = events_of(run(LIFE[:5]))  # disconnected during the first fit's first epoch
    resumed = events_of(run(LIFE[7:], cursor=Cursor.decode(first[-1].id)))

    assert [event.kind for event in resumed] == ["epoch", "epoch", "progress", "status", "done"]
    assert [event.data["loss"] for event in resumed if event.kind == "epoch"] == [0.95, 0.6]
    assert sse.order(resumed[0].id) > sse.order(first[-1].id)
    assert not {event.id for event in first} & {event.id for event in resumed}


def test_a_resumed_stream_after_done_has_nothing_to_send():
    done = events_of(run(LIFE))[-1]
    events, cursor, finished = changes(LIFE[-1], Cursor.decode(done.id), "clf_x")
    assert events == [] and finished and cursor.done


def test_keep_alive_comments_fill_silence_and_the_duration_is_capped():
    messages = run([LIFE[5]], keepalive_s=15, max_s=50)

    comments = [message.comments[0] for message in messages if message.comments]
    assert comments.count("keep-alive") == 3  # at 15, 30 and 45 s
    assert "reconnect with Last-Event-ID" in comments[-1]
    assert messages[0].retry == 1000  # EventSource's reconnection delay
    assert "done" not in [message.kind for message in messages]


def test_a_server_shutting_down_ends_its_streams_and_opens_no_more():
    messages = run([LIFE[5]], stopping=lambda: True)
    assert [m.kind for m in messages if m.kind][-1] == "progress"  # what there was, then the end
    assert "the server is shutting down" in messages[-1].comments[0]
    slots = StreamSlots(2)
    slots.shut_down()
    with pytest.raises(ServiceUnavailable, match="shutting down"):
        slots.take()


def test_a_deleted_classifier_ends_the_stream_with_done_deleted():
    events = events_of(run([LIFE[5], None]))
    assert events[-1].kind == "done" and events[-1].data == {"id": "clf_x", "status": "deleted"}


def test_a_store_outage_skips_readings_and_the_stream_goes_on():
    outage = RecordUnavailable("store down")
    events = events_of(run([LIFE[4], outage, outage, LIFE[5], LIFE[-1]]))
    assert [event.data["epoch"] for event in events if event.kind == "epoch"] == [1, 2, 3]
    assert events[-1].kind == "done"


def test_version_events_only_for_records_with_versions():
    assert "version" not in [event.kind for event in events_of(run(LIFE))]
    v1 = {**LIFE[5], "version": 1, "versions": 1, "aliases": {"production": 1}}
    v2 = {**LIFE[-1], "version": 2, "versions": 2, "aliases": {"production": 2}}
    events = events_of(run([v1, v1, v2]))
    versions = [event.data for event in events if event.kind == "version"]
    assert versions == [{"version": 1, "versions": 1, "aliases": {"production": 1}},
                        {"version": 2, "versions": 2, "aliases": {"production": 2}}]


def test_cursors_round_trip_and_anything_else_is_refused():
    cursor = Cursor(1735689600123, 4, "training", 3, 0xDEADBEEF, 0x12, 7, False)
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ["", "7", "1.2.training.-.zz.00000000.1.0", "1.2.Training.-.00000000.00000000.1.0",
                cursor.encode() + "\nid: 9", "9" * 40]:
        with pytest.raises(ValueError):
            Cursor.decode(bad)


def test_stream_slots_are_bounded_and_given_back_once():
    slots = StreamSlots(2)
    first, second = slots.take(), slots.take()
    with pytest.raises(ServiceUnavailable) as refused:
        slots.take()
    assert refused.value.headers["Retry-After"] == "5"
    first()
    first()  # twice gives back one slot, not two
    slots.take()
    with pytest.raises(ServiceUnavailable):
        slots.take()
    second()


def test_a_stream_closed_before_it_started_gives_its_slot_back(tmp_path):
    store, slots = ClassifierStore(LocalBlobStore(tmp_path)), StreamSlots(1)
    classifier = stored_record(store)
    settings = Settings(store=str(tmp_path))
    opened = follow(resource_of(store, classifier.id), settings, slots, classifier.id, None)
    assert isinstance(opened, EventStream)
    opened.close()  # what the WSGI server does when the client is gone
    follow(resource_of(store, classifier.id), settings, slots, classifier.id, None).close()


def test_follow_refuses_bad_ids_unknown_classifiers_and_answers_none_after_done(tmp_path):
    store, slots = ClassifierStore(LocalBlobStore(tmp_path)), StreamSlots(1)
    settings = Settings(store=str(tmp_path))
    with pytest.raises(BadRequest):
        follow(resource_of(store, UNKNOWN), settings, slots, UNKNOWN, "not-an-id")
    with pytest.raises(NotFound):
        follow(resource_of(store, UNKNOWN), settings, slots, UNKNOWN, None)
    classifier = stored_record(store, status="failed", progress=None)
    events, _, _ = changes(Classifier.from_record(classifier).model_dump(mode="json"), None, classifier.id)
    assert follow(resource_of(store, classifier.id), settings, slots, classifier.id, events[-1].id) is None
    # no slot was kept:
    follow(resource_of(store, classifier.id), settings, slots, classifier.id, None).close()


UNKNOWN = "clf_00000000000000000000"


def resource_of(store: ClassifierStore, classifier_id: str):
    """What the route hands `follow`: the public resource, read from the store."""
    return lambda: Classifier.from_record(store.load_record(classifier_id)).model_dump(mode="json")


def rewrite(store: ClassifierStore, classifier: ClassifierRecord) -> None:
    """Writes the record as a worker would: conditioned on the version it last saw."""
    store.save_record(classifier, store.load_versioned(classifier.id).tag)


def stored_record(store: ClassifierStore, status="training",
                  progress: Progress | None = Progress(stage="extracting"),
                  lease: Lease | None = None):
    now = datetime.now(timezone.utc)
    classifier = ClassifierRecord(
        id=new_classifier_id(), name="toys", status=status, labels=["red", "blue"],
        created_at=now, updated_at=now, dataset=DatasetInfo(images=4, per_label={}),
        progress=progress, options=TrainingOptions(), lease=lease)
    store.create_record(classifier)
    return classifier


# ---------------------------------------------------------------- the learning curve


def test_training_reports_the_running_fits_rows_and_extraction_from_zero(backbone):
    images = [image_bytes(COLOURS[label], seed=i) for label in ("red", "blue") for i in range(6)]
    labels = np.repeat([0, 1], 6)
    config = training.TrainingConfig(
        max_epochs=4, patience=10, augmentation=Augmentation(views=0),
        candidates=(HeadSpec(hidden_units=0, dropout=0.1, l2=1e-3),
                    HeadSpec(hidden_units=0, dropout=0.1, l2=1e-2)))
    seen: list[training.Progress] = []
    training.train_classifier(images, labels, ["red", "blue"], backbone, config,
                              on_progress=seen.append)

    extracting = [p.images_done for p in seen if p.stage == "extracting"]
    assert extracting[0] == 0 and extracting[-1] == 12 and extracting == sorted(extracting)
    fits = [p for p in seen if p.stage == "training" and p.candidate != "refit"]
    # Restarts per candidate and fold: 2 candidates × 5 folds, 4 epochs each.
    assert [len(p.history) for p in fits] == [1, 2, 3, 4] * 10
    assert [p.candidate for p in fits[:8]] == ["1/2 fold 1/5"] * 4 + ["2/2 fold 1/5"] * 4
    assert [r["epoch"] for r in fits[3].history] == [1, 2, 3, 4]
    assert set(fits[-1].history[-1]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert fits[-1].history[-1]["val_accuracy"] == fits[-1].val_accuracy
    assert ProgressOut(**vars(fits[-1])).history[-1].epoch == 4  # as the record carries it


# ---------------------------------------------------------------- through gunicorn


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("events")
    with start_server(tmp, HEADSTART_MAX_EVENT_STREAMS="2", HEADSTART_EVENT_KEEPALIVE_S="1",
                      HEADSTART_EVENT_STREAM_MAX_S="4",
                      HEADSTART_API_KEYS=f"{ADMIN_KEY}:admin,{PREDICT_KEY}:predict") as live:
        yield live


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def follow_http(base: str, classifier_id: str, key: str = PREDICT_KEY, *, until=None,
                headers=None, params=None, timeout=120) -> list[sse.Message]:
    """Events of one stream read with httpx, up to `until(message)` or the stream's end. A 503
    (the streams a previous test closed are not yet noticed) is retried for a while."""
    url = f"{base}/v1/classifiers/{classifier_id}/events"
    deadline = time.monotonic() + 20
    seen: list[sse.Message] = []
    while True:
        with httpx.stream("GET", url, params=params, headers={**auth(key), **(headers or {})},
                          timeout=httpx.Timeout(timeout, read=30)) as response:
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for message in sse.parse(response.iter_lines()):
                seen.append(message)
                if until and until(message):
                    break
            return seen


def test_a_training_job_streams_extraction_epochs_and_done_to_a_predict_key(server):
    classifier_id = create_classifier(server.url, ADMIN_KEY, per_label=60, options={
        "max_epochs": 150, "patience": 150, "learning_rate": 1e-5,
        "augmentation": {"views": 3}, "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}})

    with Client(server.url, PREDICT_KEY) as client:  # reconnects as each 4 s stream ends
        events = list(client.events(classifier_id))

    order = {"preview": 0, "augmented": 1}
    extraction = [(order[e.data["training_stage"]], e.data["images_done"]) for e in events
                  if e.kind == "progress" and e.data["stage"] == "extracting"
                  and e.data["images_done"] is not None]
    # NB: progress reaches the store about once a second, so a fast extraction may show one
    # write; that it is written per batch is tested on the training loop itself. Each stage
    # extracts once: the preview view 0, then the augmented views.
    assert extraction and extraction == sorted(set(extraction)), extraction
    assert extraction[-1][0] == order["augmented"]
    ready = [e.data for e in events if e.kind == "status" and e.data["status"] == "ready"]
    assert [r["refining"] for r in ready] == [True, False]  # served early, then final
    assert all(e.data["images_total"] == 120 for e in events
               if e.kind == "progress" and e.data["images_done"] is not None)
    epochs = [e.data["epoch"] for e in events if e.kind == "epoch"]
    # One fit per cross-validation fold, each fit's rows once and in order: a run of epochs
    # restarts only at 1.
    assert epochs and epochs[0] == 1, epochs
    assert all(b in (a + 1, 1) for a, b in zip(epochs, epochs[1:])), epochs
    assert events[-1].kind == "done" and events[-1].data["status"] == "ready"
    assert events[-1].data["metrics"]["val_accuracy"] >= 0
    ids = [sse.order(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # nothing repeated on reconnecting
    streams = server.log.read_text().count(f"GET /v1/classifiers/{classifier_id}/events")
    assert streams >= 2, "the job outlasted one stream, so the client must have reconnected"


@pytest.fixture
def held_record(server):
    """A classifier left training in the server's store, which the test writes as a worker
    would: nothing in the server moves it (its lease is a worker's that renews it, so the
    server's lost-job sweep leaves it alone)."""
    store = server.store()
    classifier = stored_record(store, progress=Progress(stage="training", epoch=2,
                                                        max_epochs=9, history=FIT_1[:2]),
                               lease=Lease(owner="a-test-worker",
                                           heartbeat_at=datetime.now(timezone.utc)
                                           + timedelta(hours=1)))
    yield store, classifier
    store.delete(classifier.id)


def test_resuming_with_last_event_id_repeats_nothing(server, held_record):
    store, classifier = held_record
    first = events_of(follow_http(server.url, classifier.id,
                                  until=lambda m: m.kind == "epoch" and m.data["epoch"] == 1))
    classifier.progress = Progress(stage="training", epoch=3, max_epochs=9, history=FIT_1)
    classifier.updated_at = datetime.now(timezone.utc)
    rewrite(store, classifier)

    second = events_of(follow_http(server.url, classifier.id, headers={
        "Last-Event-ID": first[-1].id}, until=lambda m: m.kind == "progress"))
    finish = threading.Timer(1.0, lambda: finish_record(store, classifier))
    finish.start()
    third = events_of(follow_http(server.url, classifier.id,
                                  params={"last_event_id": second[-1].id}))
    finish.join()

    assert [e.kind for e in first] == ["status", "version", "epoch"]  # every record has one
    assert [(e.kind, (e.data or {}).get("epoch")) for e in second] == [
        ("epoch", 2), ("epoch", 3), ("progress", 3)]
    assert [e.kind for e in third] == ["status", "done"]
    seen = first + second + third
    assert len({e.id for e in seen}) == len(seen)
    assert sorted(seen, key=lambda e: sse.order(e.id)) == seen
    after_done = httpx.get(f"{server.url}/v1/classifiers/{classifier.id}/events",
                           headers={**auth(PREDICT_KEY), "Last-Event-ID": third[-1].id})
    assert after_done.status_code == 204  # EventSource stops reconnecting on 204


def finish_record(store: ClassifierStore, classifier: ClassifierRecord) -> None:
    classifier.status, classifier.progress = "failed", None
    classifier.updated_at = datetime.now(timezone.utc)
    rewrite(store, classifier)


def test_streams_past_the_limit_get_503_until_one_closes(server, held_record):
    _, classifier = held_record
    url = f"{server.url}/v1/classifiers/{classifier.id}/events"
    with open_when_free(url) as a, open_when_free(url) as b:
        assert (a.status_code, b.status_code) == (200, 200)
        refused = httpx.get(url, headers=auth(PREDICT_KEY))
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert refused.headers["content-type"] == "application/problem+json"
        assert "event streams" in refused.json()["detail"]
        assert httpx.get(f"{server.url}/readyz").status_code == 200  # threads to spare
    with open_when_free(url) as again:  # the server notices closed streams at a keep-alive
        assert again.status_code == 200


@contextmanager
def open_when_free(url: str) -> Iterator[httpx.Response]:
    """A stream opened once a slot is free: a stream the client closed holds its slot until
    the server's next write to it fails (a keep-alive, 1 s in these tests)."""
    deadline = time.monotonic() + 20
    while True:
        with httpx.stream("GET", url, headers=auth(PREDICT_KEY), timeout=30) as response:
            if response.status_code != 503 or time.monotonic() > deadline:
                yield response
                return
        time.sleep(0.5)


def test_deleting_a_classifier_ends_its_stream_with_done_deleted(server, held_record):
    _, classifier = held_record
    delete = threading.Timer(1.0, lambda: httpx.delete(
        f"{server.url}/v1/classifiers/{classifier.id}", headers=auth(ADMIN_KEY)))
    delete.start()
    events = events_of(follow_http(server.url, classifier.id))
    delete.join()
    assert events[-1].kind == "done" and events[-1].data == {"id": classifier.id,
                                                             "status": "deleted"}


def test_events_need_a_key_and_unknown_ids_are_404(server):
    url = f"{server.url}/v1/classifiers/clf_00000000000000000000/events"
    assert httpx.get(url).status_code == 401
    missing = httpx.get(url, headers=auth(PREDICT_KEY))
    assert missing.status_code == 404 and missing.json()["status"] == 404
    bad = httpx.get(url, headers={**auth(PREDICT_KEY), "Last-Event-ID": "nonsense"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["detail"]


def test_openapi_documents_the_stream(server):
    document = httpx.get(f"{server.url}/openapi.json").json()
    operation = document["paths"]["/v1/classifiers/{classifier_id}/events"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert operation["summary"].startswith("Follow a classifier as server-sent events")
    assert {p["name"] for p in operation["parameters"]} == {"classifier_id", "last_event_id"}
    assert json.dumps(operation["responses"]["503"]).count("problem+json") == 1


def test_sigterm_ends_open_streams_at_once_and_the_server_exits_0(server, held_record):
    """Last here: it stops the module's server. Streams would otherwise hold up the graceful
    shutdown (60 s) that lets other requests finish."""
    _, classifier = held_record
    started, messages = threading.Event(), []

    def follow() -> None:
        with open_when_free(f"{server.url}/v1/classifiers/{classifier.id}/events") as response:
            for message in sse.parse(response.iter_lines()):
                messages.append(message)
                started.set()

    reader = threading.Thread(target=follow)
    reader.start()
    assert started.wait(30)
    stopping = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    reader.join(30)

    assert server.process.wait(timeout=30) == 0
    # NB: well under the 60 s graceful timeout that a held stream would run into; the margin is
    # for a loaded machine, where stopping the TensorFlow workers alone took 20 s once
    assert time.monotonic() - stopping < 40
    assert "the server is shutting down; reconnect with Last-Event-ID" in messages[-1].comments
