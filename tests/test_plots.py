"""The report's pictures: pure SVG drawing (service/api/plots.py), and the routes that serve them."""

from xml.etree import ElementTree

import pytest

from service.api import plots
from service.app import create_app
from service.config import Settings
from tests.helpers import dataset_zip
from tests.test_api import post_dataset, wait_ready, wait_status

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert("x")</script> & "quotes" \x01'

REPORT = {
    "classifier_id": "clf_test",
    "labels": ["cat", "dog", HOSTILE],
    "history": [{"epoch": e, "loss": 1 / e, "accuracy": 0.5 + e / 20, "val_loss": 1.2 / e,
                 "val_accuracy": 0.4 + e / 20} for e in range(1, 9)],
    "best_epoch": 6,
    "validation": {"confusion_matrix": [[9, 1, 0], [2, 7, 1], [0, 0, 5]]},
}


def parse(document: str) -> ElementTree.Element:
    """Parses as XML (so the document is well-formed) and returns the root <svg>."""
    root = ElementTree.fromstring(document.encode("utf-8"))
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ElementTree.Element) -> list[str]:
    return ["".join(element.itertext()) for element in root.iter(f"{SVG}text")]


def test_curves_draw_four_lines_and_mark_the_best_epoch():
    root = parse(plots.curves_svg(REPORT, name="pets"))
    lines = root.findall(f".//{SVG}polyline")
    assert len(lines) == 4  # training and validation, loss and accuracy
    assert all(len(line.get("points").split()) == 8 for line in lines)
    assert "best epoch 6" in texts(root)
    assert "Learning curves: pets" in texts(root)


def test_curves_skip_values_that_are_not_finite_and_survive_an_empty_history():
    report = {**REPORT, "history": [{"epoch": 1, "loss": float("nan"), "accuracy": 0.5,
                                     "val_loss": float("inf"), "val_accuracy": 0.5},
                                    {"epoch": 2, "loss": 0.3, "accuracy": 0.6, "val_loss": 0.4,
                                     "val_accuracy": 0.6}]}
    root = parse(plots.curves_svg(report))
    counts = sorted(len(line.get("points").split()) for line in root.iter(f"{SVG}polyline"))
    assert counts == [1, 1, 2, 2]
    assert "No epochs recorded" in texts(parse(plots.curves_svg({**REPORT, "history": []})))


def test_the_confusion_matrix_has_one_cell_per_count_shaded_by_its_share_of_the_row():
    root = parse(plots.confusion_svg(REPORT))
    cells = root.findall(f".//{SVG}g/{SVG}rect")
    assert len(cells) == 9
    shades = [cell.get("fill") for cell in cells]
    assert shades[8] == plots._mix(1.0)  # 5 of 5: the darkest
    assert shades[2] == plots._mix(0.0)  # 0 of 10: the lightest
    counts = [int(t) for t in texts(root) if t.isdigit()]
    assert counts == [9, 1, 0, 2, 7, 1, 0, 0, 5]


def test_labels_are_escaped_and_cannot_inject_markup():
    for document in (plots.curves_svg(REPORT, name=HOSTILE), plots.confusion_svg(REPORT)):
        assert "<script" not in document
        root = parse(document)  # \x01 would make the XML invalid: it is replaced
        assert not list(root.iter(f"{SVG}script"))
    root = parse(plots.confusion_svg({**REPORT, "labels": ["cat", "dog", "x" * 40]}))
    assert "x" * 23 + "…" in texts(root)  # long labels are cut; the tooltip keeps them whole
    assert any("x" * 40 in title.text for title in root.iter(f"{SVG}title"))


def test_nice_ticks_cover_the_range_in_round_steps():
    assert plots.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(0, 0.37) == [0, 0.1, 0.2, 0.3, 0.4]
    assert plots.nice_ticks(1, 150, 6) == [0, 50, 100, 150]
    assert plots.nice_ticks(2, 2) == [2, 2.2, 2.4, 2.6, 2.8, 3.0]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    client = create_app(Settings(store=str(root / "store"), backbone_weights="random",
                                 image_size=32, weights_cache=root / "cache")).test_client()
    wait_ready(client)
    return client


def test_the_plot_routes_answer_409_until_training_has_finished(client):
    slow = {"max_epochs": 1000, "patience": 200, "augmentation": {"views": 8}}
    created = post_dataset(client, dataset_zip(30), slow).json
    for name in ("curves.svg", "confusion.svg"):
        response = client.get(f"/v1/classifiers/{created['id']}/report/{name}")
        assert response.status_code == 409
        assert response.mimetype == "application/problem+json"
    client.delete(f"/v1/classifiers/{created['id']}")


def test_the_plot_routes_serve_svg_once_the_report_exists(client):
    created = post_dataset(client, dataset_zip(3), {
        "name": "toys", "max_epochs": 3, "augmentation": {"views": 0},
        "head": {"hidden_units": 0}})
    assert created.status_code == 202, created.json
    url = f"/v1/classifiers/{created.json['id']}"
    assert wait_status(client, created.json["id"])["status"] == "ready"
    for name, marker in (("curves.svg", "Learning curves: toys"),
                         ("confusion.svg", "Confusion matrix: toys")):
        response = client.get(f"{url}/report/{name}")
        assert response.status_code == 200
        assert response.mimetype == "image/svg+xml"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert f'filename="{created.json["id"]}-{name.split(".")[0]}.svg"' in \
            response.headers["Content-Disposition"]
        assert marker in texts(parse(response.get_data(as_text=True)))


def test_the_plot_routes_answer_404_for_an_unknown_classifier(client):
    for name in ("curves.svg", "confusion.svg"):
        response = client.get(f"/v1/classifiers/clf_nope/report/{name}")
        assert response.status_code == 404
        assert response.mimetype == "application/problem+json"
