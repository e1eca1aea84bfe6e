"""Hostile clients (issue 11): image bombs and malformed files, amplifying bodies, slow
connections. The decoder is tested as a function; the rest through the app, and the slow clients
through real sockets against a real gunicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocessing import ImageDecodeError, decode_image, load_image, read_header
from service.api.gthread import GuardedSocket
from service.api.limits import ClientLimits
from service.config import Settings
from service.errors import PayloadTooLarge, ServiceUnavailable, Unprocessable
from service.jobs import prediction
from service.jobs.datasets import DatasetLimits, read_dataset_zip
from service.storage.blobs import StoreUnavailable
from tests.helpers import call, gunicorn_server, multipart, ready_app

# The 54-byte GIF of the issue: its extension block is cut short, so `n_frames` raised struct.error.
SHORT_GIF = bytes.fromhex(
    "474946383761100008008000000000000000002c00000000100008000008150001081c48b0a0c18308132a5c"
    "c8b0a1c387080302002c")
# EXIF blocks (orientation 6, rotate) with a broken neighbouring entry, found by mutating a valid
# one: rewriting them in ImageOps.exif_transpose raised struct.error and TypeError.
BROKEN_EXIF = {
    "struct.error": bytes.fromhex(
        "4578696600004d4d002a00000008000401080002000000060000003e01120003000000010006"
        "2d00011a000500000001000000440131000200000002780000000000000043616e6f6e00000000"
        "4800000001"),
    "TypeError": bytes.fromhex(
        "4578696600004d4d002a000000080004013f0002000000060000003e01120003000000010006"
        "0098011a000500000001000000440131000200000002780000000000000043616e6f6e00000000"
        "4800000001"),
}


def encoded(fmt: str, size=(8, 4), mode="RGB", **save) -> bytes:
    """A small image with a gradient, so that its orientation shows in its pixels."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    pixels[..., 2] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **save)
    return buffer.getvalue()


def thin_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- decoding (items 3 and 4)


def test_the_short_gif_of_the_issue_decodes_to_its_first_frame():
    assert decode_image(SHORT_GIF).size == (16, 8)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("broken", sorted(BROKEN_EXIF))
def test_a_broken_exif_entry_beside_the_orientation_still_rotates(fmt, broken):
    data = encoded(fmt, exif=BROKEN_EXIF[broken])

    assert decode_image(data).size == (4, 8)  # orientation 6 applied


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_an_unreadable_exif_block_leaves_the_image_as_stored(fmt):
    exif = bytearray(BROKEN_EXIF["struct.error"])
    exif[6:10] = b"MM\x00\xec"  # not a TIFF header

    assert decode_image(encoded(fmt, exif=bytes(exif))).size == (8, 4)


def test_a_one_pixel_wide_png_of_forty_million_rows_is_refused_from_its_header():
    data = thin_png(1, 40_000_000)  # 77 KB; decoding it took seconds and 1.1 GB
    started = time.perf_counter()

    with pytest.raises(ImageDecodeError, match="1x40000000 pixels: one side is more than 100"):
        load_image(data, 32)

    assert time.perf_counter() - started < 0.5


def test_the_aspect_ratio_limit_is_a_parameter():
    data = thin_png(10, 1_000)

    assert read_header(data).pixels == 10_000
    with pytest.raises(ImageDecodeError, match="more than 50 times"):
        read_header(data, max_aspect_ratio=50)


# Real files of every accepted format, with the parts hostile edits aim at: EXIF, frames, palettes.
FUZZ_SEEDS = {
    "jpeg+exif": encoded("JPEG", (24, 16), exif=BROKEN_EXIF["struct.error"][:56]),
    "progressive jpeg": encoded("JPEG", (24, 16), progressive=True),
    "png": encoded("PNG", (24, 16)),
    "palette png": encoded("PNG", (24, 16), mode="P", transparency=0),
    "gif": SHORT_GIF,
    "animated gif": None,  # filled below
    "webp+exif": encoded("WEBP", (24, 16), exif=BROKEN_EXIF["TypeError"][:56]),
    "lossless webp": encoded("WEBP", (24, 16), lossless=True),
    "bmp": encoded("BMP", (24, 16)),
}


def _animated_gif() -> bytes:
    frames = [Image.new("P", (24, 16), colour) for colour in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


FUZZ_SEEDS["animated gif"] = _animated_gif()


@st.composite
def mutated_images(draw) -> bytes:
    """A real image with a few bytes changed, inserted, duplicated or cut off; edits land in
    the first 64 bytes (headers, EXIF) more often than anywhere else."""
    data = bytearray(FUZZ_SEEDS[draw(st.sampled_from(sorted(FUZZ_SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.one_of(st.integers(0, min(63, len(data) - 1)),
                               st.integers(0, len(data) - 1)))
        edit = draw(st.sampled_from(["set", "set", "insert", "delete", "repeat", "word"]))
        if edit == "set":
            data[where] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[where:where + draw(st.integers(1, 8))]
        elif edit == "repeat":
            data[where:where] = data[where:where + draw(st.integers(1, 32))]
        else:  # a large or extreme 16/32-bit value where a size or count may be
            data[where:where + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), draw(
                st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 40_000_000])))
        if not data:
            break
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_images())
def test_a_mutated_image_decodes_or_is_refused_with_a_reason(data):
    try:
        pixels = load_image(data, 32)
    except ImageDecodeError as error:
        assert error.reason
        return
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32


# ---------------------------------------------------------------- dataset uploads (items 3 and 6)


def zip_of(members: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def four_images(**extra: bytes) -> dict[str, bytes]:
    return {f"{label}/{i}.png": encoded("PNG", (12 + i, 10)) for label in ("cat", "dog")
            for i in range(2)} | extra


def central_directory_zip(entries: int, declared: int | None = None) -> bytes:
    """A zip of `entries` central-directory headers (one-letter names, no member data) and an end
    record declaring `declared` of them (zip64 when `entries` needs it)."""
    header = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                         0, 0, 0, 0, 0, 0) + b"a"
    directory = header * entries
    declared = entries if declared is None else declared
    if declared < 0xFFFF:
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, declared, declared, len(directory), 0, 0)
        return directory + end
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared,
                        len(directory), 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return directory + zip64 + locator + end


def done(response):
    """The response, read and closed."""
    response.get_data()
    response.close()
    return response


def cost(function):
    """(what function returned or raised, seconds, peak MiB of Python allocations) of a call;
    timed and traced in two runs, since tracing slows allocation-heavy code many times over.
    A response it returns is read and closed."""
    def run():
        try:
            result = function()
        except Exception as error:  # the caller asserts on it
            return error
        return done(result) if hasattr(result, "close") else result

    # NB: tracemalloc counts every thread's allocations: a training job that an earlier test
    # module left running (an app fixture not closed) would count as this call's.
    deadline = time.monotonic() + 120
    while running := [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]:
        assert time.monotonic() < deadline, f"training jobs still run here: {running}\n" + \
            "\n".join(f"{t.name}:\n{''.join(traceback.format_stack(sys._current_frames()[t.ident]))}"
                      for t in threading.enumerate() if t.name.startswith("training-runner"))
        time.sleep(0.1)
    started = time.perf_counter()
    outcome = run()
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return outcome, elapsed, peak


@pytest.mark.parametrize("declared", [None, 3], ids=["counted in the end record", "understated"])
def test_a_million_directory_entries_are_refused_before_zipfile_parses_them(declared):
    upload = central_directory_zip(1_000_000, declared)  # 47 MB; zipfile took 343 MB and 4.6 s

    raised, elapsed, peak = cost(lambda: read_dataset_zip(io.BytesIO(upload), DatasetLimits()))

    assert isinstance(raised, PayloadTooLarge) and "limit of 20000" in raised.detail
    assert elapsed < 1 and peak < 20, (elapsed, peak)


def test_the_entry_limit_still_counts_a_real_zip_exactly():
    members = four_images(**{"cat/": b"", "dog/": b""})  # 6 entries

    with pytest.raises(PayloadTooLarge, match="limit of 5"):
        read_dataset_zip(zip_of(members), DatasetLimits(max_members=5))
    assert read_dataset_zip(zip_of(members), DatasetLimits(max_members=6)).labels == ["cat", "dog"]


def test_more_labels_than_the_limit_are_refused_before_any_image_is_read():
    folders = {f"label-{i:03d}/": b"" for i in range(999)}  # and cat, dog; 10,000 made a 6.6 GB matrix

    with pytest.raises(Unprocessable, match="1001 labels .* more than the limit of 1000"):
        read_dataset_zip(zip_of(four_images(**folders)))


def test_a_label_name_longer_than_a_file_name_is_refused():
    with pytest.raises(Unprocessable, match="longer than 255 characters"):
        read_dataset_zip(zip_of(four_images(**{"x" * 300 + "/1.png": encoded("PNG")})))


def test_solid_colour_bitmaps_are_kept_as_small_pngs_that_decode_to_the_same_pixels():
    bitmap = io.BytesIO()
    Image.new("RGB", (2_000, 2_000), (20, 140, 60)).save(bitmap, "BMP")  # 12 MB
    members = {f"{label}/{i}.bmp": bitmap.getvalue() for label in ("cat", "dog") for i in range(2)}

    dataset = read_dataset_zip(zip_of(members))

    assert len(dataset.images) == 4
    assert sum(len(image.data) for image in dataset.images) < 1_000_000
    assert np.array_equal(load_image(dataset.images[0].data, 32),
                          load_image(bitmap.getvalue(), 32))


def test_a_dataset_decoding_to_more_pixels_than_the_budget_is_refused_before_decoding():
    big = encoded("PNG", (1_000, 1_000))

    with pytest.raises(PayloadTooLarge, match="more than 1,500,000 pixels"):
        read_dataset_zip(zip_of(four_images(**{"cat/big.png": big, "dog/big.png": big})),
                         DatasetLimits(max_dataset_pixels=1_500_000))


def test_thin_bombs_in_a_dataset_are_skipped_at_once():
    bomb = thin_png(1, 40_000_000)  # eight of them in a 4.3 KB zip took 13.6 s and were accepted
    members = four_images(**{f"cat/bomb-{i}.png": bomb for i in range(8)})
    started = time.perf_counter()

    dataset = read_dataset_zip(zip_of(members))

    assert time.perf_counter() - started < 2
    assert len(dataset.skipped) == 8 and "one side is more than 100" in dataset.skipped[0].reason


# ---------------------------------------------------------------- requests (items 2, 3, 6, 7)

TINY_TRAINING = '{"max_epochs": 2, "augmentation": {"views": 0}, ' \
                '"head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}'
MISSING = "/v1/classifiers/clf_00000000000000000000/predict"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with ready_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                            weights_cache=root / "cache", max_predict_images=8)) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def upload(client, members: dict[str, bytes], options: str = TINY_TRAINING):
    body, content_type = multipart({"dataset": [("dataset.zip", zip_of(members).getvalue())],
                                    "options": options})
    return done(client.post("/v1/classifiers", data=body, content_type=content_type))


@pytest.fixture(scope="module")
def ready(client) -> str:
    """The predict URL of a trained classifier."""
    created = upload(client, four_images())
    assert created.status_code == 202, created.json
    url = f"/v1/classifiers/{created.json['id']}"
    deadline = time.monotonic() + 120
    while (status := client.get(url).json["status"]) != "ready":
        assert status in ("queued", "training") and time.monotonic() < deadline, status
        time.sleep(0.1)
    return url + "/predict"


# 1.5 M empty instances in 4.5 MB: 3.4 GB, 17.7 s and a 283 MB 422, with no classifier behind it.
EMPTY_INSTANCES = b'{"instances": [' + b"{}," * 1_499_999 + b"{}]}"


@pytest.mark.parametrize("to", ["missing", "ready"])
def test_a_body_of_a_million_empty_instances_costs_little(client, ready, to):
    url = MISSING if to == "missing" else ready

    response, elapsed, peak = cost(lambda: client.post(url, data=EMPTY_INSTANCES,
                                                       content_type="application/json"))

    assert peak < 100 and elapsed < 1, (peak, elapsed)
    assert response.status_code == (404 if to == "missing" else 400), response.json
    assert len(response.data) < 1_000
    if to == "ready":
        assert "more JSON values than the limit of 36" in response.json["detail"]


def test_half_a_million_empty_images_are_refused_before_parsing(client, ready):
    body = b'{"instances": [' + b'{"b64": ""},' * 499_999 + b'{"b64": ""}]}'

    response, elapsed, peak = cost(lambda: client.post(ready, data=body,
                                                       content_type="application/json"))

    assert peak < 100 and elapsed < 1, (peak, elapsed)
    assert response.status_code == 400 and "more JSON values" in response.json["detail"]


def test_nine_instances_are_counted_as_images(client, ready):
    body = {"instances": [{"b64": ""}] * 9}

    response = done(client.post(ready, json=body))

    assert response.status_code == 400 and "9 images in one request" in response.json["detail"]


@pytest.mark.parametrize("what", ["field", "file"])
def test_an_options_part_of_many_keys_is_refused_by_size(client, what):
    options = "{" + ",".join(f'"k{i}": 0' for i in range(500_000)) + "}"  # 52 MB 422, 650 MB

    body, content_type = multipart({
        "dataset": [("dataset.zip", zip_of(four_images()).getvalue())],
        "options": options if what == "field" else [("options.json", options.encode())]})

    def post():
        return client.post("/v1/classifiers", data=body, content_type=content_type)

    response, elapsed, peak = cost(post)

    assert response.status_code == 413, response.json
    assert ("form field is larger than the limit of 262144 bytes" if what == "field" else
            "options part is larger than the limit of 262144 bytes") in response.json["detail"]
    assert elapsed < 2 and peak < 100, (elapsed, peak)


def test_a_problem_lists_twenty_field_errors_and_counts_the_rest(client):
    options = "{" + ",".join(f'"k{i}": 0' for i in range(900)) + "}"

    response = upload(client, four_images(), options)

    assert response.status_code == 422
    assert len(response.json["errors"]) == 20 and response.json["errors_total"] == 900
    assert response.json["detail"].endswith("(and 897 more)")
    assert len(response.data) < 5_000


def test_a_thousand_and_one_parts_are_named_as_the_limit(client):
    body, content_type = multipart({"dataset": [("dataset.zip", zip_of(four_images()).getvalue())],
                                    "x": [(None, b"") for _ in range(1_000)]})

    response = done(client.post("/v1/classifiers", data=body, content_type=content_type))

    assert response.status_code == 413
    assert response.json["detail"] == "the multipart body has more than 1000 parts, the limit"


def test_a_body_over_the_upload_limit_is_still_named_as_such(client, ready):
    response = done(client.post(ready, data=b"x" * (64 * 2**20 + 1),
                                content_type="application/json"))

    assert response.status_code == 413
    assert response.json["detail"] == ("the request body is larger than the limit of 67108864 "
                                       "bytes (HEADSTART_MAX_PREDICT_BYTES)")


def test_a_full_temporary_directory_is_a_503_with_retry_after(client, monkeypatch):
    # NB: /dev/full is a real device whose every write fails with ENOSPC, as a full TMPDIR does.
    monkeypatch.setattr(tempfile, "TemporaryFile",
                        lambda *args, **kwargs: open("/dev/full", "w+b", buffering=0))
    noise = np.random.default_rng(0).bytes(600_000)  # Werkzeug spools a part past 500 KB

    response = upload(client, four_images(**{"cat/noise.bin": noise}))

    assert response.status_code == 503, response.json
    assert int(response.headers["Retry-After"]) > 0
    assert "no disk space left" in response.json["detail"]


def test_a_zip_of_many_junk_names_keeps_a_count_and_the_first_hundred(client):
    junk = {f"cat/junk-{i:04d}-{'x' * 400}.txt": b"not an image" for i in range(500)}

    response = upload(client, four_images(**junk))

    assert response.status_code == 202, response.json
    dataset = response.json["dataset"]
    assert dataset["skipped_total"] == 500 and len(dataset["skipped"]) == 100
    assert all(len(entry["path"]) <= 301 for entry in dataset["skipped"])
    assert "…" in dataset["skipped"][0]["path"]


def test_decoding_counts_against_the_predict_timeout(app, ready):
    services = app.extensions["headstart"]
    impatient = dataclasses.replace(services, settings=services.settings.model_copy(
        update={"predict_timeout_s": 0.05}))
    large = encoded("PNG", (3_000, 3_000))
    record = prediction.servable_record(services, ready.split("/")[3])

    with pytest.raises(ServiceUnavailable, match="decoding the first 1 of 4 images"):
        prediction.predict(impatient, record, [large] * 4, 1)


# ---------------------------------------------------------------- nothing accepted is lost (item 5)


def test_a_failed_record_write_leaves_no_dataset_behind(app, client, monkeypatch):
    blobs = app.extensions["headstart"].store.blobs
    before = {path for path in blobs.root.rglob("dataset.zip")}

    def unavailable(*args, **kwargs):  # the store, briefly full, after the dataset went in
        raise StoreUnavailable("store directory: no space left on device")

    monkeypatch.setattr(blobs, "put_if", unavailable)
    response = upload(client, four_images())

    assert response.status_code == 503, response.json
    assert {path for path in blobs.root.rglob("dataset.zip")} == before


def test_the_lost_job_sweep_runs_in_local_mode_too(app):
    assert app.extensions["headstart"].settings.queue == "local"
    assert "lost-job-sweeper" in {thread.name for thread in threading.enumerate()}


# ---------------------------------------------------------------- slow clients (item 1)

HEADER_TIMEOUT_S = 2  # the server's, so that a test waits seconds, not the default's ten
CONNECTIONS = 40  # gunicorn's worker_connections (1000 by default)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real gunicorn with 8 request threads, 2 upload slots and room for 40 connections."""
    with gunicorn_server(tmp_path_factory.mktemp("slow"), HEADSTART_WEB_THREADS="8",
                         HEADSTART_MAX_CONCURRENT_UPLOADS="2",
                         HEADSTART_CLIENT_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                         GUNICORN_CMD_ARGS=f"--worker-connections {CONNECTIONS}") as running:
        base, _, _ = running
        yield int(base.rsplit(":", 1)[1]), running[1], running[2]


def timed_get(port: int, path: str) -> tuple[int, float]:
    started = time.monotonic()
    status, _, _ = call("GET", f"http://127.0.0.1:{port}{path}", timeout=10)
    return status, time.monotonic() - started


@pytest.fixture
def connect(server):
    """Opens connections to the server; closes them after the test."""
    opened = []

    def open_connection() -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", server[0]), timeout=10))
        return opened[-1]

    yield open_connection
    for sock in opened:
        sock.close()


def response_of(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


class Trickle(threading.Thread):
    """Sends `head` and then one more byte every `every_s`, as a slowloris client does."""

    def __init__(self, sock: socket.socket, head: bytes, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.sock, self.head, self.every_s = sock, head, every_s
        self.stop = threading.Event()

    def run(self):
        try:
            self.sock.sendall(self.head)
            while not self.stop.wait(self.every_s):
                self.sock.sendall(b"X")
        except OSError:
            pass  # cut off by the server


def test_eight_slow_clients_leave_health_and_other_requests_answered(server, connect):
    port, _, _ = server
    slow = [Trickle(connect(), b"GET /v1/classifiers HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(8)]
    for client in slow:
        client.start()
    time.sleep(0.5)  # they hold all 8 threads' worth of connections now

    health, health_s = timed_get(port, "/healthz")
    listed, listed_s = timed_get(port, "/v1/classifiers")
    answers = [response_of(client.sock, timeout=HEADER_TIMEOUT_S + 5) for client in slow]
    for client in slow:
        client.stop.set()

    assert health == 200 and health_s < 1, health_s
    assert listed == 200 and listed_s < 1, listed_s
    for answer in answers:  # cut off once the header timeout passed
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"application/problem+json" in answer and b"did not arrive within 2 s" in answer


def test_stalled_upload_bodies_hold_no_upload_slot_and_are_cut_off(server, connect):
    port, _, _ = server
    body, content_type = multipart({"dataset": [("d.zip", zip_of(four_images()).getvalue())],
                                    "options": TINY_TRAINING})
    head = (f"POST /v1/classifiers HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) + 1_000_000}\r\n\r\n").encode()
    stalled = [connect() for _ in range(4)]  # twice the upload slots
    for sock in stalled:
        sock.sendall(head + body[:1_000])
    time.sleep(0.5)

    status, _, created = call("POST", f"http://127.0.0.1:{port}/v1/classifiers", body,
                              content_type)
    answers = [response_of(sock, timeout=HEADER_TIMEOUT_S + 5) for sock in stalled]

    assert status == 202, created
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"slower than 32768 bytes/s" in answer


def test_the_probe_is_answered_while_every_request_thread_is_busy(server, connect):
    port, _, _ = server
    # Chunked bodies go to a thread at once (their length is unknown), where a stalled one holds
    # it until the minimum rate says otherwise: eight of them take all eight threads.
    head = (b"POST /v1/classifiers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n10\r\n--b\r\nContent-Dis")
    busy = [connect() for _ in range(8)]
    for sock in busy:
        sock.sendall(head)
    time.sleep(0.5)

    health, health_s = timed_get(port, "/healthz")
    answers = [response_of(sock, timeout=HEADER_TIMEOUT_S + 5) for sock in busy]

    assert health == 200 and health_s < 1, health_s
    for answer in answers:  # the app itself answers the stalled body
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:"))
               .split()[1]) / 1024


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Sends a request while reading the answer, as a client must when the server may answer
    before the body has been sent."""
    def send():
        with contextlib.suppress(OSError):
            sock.sendall(request)

    threading.Thread(target=send, daemon=True).start()
    return response_of(sock, timeout=10)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_an_amplifying_body_costs_the_server_little_over_http(server, connect):
    port, master, _ = server
    pid = worker_pid(master.pid)
    request = (b"POST /v1/classifiers/clf_00000000000000000000/predict HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n" % len(EMPTY_INSTANCES)) + EMPTY_INSTANCES
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak to the current RSS
    before = peak_rss_mib(pid)
    started = time.monotonic()

    answer = exchange(connect(), request)

    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert elapsed < 1 and peak_rss_mib(pid) - before < 100, (elapsed, peak_rss_mib(pid) - before)


def test_a_client_that_does_not_read_its_response_is_disconnected():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(listener.getsockname())
        served, _ = listener.accept()
    guarded = GuardedSocket(served, ClientLimits(header_timeout_s=0.2, min_bytes_per_s=64 * 2**20))
    started = time.monotonic()

    with pytest.raises(ConnectionResetError, match="too slow"):
        guarded.sendall(bytes(32 * 2**20))  # allowed 0.2 s + 0.5 s; the reader reads nothing

    assert time.monotonic() - started < 5
    served.close()
    reader.close()


def test_clients_that_never_close_their_end_do_not_stall_the_server(server, connect):
    port, _, _ = server
    # gthread lingered over each such connection on its event loop, for up to 2 s apiece.
    idle = [connect() for _ in range(8)]
    for sock in idle:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    time.sleep(0.5)

    health, health_s = timed_get(port, "/healthz")

    assert health == 200 and health_s < 1, health_s
    assert all(response_of(sock, timeout=5).startswith(b"HTTP/1.1 200 ") for sock in idle)


def test_more_idle_connections_than_the_worker_holds_do_not_lock_clients_out(server, connect):
    port, _, _ = server
    idle = [connect() for _ in range(CONNECTIONS + 10)]  # gthread stopped accepting at 40
    idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and some have started a request
    time.sleep(0.5)

    health, health_s = timed_get(port, "/healthz")

    assert health == 200 and health_s < 1, health_s
