"""The `headstart` console script, installed as pip installs it, run as a user runs it against a
real gunicorn (random weights, 32 px); and the folder zip it streams."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest

from service import cli
from service.client import (DEFAULT_URL, Event, Multipart, dataset_files, expand_images,
                            parse_events, zip_stream)
from tools.localservers import free_port
from tests.helpers import checkerboard, dataset_zip, labelled_images
from tests.live import ADMIN_KEY, PREDICT_KEY, start_server

HEADSTART = Path(sys.executable).parent / "headstart"
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"max_epochs": 20, "augmentation": {"views": 1},
           "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}


def headstart(*args: str, url: str, key: str | None = ADMIN_KEY, timeout: float = 180,
              stdin=subprocess.DEVNULL, **env: str) -> subprocess.CompletedProcess:
    """Runs the installed console script with a clean HEADSTART_* environment."""
    assert HEADSTART.exists(), f"{HEADSTART} is missing: `pip install -e .` installs the CLI"
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("HEADSTART_")}
    # NB: the console script may be installed from another checkout: import this one's code
    environment.update({"HEADSTART_URL": url, "PYTHONPATH": str(ROOT), **env})
    if key:
        environment["HEADSTART_API_KEY"] = key
    return subprocess.run([str(HEADSTART), *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    with start_server(tmp, HEADSTART_API_KEYS=f"{ADMIN_KEY}:admin,{PREDICT_KEY}:predict") as live:
        yield live


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of label folders, as a user has it: photos/red/*.png, photos/blue/*.png."""
    folder = tmp_path_factory.mktemp("photos")
    for name, data in labelled_images(20).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden files stay out of the upload
    return folder


@pytest.fixture(scope="module")
def created(server, photos) -> tuple[str, subprocess.CompletedProcess]:
    result = headstart("create", str(photos), "--name", "toys", "--options", json.dumps(OPTIONS),
                       "--wait", url=server.url)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[0], result


def test_create_a_folder_with_wait_shows_progress_then_the_summary(created):
    classifier_id, result = created

    assert classifier_id.startswith("clf_")
    progress = result.stderr.splitlines()
    assert progress[0].startswith("uploaded ") and "40 images" in progress[0]
    assert "status: training" in progress and progress[-1] == "done: ready"
    assert any(line.startswith("training: epoch ") for line in progress), result.stderr
    # An exact fit has no epoch limit to show ("epoch 3", not "epoch 3/?"), and the queued
    # status is said once, not again as a bare progress line.
    assert not any("/?" in line for line in progress) and "queued" not in progress, progress
    # Staged: the preview head is served first, and `done` comes after the last stage.
    assert "status: ready · refining" in progress
    assert progress.index("status: ready · refining") < progress.index("status: ready")
    assert any(line.endswith("[augmented]") for line in progress), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{classifier_id} toys: ready"
    summary = dict(line.split(None, 1) for line in lines[1:4])
    assert {"validation", "d", "m"} <= set(summary)
    assert lines[4].startswith("d/m ") and "diagnosis:" in lines
    assert "trainable parameters" in summary["d"] and "training examples" in summary["m"]


def test_list_and_show(server, created):
    classifier_id, _ = created
    listed = headstart("list", url=server.url, key=PREDICT_KEY)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["ID", "NAME", "STATUS", "LABELS", "VAL_ACC",
                                                     "CREATED"]
    assert any(line.split()[:3] == [classifier_id, "toys", "ready"]
               for line in listed.stdout.splitlines())

    shown = headstart("show", classifier_id, url=server.url)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert fields["status"] == "ready" and fields["labels"] == "blue, red"
    assert fields["stage"].split()[0] in ("preview", "augmented")
    assert fields["images"] == "40 (blue 20, red 20)"


def test_json_prints_exactly_the_apis_documents(server, created):
    classifier_id, _ = created
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    report = headstart("report", classifier_id, "--json", url=server.url)
    assert report.returncode == 0, report.stderr
    assert report.stdout == httpx.get(f"{server.url}/v1/classifiers/{classifier_id}/report",
                                      headers=headers).text + "\n"
    assert json.loads(report.stdout)["d"] > 0

    shown = headstart("--json", "show", classifier_id, url=server.url)
    assert json.loads(shown.stdout) == httpx.get(f"{server.url}/v1/classifiers/{classifier_id}",
                                                 headers=headers).json()

    human = headstart("report", classifier_id, url=server.url)
    assert human.returncode == 0 and "confusion matrix" in human.stdout
    assert "validation accuracy" in human.stdout
    # once the last stage has run, the report says why fine-tuning ran or not
    tuning = json.loads(headstart("report", classifier_id, "--json", url=server.url).stdout)
    if (tuning.get("fine_tuning") or {}).get("reason"):
        shown_reason = [line for line in headstart("report", classifier_id, url=server.url)
                        .stdout.splitlines() if line.startswith("fine-tuning ")]
        assert shown_reason and shown_reason[0].endswith(tuning["fine_tuning"]["reason"])


def test_predict_expands_globs_and_batches_32_to_a_request(server, created, photos):
    classifier_id, _ = created
    before = server.log.read_text().count(f"POST /v1/classifiers/{classifier_id}/predict")
    # NB: no shell here, so the pattern reaches the CLI unexpanded, as on shells that do not
    # expand it.
    result = headstart("predict", classifier_id, str(photos / "*" / "*.png"), "--top-k", "2",
                       url=server.url, key=PREDICT_KEY)
    assert result.returncode == 0, result.stderr

    header, *rows = result.stdout.splitlines()
    assert header.split() == ["FILE", "LABEL", "SCORE", "OTHERS"]
    files = sorted(str(path) for path in photos.glob("*/*.png"))
    assert [row.split()[0] for row in rows] == files
    assert all(row.split()[1] in ("red", "blue") for row in rows)
    assert all(row.split()[3] in ("red", "blue") for row in rows)  # the other label, top_k 2
    deadline = time.monotonic() + 10  # the access log line follows the response
    while (after := server.log.read_text().count(f"POST /v1/classifiers/{classifier_id}/predict"
                                                 )) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after - before == 2  # 40 images: 32, then 8

    one = headstart("predict", classifier_id, files[0], "--json", url=server.url)
    document = json.loads(one.stdout)
    assert document["classifier_id"] == classifier_id and len(document["predictions"]) == 1


def test_a_refused_image_is_named_by_its_file_not_its_place_in_a_request(server, created,
                                                                         photos, tmp_path):
    import shutil

    classifier_id, _ = created
    for path in photos.glob("*/*.png"):
        shutil.copy(path, tmp_path / f"{path.parent.name}-{path.name}")
    broken = tmp_path / "zz-broken.png"  # sorted last: the 9th image of the second request
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG")
    result = headstart("predict", classifier_id, str(tmp_path), url=server.url,
                       key=PREDICT_KEY)
    assert result.returncode == 1
    assert f"(422): {broken}: " in result.stderr and "image 8" not in result.stderr


def test_predict_shows_rejection_and_report_shows_calibration_and_health(server, created,
                                                                         tmp_path):
    classifier_id, _ = created
    board = tmp_path / "board.png"
    board.write_bytes(checkerboard())
    answers = headstart("predict", classifier_id, str(board), "--top-k", "2", url=server.url,
                        key=PREDICT_KEY)
    assert answers.returncode == 0, answers.stderr
    row = answers.stdout.splitlines()[1].split()
    # the score shown is the best label's, so the row names that label
    assert row[:5] == [str(board), "not", "recognised", "(out_of_distribution),", "best"]
    assert {row[5], row[7]} == {"red", "blue"}  # the best label, then the other (top_k 2)
    shown = headstart("report", classifier_id, url=server.url)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines()
                  if line.startswith(("calibration ", "threshold ")))
    report = httpx.get(f"{server.url}/v1/classifiers/{classifier_id}/report",
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert fields["calibration"].startswith(
        f"temperature {report['calibration']['temperature']:.3f}, ECE ")
    assert fields["threshold"].startswith(f"{report['threshold']:.3f}")
    assert "dataset health:" in shown.stdout
    assert "  images per label: blue 20, red 20" in shown.stdout.splitlines()


def test_suggest_ranks_a_folder_of_unlabeled_images_as_the_api_does(server, created, photos,
                                                                     tmp_path):
    classifier_id, _ = created
    unlabeled = tmp_path / "unlabeled"
    (unlabeled / "batch").mkdir(parents=True)
    for index, image in enumerate(sorted((photos / "red").iterdir())[:3]
                                  + sorted((photos / "blue").iterdir())[:3]):
        (unlabeled / "batch" / f"{index}.png").write_bytes(image.read_bytes())
    (unlabeled / "board.png").write_bytes(checkerboard())

    shown = headstart("suggest", classifier_id, str(unlabeled), "--limit", "4", url=server.url)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "4 of 7 images, by margin:", lines
    assert lines[1].split() == ["PATH", "UNCERTAINTY", "PREDICTED", "SCORE", "NOTE"]
    as_json = headstart("--json", "suggest", classifier_id, str(unlabeled), "--limit", "7",
                        "--method", "entropy", url=server.url)
    document = json.loads(as_json.stdout)
    assert document["method"] == "entropy" and document["images"] == 7
    ranked = [entry["path"] for entry in document["suggestions"]]
    assert sorted(ranked) == sorted(["board.png"] + [f"batch/{i}.png" for i in range(6)])
    # the checkerboard is out of distribution: last, and the table says so
    assert ranked[-1] == "board.png" and document["suggestions"][-1]["out_of_distribution"]
    everything = headstart("suggest", classifier_id, str(unlabeled), "--limit", "7",
                           url=server.url).stdout.splitlines()
    assert everything[-1].split()[0] == "board.png"
    assert everything[-1].endswith("out of distribution")
    refused = headstart("suggest", classifier_id, str(unlabeled), url=server.url,
                        key=PREDICT_KEY)
    assert refused.returncode == 1 and "Forbidden (403)" in refused.stderr


def test_export_waits_for_the_build_then_writes_the_zip(server, created, tmp_path):
    classifier_id, _ = created
    target = tmp_path / "model.zip"
    result = headstart("export", classifier_id, "--format", "onnx", "-o", str(target),
                       url=server.url, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        assert {"labels.json", "model-card.json", "README.md"} <= names
        assert any(name.endswith(".onnx") for name in names)
        assert json.loads(archive.read("labels.json")) == ["blue", "red"]
    refused = headstart("export", classifier_id, "--format", "onnx", "-o", str(target),
                        url=server.url, key=PREDICT_KEY)
    assert refused.returncode == 1 and "Forbidden (403)" in refused.stderr


def test_add_a_version_list_versions_alias_and_predict_by_version(server, created, tmp_path):
    classifier_id = created[0]
    more = tmp_path / "more"
    for name, data in labelled_images(4, labels=("green",)).items():
        (more / name).parent.mkdir(parents=True, exist_ok=True)
        (more / name).write_bytes(data)
    added = headstart("add", classifier_id, str(more), "--wait", "--options",
                      json.dumps({"promote": "never"}), url=server.url)
    assert added.returncode == 0, added.stderr
    shown = dict(line.split(None, 1) for line in added.stdout.splitlines())
    assert (shown["version"], shown["status"], shown["aliases"]) == ("2", "ready", "-")
    assert shown["production"] == "not taken: promote: never"
    assert shown["images"] == "44 (blue 20, green 4, red 20)"
    listed = headstart("versions", classifier_id, url=server.url, key=PREDICT_KEY)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(row[0], row[1], row[3], row[5]) for row in rows] == \
        [("2", "ready", "3", "-"), ("1", "ready", "2", "production")]
    image = tmp_path / "green.png"
    image.write_bytes(labelled_images(1, labels=("green",))["green/0.png"])
    by_version = headstart("predict", classifier_id, str(image), "--version", "2", "--json",
                           url=server.url, key=PREDICT_KEY)
    assert json.loads(by_version.stdout)["version"] == 2
    moved = headstart("alias", classifier_id, "production", "2", url=server.url)
    assert moved.returncode == 0 and "production -> version 2" in moved.stdout
    assert json.loads(headstart("predict", classifier_id, str(image), "--json", url=server.url,
                                key=PREDICT_KEY).stdout)["version"] == 2
    refused = headstart("alias", classifier_id, "production", "1", url=server.url,
                        key=PREDICT_KEY)
    assert refused.returncode == 1 and "403" in refused.stderr
    assert headstart("alias", classifier_id, "production", "1", url=server.url).returncode == 0
    assert headstart("predict", classifier_id, str(image), "--version", "1", "--alias", "x",
                     url=server.url).returncode == 2


def test_create_a_zip_without_wait_then_delete_it(server, tmp_path):
    archive = tmp_path / "toys.zip"
    archive.write_bytes(dataset_zip(3))
    created = headstart("--json", "create", str(archive), "--options", json.dumps(OPTIONS),
                        url=server.url)
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["status"] == "queued" and document["dataset"]["images"] == 6

    # On a terminal, delete names the classifier and asks; "n" keeps it.
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        kept = headstart("delete", document["id"], url=server.url, stdin=terminal)
    finally:
        os.close(controller), os.close(terminal)
    assert kept.returncode == 1 and "Aborted" in kept.stderr, kept.stderr
    assert f"Delete {document['id']} " in kept.stderr and "every version?" in kept.stderr
    assert headstart("show", document["id"], url=server.url).returncode == 0

    deleted = headstart("delete", document["id"], url=server.url)  # not a terminal: no question
    assert deleted.returncode == 0 and deleted.stdout == f"deleted {document['id']}\n"
    gone = headstart("show", document["id"], url=server.url)
    assert gone.returncode == 1 and "Not found (404)" in gone.stderr


def test_api_errors_exit_1_with_the_problems_title_and_detail(server):
    result = headstart("show", "clf_00000000000000000000", url=server.url)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "headstart: Not found (404): no classifier " \
                            "'clf_00000000000000000000'\n"

    forbidden = headstart("delete", "clf_00000000000000000000", url=server.url, key=PREDICT_KEY)
    assert forbidden.returncode == 1 and "Forbidden (403)" in forbidden.stderr
    no_key = headstart("list", url=server.url, key=None)
    assert no_key.returncode == 1 and "Unauthorized (401)" in no_key.stderr
    flag = headstart("--key", PREDICT_KEY, "list", url=server.url, key=None)
    assert flag.returncode == 0, flag.stderr


def test_usage_errors_exit_2(server, photos, tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    for args in [("create",), ("predict", "clf_00000000000000000000"), ("frobnicate",),
                 ("create", str(photos), "--options", "{not json"),
                 ("create", str(photos), "--options", "[1, 2]"),
                 ("create", str(tmp_path / "notes.txt")),
                 ("predict", "clf_00000000000000000000", str(tmp_path / "*.jpg")),
                 ("predict", "clf_00000000000000000000", "a.png", "--top-k", "0")]:
        result = headstart(*args, url=server.url)
        assert result.returncode == 2, (args, result.stderr)
        assert "Usage:" in result.stderr or "Error:" in result.stderr, (args, result.stderr)


def test_a_refused_connection_is_one_clear_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    result = headstart("list", url=url)
    assert result.returncode == 1
    assert result.stderr == f"headstart: cannot connect to {url}: Connection refused\n"


def test_the_cli_imports_nothing_heavy_and_its_help_is_quick():
    check = ("import sys, service.cli, service.client; "
             "heavy = {'tensorflow', 'numpy', 'PIL', 'keras', 'flask'} & set(sys.modules); "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)

    started = time.perf_counter()
    result = subprocess.run([str(HEADSTART), "--help"], capture_output=True, text=True,
                            timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "create" in result.stdout and "predict" in result.stdout
    assert elapsed < 1.0, f"headstart --help took {elapsed:.2f} s"


# ---------------------------------------------------------------- the folder zip


def test_a_folders_zip_streams_in_bounded_chunks_and_unzips_to_its_files(tmp_path):
    files = {"red/big.png": os.urandom(3 * 1024 * 1024), "blue/a.png": b"blue",
             "blue/nested/b.jpg": os.urandom(200_000), "red/empty.png": b""}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"x")
    chunk = 64 * 1024

    tracemalloc.start()
    total = largest = 0
    for part in zip_stream(dataset_files(tmp_path), chunk_bytes=chunk):
        total, largest = total + len(part), max(largest, len(part))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 3 * 1024 * 1024
    assert largest <= chunk + 1024  # a block of a member, or headers: never the archive
    assert peak < 1024 * 1024, f"{peak} bytes held while streaming a {total}-byte zip"

    archive = zipfile.ZipFile(io.BytesIO(b"".join(zip_stream(dataset_files(tmp_path)))))
    assert archive.testzip() is None
    assert {name: archive.read(name) for name in archive.namelist()} == files


def test_multipart_bodies_know_their_length_when_every_part_does():
    form = Multipart()
    form.add("options", b'{"name": "toys"}')
    form.add("dataset", iter([b"PK", b"\x03\x04", b"rest"]), filename='a"b.zip',
             content_type="application/zip", size=8)
    body = b"".join(form.chunks())
    assert form.length() == len(body)
    assert b'filename="a%22b.zip"' in body and body.endswith(f"--{form.boundary}--\r\n".encode())
    form.add("more", iter([b"?"]))
    assert form.length() is None  # then it goes chunked


def test_the_event_parser_follows_the_sse_rules():
    lines = [": keep-alive", "", "retry: 1000", "", "id: 1.0.x", "event: status",
             'data: {"a":', "data: 1}", "", "event: progress", "data: {}", ""]
    assert list(parse_events(lines)) == [Event("status", {"a": 1}, "1.0.x"),
                                         Event("progress", {}, "1.0.x")]  # ids carry over


def test_images_are_files_folders_or_patterns_each_once(tmp_path):
    for name in ("a.png", "b.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_images([str(tmp_path / "*.png"), str(tmp_path / "a.png"), str(tmp_path)]) == [
        tmp_path / "a.png", tmp_path / "b.jpg"]
    with pytest.raises(ValueError, match="no file matches"):
        expand_images([str(tmp_path / "*.gif")])
    assert DEFAULT_URL == cli.DEFAULT_URL


def test_a_refining_classifier_reads_ready_refining_with_its_stage():
    refining = {"status": "ready", "refining": True,
                "progress": {"stage": "extracting", "images_done": 3, "images_total": 8,
                             "training_stage": "augmented"}}
    assert cli._status_text(refining) == "ready · refining (augmented)"
    assert cli._status_text({"status": "ready", "refining": False}) == "ready"
    assert cli._progress_text(refining["progress"]) == "extracting: 3/8 images [augmented]"
