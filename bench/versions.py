"""Versions at real size: a classifier from 100 images per label of hymenoptera, then a version
with 50 more per label (train has 121-124 a label, so the last come from val; the rest of val
tests); how many images each run sent through the backbone (the service's
`headstart_backbone_images_total`, read from /metrics before and after each run: training is
in the API process with HEADSTART_QUEUE=local, so the counter sees it), its time, validation
accuracy, test accuracy on hymenoptera `val`, and whether the version took production.

With the classifier's feature cache (per image content, view, backbone, size and precision) a
version's run extracts only the (image, view) pairs no earlier run of the classifier computed;
the promotion's comparison reads the new images' originals from the same cache.

    python -m bench.versions --write
    python -m bench.versions --weights random --image-size 32 --first 6 --added 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench import common
from bench.common import BenchError, Part

HEADING = "Versions: backbone images per version (hymenoptera)"
COUNTER = "headstart_backbone_images_total"


def backbone_images(client: common.Client) -> float:
    """Training's images through the backbone so far (not the test predictions')."""
    request = client._opener.open(client.base_url + "/metrics", timeout=60)
    for line in request.read().decode().splitlines():
        if line.startswith(COUNTER + "{") and 'purpose="training"' in line:
            return float(line.split()[-1])
    raise BenchError(f'/metrics has no {COUNTER}{{purpose="training"}}')


def wait_for(client: common.Client, path: str, done, timeout_s: float = 7200) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        resource = client.get(path)
        if done(resource):
            return resource
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not finish within {timeout_s:g} s: {resource}")
        time.sleep(1.0)


def predictions(client: common.Client, classifier_id: str, test: list[common.Example],
                query: str) -> list[dict]:
    """Predict's answers for the test images, in order (`query`: e.g. "version=2")."""
    answers = []
    for start in range(0, len(test), 32):
        batch = test[start:start + 32]
        body, content_type = common.encode_multipart(
            [Part("image", path.read_bytes(), path.name) for _, path in batch])
        answers += client.request("POST", f"/v1/classifiers/{classifier_id}/predict?{query}",
                                  body, content_type)["predictions"]
    return answers


def test_accuracy(client: common.Client, classifier_id: str, version: int,
                  test: list[common.Example]) -> float:
    # NB: the best label whether or not the answer is rejected (out of distribution or below
    # the threshold): rejection is measured by bench.trust_wired, not here
    answers = predictions(client, classifier_id, test, f"version={version}")
    return sum(p["top_k"][0]["label"] == label for p, (label, _) in zip(answers, test)) / len(test)


def test_scores(client: common.Client, classifier_id: str,
                test: list[common.Example]) -> list[list[tuple[str, float]]]:
    """Every test image's labels and scores from the production version (predict's default)."""
    return [[(e["label"], e["score"]) for e in p["top_k"]]
            for p in predictions(client, classifier_id, test, "top_k=2")]


def finished(version: dict) -> bool:
    """Trained to its last stage (a ready version may still be refining)."""
    return version["status"] not in ("queued", "training") and not version.get("refining")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, datasets=("hymenoptera",))
    parser.add_argument("--first", type=int, default=100, help="images per label of version 1")
    parser.add_argument("--added", type=int, default=50, help="images per label version 2 adds")
    parser.add_argument("--options", default="{}", help="training options (JSON) of both")
    args = parser.parse_args()
    shared, weights = common.prepare(args)
    split = common.hymenoptera_split(shared)
    image_size = args.image_size or split.image_size
    # NB: hymenoptera's train holds 124 ants and 121 bees: per label, the images are train's
    # then val's (sorted), version 1 takes the first, version 2 adds the next, the rest test.
    pools: dict[str, list] = {}
    for label, path in [*split.train, *sorted(split.test, key=lambda e: (e[0], e[1].name))]:
        pools.setdefault(label, []).append((label, path))
    need = args.first + args.added
    if any(len(pool) <= need for pool in pools.values()):
        raise BenchError(f"hymenoptera has at most {need} images in a label: nothing to test")
    first = [e for pool in pools.values() for e in pool[:args.first]]
    added = [e for pool in pools.values() for e in pool[args.first:need]]
    test = [e for pool in pools.values() for e in pool[need:][:args.limit_per_label]]
    options = json.loads(args.options)
    rows = []
    with common.running_service(weights, image_size) as client:
        before = backbone_images(client)
        started = time.monotonic()
        created = client.post_multipart("/v1/classifiers", [
            Part("dataset", common.dataset_zip(first), "first.zip", "application/zip"),
            Part("options", json.dumps(options).encode())])
        cid = created["id"]
        one = wait_for(client, f"/v1/classifiers/{cid}/versions/1", finished)
        seconds, after = time.monotonic() - started, backbone_images(client)
        rows.append(_row(one, seconds, after - before, test_accuracy(client, cid, 1, test)))
        old_scores = test_scores(client, cid, test)  # production: version 1
        before = backbone_images(client)  # NB: not counting the test predictions
        started = time.monotonic()
        client.post_multipart(f"/v1/classifiers/{cid}/versions", [
            Part("dataset", common.dataset_zip(added), "added.zip", "application/zip"),
            Part("options", json.dumps(options).encode())])
        two = wait_for(client, f"/v1/classifiers/{cid}/versions/2",
                       lambda v: finished(v) and (v["status"] != "ready" or v["promotion"]))
        seconds, after = time.monotonic() - started, backbone_images(client)
        rows.append(_row(two, seconds, after - before, test_accuracy(client, cid, 2, test)))
        client.request("PUT", f"/v1/classifiers/{cid}/aliases/production",
                       json.dumps({"version": 1}).encode(), "application/json")
        rolled_back = test_scores(client, cid, test)
    same = rolled_back == old_scores
    if not same:
        raise BenchError("production moved back to version 1 does not predict as version 1 did")
    views = (options.get("augmentation") or {}).get("views", 4)
    body = common.markdown_table(
        ("version", "images", "backbone images", "run s", "val accuracy", "test accuracy",
         "production"), rows)
    body += (f"\n\nBackbone images count every (image, view) pass of the run ({views} augmented "
             "views besides the original) that the classifier's feature cache did not hold, "
             "the promotion's comparison included (it reads the new images' originals). "
             f"Promotion of version 2: {two['promotion']['reason']}. Production moved back "
             f"to version 1 (`PUT …/aliases/production`): its predictions of the {len(test)} "
             "test images (every label's score) are identical to version 1's before version 2 "
             "existed.\n")
    text = common.section(HEADING, body, {
        "weights": weights, "image size": str(image_size),
        "data": f"per label, hymenoptera train then val: the first {args.first} make version 1, "
                f"the next {args.added} are added in version 2, the other {len(test)} test"})
    print(text)
    if args.write:
        common.write_section(HEADING, text)


def _row(version: dict, seconds: float, images: float, accuracy: float) -> tuple:
    promotion = version.get("promotion")
    taken = "yes" if "production" in version["aliases"] else "no"
    if version["status"] != "ready":
        raise BenchError(f"version {version['version']} is {version['status']}: "
                         f"{version.get('error')}")
    return (version["version"], version["dataset"]["images"], int(images), f"{seconds:.1f}",
            f"{version['metrics']['val_accuracy']:.3f}", f"{accuracy:.3f}",
            taken + (f" ({promotion['new_correct']} vs {promotion['old_correct']} of "
                     f"{promotion['images']})" if promotion and "new_correct" in promotion
                     else ""))


if __name__ == "__main__":
    common.run_main(main)
    sys.exit(0)
