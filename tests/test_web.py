"""The web app in a real browser (Debian's chromium, driven by Playwright) against a real gunicorn
with random weights at 32 px: create from a folder, follow training, read the report, try an
image, delete; a 360 px screen by keyboard only; axe-core; API keys; the API docs. Each test
leaves a screenshot of its view in docs/screenshots/ (the README shows them).

Skips when /usr/bin/chromium is missing (`apt-get install chromium`), unless
HEADSTART_TEST_REQUIRE_SERVERS is set (CI), where it fails instead."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.localservers import free_port
from tests.helpers import (COLOURS, checkerboard, dataset_zip, image_bytes, labelled_images,
                           make_zip, multipart)

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Fast but real training: a linear head, one augmented view, no early stop before 25 epochs.
FAST = {"max_epochs": 25, "patience": 25, "augmentation": {"views": 1},
        "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}
#: Slow enough to watch: a 256-unit head, until 200 epochs bring no progress (seconds).
SLOW = {"max_epochs": 1000, "patience": 200, "augmentation": {"views": 2},
        "head": {"hidden_units": 256, "dropout": 0.5, "l2": 0.001}}
ADMIN_KEY, PREDICT_KEY = "web-admin-key-0123456789", "web-predict-key-0123456789"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: apt-get install chromium"
        if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@contextmanager
def gunicorns(tmp: Path, *configs: dict[str, str]):
    """`make run`'s server with random weights at 32 px, once per config (extra environment),
    each on a free port, started together; yields their base URLs."""
    processes, bases = [], []
    for number, extra in enumerate(configs):
        folder = tmp / f"server-{number}"
        folder.mkdir()
        port = free_port()
        env = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(folder / "store"),
               "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
               "HEADSTART_WEIGHTS_CACHE": str(folder / "cache"), **extra}
        with open(folder / "server.log", "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py",
                 "service.wsgi:app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        bases.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        for process, base, number in zip(processes, bases, range(len(configs))):
            while call("GET", base + "/readyz")[0] != 200:
                assert process.poll() is None and time.monotonic() < deadline, \
                    (tmp / f"server-{number}" / "server.log").read_text()
                time.sleep(0.25)
        yield bases
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)


def call(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
         key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def create(base: str, key: str | None = None, per_label: int = 4, options=FAST) -> str:
    body, content_type = multipart({"dataset": [("toys.zip", dataset_zip(per_label))],
                                    "options": json.dumps(options)})
    status, answer = call("POST", base + "/v1/classifiers", body, content_type, key)
    assert status == 202, answer
    return json.loads(answer)["id"]


def wait_ready(base: str, classifier_id: str, key: str | None = None) -> None:
    deadline = time.monotonic() + 120
    while (status := json.loads(call("GET", f"{base}/v1/classifiers/{classifier_id}",
                                     key=key)[1])["status"]) != "ready":
        assert status in ("queued", "training") and time.monotonic() < deadline, status
        time.sleep(0.25)


def wait_refined(base: str, classifier_id: str) -> None:
    """Until the classifier is ready and its last stage has run."""
    wait_ready(base, classifier_id)
    deadline = time.monotonic() + 120
    while json.loads(call("GET", f"{base}/v1/classifiers/{classifier_id}")[1])["refining"]:
        assert time.monotonic() < deadline, "still refining"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, browser):
    """An open server, and one that asks for API keys."""
    keys = {"HEADSTART_API_KEYS": f"{ADMIN_KEY}:admin,{PREDICT_KEY}:predict"}
    with gunicorns(tmp_path_factory.mktemp("web"), {}, keys) as bases:
        yield bases


@pytest.fixture(scope="module")
def server(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def keyed_server(servers) -> str:
    return servers[1]


@pytest.fixture(scope="module")
def trained(server) -> str:
    """A ready classifier made through the API."""
    classifier_id = create(server)
    wait_ready(server, classifier_id)
    return classifier_id


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []  # no uncaught script error in any test


def screenshot(page, name: str, part=None, margin: int = 16, full_page: bool = True) -> None:
    """The whole page (or what the screen shows), or one part of it with a margin around it."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    clip = None
    if part is not None:
        part.scroll_into_view_if_needed()
        box, (x, y) = part.bounding_box(), page.evaluate("[scrollX, scrollY]")
        clip = {"x": max(0, box["x"] + x - margin), "y": max(0, box["y"] + y - margin),
                "width": box["width"] + 2 * margin, "height": box["height"] + 2 * margin}
    page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page, clip=clip)


def assert_accessible(page) -> None:
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    serious = [f"{v['id']} ({v['impact']}): {v['help']} at "
               f"{[node['target'] for node in v['nodes']][:3]}"
               for v in violations if v["impact"] in ("serious", "critical")]
    assert serious == []


def photo_folder(tmp: Path, per_label: int = 6) -> Path:
    """A folder as a person has it: photos/<label>/<n>.png, plus a file the OS left behind."""
    folder = tmp / "photos"
    for name, data in labelled_images(per_label, root="photos/").items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    return folder


def test_create_from_a_folder_follow_it_read_the_report_try_it_and_delete_it(
        server, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(server)
    expect(page.get_by_role("heading", name="Classifiers")).to_be_visible()
    page.get_by_test_id("dataset-input").set_input_files(photo_folder(tmp_path))
    expect(page.get_by_text("12 images in 2 labels")).to_be_visible()
    page.get_by_text("Training options (optional)").click()
    page.get_by_test_id("options-input").fill(json.dumps({**FAST, "max_epochs": 60,
                                                           "patience": 8}))
    page.get_by_label("Name").fill("red-or-blue")
    page.get_by_test_id("create-button").click()

    # The classifier's page follows training until it is ready.
    expect(page.get_by_role("heading", name="red-or-blue")).to_be_visible()
    expect(page.get_by_test_id("progress")).to_be_visible()
    expect(page.get_by_test_id("classifier-status")).to_have_text("ready", timeout=WAIT_MS)
    expect(page.get_by_test_id("progress")).to_be_hidden(timeout=WAIT_MS)  # after refining
    expect(page.get_by_test_id("refining")).to_have_count(0)
    expect(page.locator(".title-row")).not_to_contain_text("null")  # no note: nothing at all

    # The report: d/m with its diagnosis, curves, the confusion matrix, per-label scores.
    diagnosis = page.get_by_test_id("diagnosis")
    expect(diagnosis).to_contain_text("d/m")
    expect(diagnosis.locator("li").first).to_be_visible()
    expect(page.get_by_test_id("learning-curve").locator("polyline")).to_have_count(4)
    matrix = page.get_by_test_id("confusion-matrix")
    expect(matrix.locator("tbody tr")).to_have_count(2)
    # Out of fold: every one of the 12 images is validated once.
    assert sum(int(cell) for cell in matrix.locator("td").all_inner_texts()) == 12
    expect(page.get_by_test_id("per-label")).to_contain_text("red")
    expect(page.get_by_text("None: every file in the upload was used.")).to_be_visible()
    # A new classifier's 12 images × 2 views all went through the backbone.
    expect(page.get_by_text("24 (image, view) features computed, 0 read from the "
                            "classifier's cache")).to_be_visible()
    screenshot(page, "report.png", page.locator(".report"))

    # Export: the zip is built on the server, then saved by the browser.
    page.get_by_test_id("export-format").select_option("onnx")
    with page.expect_download(timeout=300_000) as exported:
        page.get_by_test_id("export-button").click()
    assert exported.value.suggested_filename.endswith("-onnx.zip")
    with zipfile.ZipFile(exported.value.path()) as archive:
        assert "labels.json" in archive.namelist()

    # Try it: the top labels with their scores, as bars.
    page.get_by_test_id("try-input").set_input_files(
        {"name": "red.png", "mimeType": "image/png", "buffer": image_bytes(COLOURS["red"], seed=9)})
    predictions = page.get_by_test_id("prediction")
    expect(predictions).to_have_count(2)
    labels = [predictions.nth(i).get_attribute("data-label") for i in range(2)]
    scores = [float(predictions.nth(i).get_attribute("data-score")) for i in range(2)]
    assert sorted(labels) == ["blue", "red"]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-3
    screenshot(page, "try.png", page.locator("section:has([data-testid=try-input])"))
    classifier_id = page.url.rsplit("/", 1)[1]

    # The list shows it, ready, with its validation accuracy.
    page.get_by_role("link", name="All classifiers").click()
    row = page.locator(f"[data-testid=classifier-row][data-id='{classifier_id}']")
    expect(row.get_by_test_id("classifier-status")).to_have_text("ready")
    expect(row).to_contain_text("red-or-blue")
    expect(row).to_contain_text("%")

    # Delete asks first; cancelling keeps it, confirming removes it.
    row.get_by_role("link").click()
    expect(page.get_by_role("heading", name="red-or-blue")).to_be_visible()
    page.get_by_test_id("delete-button").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("red-or-blue")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    page.get_by_test_id("delete-button").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete classifier").click()
    expect(page.get_by_role("heading", name="Classifiers")).to_be_visible()
    expect(page.locator(f"[data-id='{classifier_id}']")).to_have_count(0)
    assert call("GET", f"{server}/v1/classifiers/{classifier_id}")[0] == 404


def test_the_live_view_while_a_classifier_trains_and_delete_cancels_it(server, page):
    from playwright.sync_api import expect

    classifier_id = create(server, per_label=8, options=SLOW)
    page.goto(f"{server}/#/classifiers/{classifier_id}")
    live = page.locator("section:has([data-testid=progress])")
    expect(live.get_by_test_id("progress")).to_be_visible()
    # the curve: the validation accuracy of the head being trained, epoch by epoch
    expect(live.locator("[data-testid=learning-curve] circle").nth(1)).to_be_visible(
        timeout=WAIT_MS)
    expect(live).to_contain_text("of 1000")
    screenshot(page, "classifier.png")
    assert_accessible(page)
    page.get_by_test_id("delete-button").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete classifier").click()
    expect(page.get_by_role("heading", name="Classifiers")).to_be_visible()
    assert call("GET", f"{server}/v1/classifiers/{classifier_id}")[0] == 404


#: A quick preview (logistic regressions on the un-augmented view), then a long augmented stage
#: (a hidden layer among the candidates, 1000 slow epochs per fold): refining long enough to watch.
REFINING = {"max_epochs": 1000, "patience": 200, "learning_rate": 1e-5, "augmentation": {"views": 2}}


def test_a_ready_classifier_that_still_refines_says_so_and_predicts(server, page):
    from playwright.sync_api import expect

    classifier_id = create(server, per_label=8, options=REFINING)
    page.goto(f"{server}/#/classifiers/{classifier_id}")
    expect(page.get_by_test_id("classifier-status")).to_have_text("ready", timeout=WAIT_MS)
    expect(page.get_by_test_id("refining")).to_have_text(" · refining (augmented)")
    expect(page.locator("section:has([data-testid=progress])")).to_contain_text("Refining")
    expect(page.get_by_test_id("report-preliminary")).to_contain_text("preview stage")
    page.get_by_test_id("try-input").set_input_files(
        {"name": "red.png", "mimeType": "image/png", "buffer": image_bytes(COLOURS["red"], seed=9)})
    expect(page.get_by_test_id("prediction")).to_have_count(2)
    screenshot(page, "refining.png")
    assert json.loads(call("GET", f"{server}/v1/classifiers/{classifier_id}")[1])["refining"]

    page.get_by_role("link", name="All classifiers").click()
    row = page.locator(f"[data-testid=classifier-row][data-id='{classifier_id}']")
    expect(row.get_by_test_id("classifier-status")).to_have_text("ready")
    expect(row.get_by_test_id("refining")).to_contain_text("refining")
    assert call("DELETE", f"{server}/v1/classifiers/{classifier_id}")[0] == 204  # stops it
    assert call("GET", f"{server}/v1/classifiers/{classifier_id}")[0] == 404


def test_the_report_says_whether_augmented_views_earned_their_place(server, page):
    """head "auto": the candidates table, and the paired comparison of the augmented linear
    head with the one trained on the originals only, in words."""
    from playwright.sync_api import expect

    options = {"augmentation": {"views": 1}, "max_epochs": 10, "patience": 2,
               "fine_tune": "off"}
    classifier_id = create(server, per_label=6, options=options)
    wait_refined(server, classifier_id)
    report = json.loads(call("GET", f"{server}/v1/classifiers/{classifier_id}/report")[1])
    page.goto(f"{server}/#/classifiers/{classifier_id}")
    expect(page.get_by_test_id("classifier-status")).to_have_text("ready", timeout=WAIT_MS)
    # Toy colours are linearly separable: a linear head wins, so the augmented stage compared
    # it with the probe; where the views did not earn their place, the preview's probe (the
    # same head) stays served.
    augmented = next(s for s in report["stages"] if s["stage"] == "augmented")
    verdict = augmented["augmentation"]
    assert augmented["served"] == verdict["earned"] == (report["stage"] == "augmented")
    if verdict["earned"]:
        assert report["selection"]["augmentation"] == verdict
    text = page.get_by_test_id("augmentation-verdict")
    expect(text).to_contain_text("against the same head trained on the original images only",
                                 timeout=WAIT_MS)
    expect(text).to_contain_text("the head trained on them is served" if verdict["earned"] else
                                 "the head trained on the originals (the linear probe) is served")


def tab_to(page, test_id: str, presses: int = 60) -> None:
    """Presses Tab until the element with this test id has the focus."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement?.dataset?.testid") == test_id:
            return
    raise AssertionError(f"Tab never reached {test_id}")


def test_a_360_px_screen_by_keyboard_only(server, browser, tmp_path):
    from playwright.sync_api import expect

    archive = tmp_path / "toys.zip"
    archive.write_bytes(dataset_zip(6))
    context = browser.new_context(viewport={"width": 360, "height": 780}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    page = context.new_page()
    # NB: listening from the start turns on Playwright's file chooser interception before the
    # first Enter; switched on inside expect_file_chooser it can come too late.
    page.on("filechooser", lambda chooser: None)
    page.goto(server)
    expect(page.get_by_role("heading", name="Classifiers")).to_be_focused()

    tab_to(page, "zip-input")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(archive)
    expect(page.get_by_text("toys.zip")).to_be_visible()
    page.keyboard.press("Tab")  # the name
    page.keyboard.type("keyboard")
    page.keyboard.press("Tab")  # the options' summary
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.type(json.dumps(FAST))
    tab_to(page, "create-button")
    page.keyboard.press("Enter")

    expect(page.get_by_role("heading", name="keyboard")).to_be_focused(timeout=WAIT_MS)
    expect(page.get_by_test_id("classifier-status")).to_have_text("ready", timeout=WAIT_MS)
    tab_to(page, "try-input")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files({"name": "blue.png", "mimeType": "image/png",
                             "buffer": image_bytes(COLOURS["blue"], seed=3)})
    expect(page.get_by_test_id("prediction")).to_have_count(2)
    expect(page.get_by_test_id("confusion-matrix")).to_be_visible()
    # Nothing wider than the screen: no sideways scrolling of the page itself.
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.evaluate("scrollTo(0, 0)")
    screenshot(page, "mobile.png", full_page=False)
    page.get_by_role("link", name="All classifiers").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("classifier-row").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    context.close()


def test_axe_finds_no_serious_violations(server, trained, page):
    from playwright.sync_api import expect

    page.goto(server)
    expect(page.get_by_test_id("classifier-row").first).to_be_visible()
    assert_accessible(page)
    screenshot(page, "list.png")
    page.goto(f"{server}/#/classifiers/{trained}")
    expect(page.get_by_test_id("confusion-matrix")).to_be_visible()
    page.get_by_test_id("try-input").set_input_files(
        {"name": "red.png", "mimeType": "image/png", "buffer": image_bytes(COLOURS["red"])})
    expect(page.get_by_test_id("prediction").first).to_be_visible()
    assert_accessible(page)
    page.get_by_test_id("delete-button").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    assert_accessible(page)


def test_versions_add_images_make_production_and_roll_back(server, page):
    from playwright.sync_api import expect

    classifier_id = create(server)
    wait_ready(server, classifier_id)
    page.goto(f"{server}/#/classifiers/{classifier_id}")
    rows = page.get_by_test_id("version-row")
    expect(rows).to_have_count(1)
    expect(rows.first.get_by_test_id("version-alias")).to_have_text("production")

    # Add images (a new label) as a new version that does not take production by itself.
    green = make_zip(labelled_images(4, labels=("green",)))
    page.get_by_test_id("version-zip-input").set_input_files(
        {"name": "green.zip", "mimeType": "application/zip", "buffer": green})
    page.get_by_test_id("promote-select").select_option("never")
    page.get_by_test_id("add-version-button").click()
    second = page.locator("[data-testid=version-row][data-version='2']")
    expect(second.get_by_test_id("version-status")).to_have_text("ready", timeout=WAIT_MS)
    expect(second).to_contain_text("kept out of production: promote: never", timeout=WAIT_MS)
    expect(second).to_contain_text("3 labels")
    assert_accessible(page)
    screenshot(page, "versions.png", page.get_by_test_id("versions"))

    # Make it production: the page now serves version 2 (three labels) ...
    second.get_by_test_id("make-production").click()
    expect(second.get_by_test_id("version-alias")).to_have_text("production")
    expect(page.get_by_test_id("make-production")).to_have_count(1)  # on version 1's row only
    resource = json.loads(call("GET", f"{server}/v1/classifiers/{classifier_id}")[1])
    assert resource["version"] == 2 and resource["aliases"] == {"production": 2}
    # ... and moving it back is the rollback.
    page.locator("[data-testid=version-row][data-version='1']").get_by_test_id(
        "make-production").click()
    expect(page.locator("[data-testid=version-row][data-version='1']")
           .get_by_test_id("version-alias")).to_have_text("production")
    resource = json.loads(call("GET", f"{server}/v1/classifiers/{classifier_id}")[1])
    assert resource["version"] == 1 and resource["labels"] == ["blue", "red"]


def test_the_report_shows_health_and_calibration_and_try_it_shows_rejection(server, page):
    """A planted copy in two folds (8 folds of one image per label each), then an image unlike
    any training image, and a threshold of 1."""
    from playwright.sync_api import expect

    members = labelled_images(8)
    members["red/7.png"] = members["red/0.png"]
    # NB: a red image filed as blue keeps the out-of-fold scores imperfect, so the temperature
    # stays moderate and no training image scores 1.
    members["blue/7.png"] = image_bytes(COLOURS["red"], seed=77)
    options = {**FAST, "validation_split": 0.125}
    body, content_type = multipart({"dataset": [("toys.zip", make_zip(members))],
                                    "options": json.dumps(options)})
    status, answer = call("POST", server + "/v1/classifiers", body, content_type)
    assert status == 202, answer
    classifier_id = json.loads(answer)["id"]
    wait_refined(server, classifier_id)
    page.goto(f"{server}/#/classifiers/{classifier_id}")

    # the last stage ran: the report says why the backbone stayed frozen
    reason = json.loads(call("GET", f"{server}/v1/classifiers/{classifier_id}/report")[1])[
        "fine_tuning"]["reason"]
    expect(page.get_by_test_id("fine-tuning-why")).to_have_text(f"Why: {reason}.",
                                                                timeout=WAIT_MS)
    health = page.get_by_test_id("health")
    expect(health).to_be_visible(timeout=WAIT_MS)
    duplicates = page.get_by_test_id("health-duplicates")
    expect(duplicates.locator("tbody tr")).to_have_count(1)
    expect(duplicates.locator("tbody tr")).to_contain_text("red/0.png, red/7.png")
    expect(duplicates.locator("tbody tr")).to_contain_text("yes: in training and validation")
    expect(page.get_by_test_id("health-warnings")).to_contain_text(
        "validation accuracy is inflated")
    expect(page.get_by_test_id("health-imbalance")).to_contain_text("blue 8, red 8")
    calibration = page.get_by_test_id("calibration")
    expect(calibration).to_contain_text("Temperature")
    expect(calibration).to_contain_text(re.compile(r"Log loss before → after\s*\d+\.\d+ → \d+\.\d+"))
    expect(calibration).to_contain_text("Default threshold")
    screenshot(page, "health.png", page.locator("[data-testid=health], [data-testid=calibration]").first)

    page.get_by_test_id("try-input").set_input_files(
        {"name": "board.png", "mimeType": "image/png", "buffer": checkerboard()})
    verdict = page.get_by_test_id("verdict")
    expect(verdict).to_have_attribute("data-reason", "out_of_distribution")
    expect(verdict).to_contain_text("Not recognised: out_of_distribution")
    expect(page.get_by_test_id("prediction")).to_have_count(2)  # top_k is kept

    training_image = members["red/3.png"]
    page.get_by_test_id("threshold-input").fill("1")
    page.get_by_test_id("try-input").set_input_files(
        {"name": "red.png", "mimeType": "image/png", "buffer": training_image})
    expect(verdict).to_have_attribute("data-reason", "below_threshold")
    expect(verdict).to_contain_text("Not recognised: below_threshold")
    page.get_by_test_id("threshold-input").fill("")
    page.get_by_test_id("try-input").set_input_files(
        {"name": "red-again.png", "mimeType": "image/png", "buffer": training_image})
    expect(verdict).to_have_text(re.compile(r"^red · "))
    screenshot(page, "try-rejected.png", page.locator("section:has([data-testid=try-input])"))
    assert_accessible(page)


def test_pages_carry_a_strict_content_security_policy(server, page):
    response = page.goto(server)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert page.locator("script:not([src])").count() == 0
    assert page.locator("style, [style]").count() == 0


def test_the_browser_zip_writer_and_event_stream_reader(server, page, tmp_path):
    page.goto(server)
    encoded = page.evaluate("""async () => {
        const {zipFiles} = await import("./web/js/zip.js");
        const files = [["red/1.png", "first"], ["blue/é ü.png", "second file"],
                       ["empty.txt", ""]];
        const blob = await zipFiles(files.map(([name, text]) =>
            ({name, file: new File([text], name)})));
        const bytes = new Uint8Array(await blob.arrayBuffer());
        return btoa(String.fromCharCode(...bytes));
    }""")
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(encoded))) as archive:
        assert archive.testzip() is None  # every CRC-32 matches
        assert {info.filename: archive.read(info).decode() for info in archive.infolist()} == {
            "red/1.png": "first", "blue/é ü.png": "second file", "empty.txt": ""}
    events = page.evaluate("""async () => {
        const {eventParser} = await import("./web/js/live.js");
        const feed = eventParser();
        const chunks = [": keep-alive\\n\\nid: 1\\nevent: prog", "ress\\ndata: {\\"stage\\":",
                        " \\"training\\"}\\n\\r\\nid: 2\\nevent: done\\ndata: {}\\n\\n"];
        return chunks.flatMap((chunk) => feed(chunk));
    }""")
    assert events == [{"type": "keep-alive"},
                      {"type": "progress", "id": "1", "data": '{"stage": "training"}'},
                      {"type": "done", "id": "2", "data": "{}"}]


def test_api_keys_the_prompt_and_what_a_predict_key_cannot_do(keyed_server, browser):
    from playwright.sync_api import expect

    base = keyed_server
    classifier_id = create(base, ADMIN_KEY)
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    page.goto(base)
    expect(page.get_by_role("heading", name="Enter your API key")).to_be_visible()
    assert_accessible(page)
    page.get_by_test_id("key-input").fill("not-a-key-of-this-server")
    page.get_by_test_id("key-button").click()
    expect(page.get_by_text("That key is not valid here")).to_be_visible()
    screenshot(page, "keys.png")

    page.get_by_label("API key").fill(PREDICT_KEY)
    page.keyboard.press("Enter")
    row = page.locator(f"[data-testid=classifier-row][data-id='{classifier_id}']")
    expect(row).to_be_visible()
    expect(page.get_by_test_id("session-scope")).to_have_text("Predict key")
    expect(page.get_by_test_id("create-button")).to_have_count(0)
    expect(page.get_by_test_id("dataset-input")).to_have_count(0)
    wait_ready(base, classifier_id, ADMIN_KEY)
    row.get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("blue-vs-red")
    expect(page.get_by_test_id("try-input")).to_be_attached()  # a predict key may try it
    expect(page.get_by_test_id("delete-button")).to_have_count(0)
    expect(page.get_by_test_id("export-button")).to_have_count(0)  # an export is admin-only
    assert page.evaluate("sessionStorage.getItem('headstart.api-key')") == PREDICT_KEY

    page.get_by_test_id("sign-out").click()
    page.get_by_label("API key").fill(ADMIN_KEY)
    page.get_by_test_id("key-button").click()
    expect(page.get_by_test_id("session-scope")).to_have_text("Admin key")
    expect(page.get_by_test_id("delete-button")).to_be_visible()
    page.goto(base)
    expect(page.get_by_test_id("create-button")).to_be_visible()
    context.close()


def test_the_api_docs_list_every_operation_and_try_it_out_works(server, page):
    from playwright.sync_api import expect

    document = json.loads(call("GET", server + "/openapi.json")[1])
    expected = sorted((method.upper(), path) for path, operations in document["paths"].items()
                      for method in operations)
    page.goto(server + "/docs")
    blocks = page.locator(".opblock")
    expect(blocks).to_have_count(len(expected), timeout=WAIT_MS)
    listed = sorted((block.locator(".opblock-summary-method").inner_text().strip(),
                     block.locator(".opblock-summary-path").get_attribute("data-path"))
                    for block in blocks.all())
    assert listed == expected
    expect(page.get_by_text("Unable to render this definition")).to_have_count(0)
    screenshot(page, "docs.png", full_page=False)

    health = page.locator(".opblock:has([data-path='/healthz'])")
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    status = health.locator(".live-responses-table tr.response .response-col_status")
    expect(status).to_have_text("200")
    expect(health.locator(".live-responses-table")).to_contain_text('"status": "ok"')
