"""Serving speed: HTTP prediction throughput and latency against the raw compiled backbone.

In one run, on an otherwise idle machine:
1. the raw backbone, in this process: the compiled function Headstart serves with, at batch 1
   (latency) and at the service's largest batch (throughput), before and after the HTTP runs;
   the better of the two is the reference (this VM's speed drifts by 10-20 % over minutes);
2. the real service (gunicorn, as deployed) started with cached weights: seconds to a ready
   /readyz (cold start);
3. eight small classifiers trained through the API (4 images per label, no augmentation: the
   heads only need to exist);
4. closed-loop load, one image per request: concurrency 1, 8 and 32, against one classifier and
   spread over eight, for `--seconds` each after a short warm-up: images/s, p50 and p99 latency.

The issue's targets: best HTTP throughput >= 0.9 x raw throughput; eight classifiers >= 0.9 x one;
p50 at concurrency 1 <= 1.2 x raw batch-1 latency; cold start <= 10 s.

    python -m bench.serve --write
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

from bench import common
from bench.common import BenchError, Part

HEADING = "Serving: HTTP throughput and latency vs the raw backbone (hymenoptera images, {size} px)"
CONCURRENCIES = (1, 8, 32)
CLASSIFIERS = 8


def load_raw_backbone(weights: str, size: int, batch: int):
    from models.backbone import load_backbone

    backbone = load_backbone(weights, size)
    backbone.warm_up((1, batch))
    return backbone


def raw_backbone(backbone, size: int, batch: int, seconds: float) -> dict[str, float]:
    """Batch-1 latency (median) and batch-`batch` throughput of the compiled backbone."""
    one = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    many = np.repeat(one, batch, axis=0)
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(latencies) < 5:
        started = time.perf_counter()
        backbone.features(one)
        latencies.append(time.perf_counter() - started)
    passes, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or passes < 3:
        backbone.features(many)
        passes += 1
    return {"latency_1_s": float(np.median(latencies)),
            "images_per_s": passes * batch / (time.perf_counter() - started)}


def create_classifiers(client: common.Client, split: common.Split, count: int) -> list[str]:
    by_label: dict[str, list] = {}
    for example in split.train:
        by_label.setdefault(example[0], []).append(example)
    ids = []
    for seed in range(count):
        examples = [e for items in by_label.values() for e in items[seed * 4:seed * 4 + 4]]
        options = ('{"max_epochs": 5, "augmentation": {"views": 0}, "seed": %d, '
                   '"head": {"hidden_units": 0, "dropout": 0.2, "l2": 0.001}}' % seed)
        created = client.post_multipart("/v1/classifiers", [
            Part("dataset", common.dataset_zip(examples), "d.zip", "application/zip"),
            Part("options", options.encode())])
        ids.append(created["id"])
    for classifier_id in ids:
        while (status := client.get(f"/v1/classifiers/{classifier_id}")["status"]) in (
                "queued", "training"):
            time.sleep(0.5)
        if status != "ready":
            raise BenchError(f"classifier {classifier_id} ended {status}")
    return ids


def load(client: common.Client, ids: list[str], images: list[bytes], concurrency: int,
         seconds: float, warm_up_s: float = 3.0) -> dict[str, float]:
    """Closed loop: `concurrency` threads each send one image per request, back to back."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_at = time.monotonic() + warm_up_s
    stop_at = start_at + seconds

    def user(index: int) -> None:
        n = index
        while (now := time.monotonic()) < stop_at:
            classifier_id, image = ids[n % len(ids)], images[n % len(images)]
            n += concurrency
            try:
                client.post_multipart(f"/v1/classifiers/{classifier_id}/predict",
                                      [Part("image", image, "i.jpg", "image/jpeg")])
            except common.ServiceError as error:
                with lock:
                    errors.append(f"{error.status}")
                continue
            if now >= start_at:
                with lock:
                    latencies.append(time.monotonic() - now)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not latencies:
        raise BenchError(f"no request finished at concurrency {concurrency}; errors {errors[:5]}")
    return {"images_per_s": len(latencies) / seconds,
            "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "errors": len(errors)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve",
                                     description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="measuring time per load level (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="HEADSTART_PREDICT_MAX_BATCH for the service and the raw batch size")
    parser.set_defaults(datasets="hymenoptera")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    split = common.load_split("hymenoptera", shared, args.limit_per_label)
    size = args.image_size or split.image_size
    images = [path.read_bytes() for _, path in split.test[:32]]

    backbone = load_raw_backbone(weights, size, args.max_batch)
    raws = [raw_backbone(backbone, size, args.max_batch, args.seconds / 2)]
    env = {"HEADSTART_PREDICT_MAX_BATCH": str(args.max_batch), "HEADSTART_WEB_THREADS": "32"}
    rows, results = [], {}
    with common.running_service(weights, size, extra_env=env) as client:
        cold_start = client.ready_after_s
        ids = create_classifiers(client, split, CLASSIFIERS)
        for classifiers in (1, CLASSIFIERS):
            for concurrency in CONCURRENCIES:
                result = load(client, ids[:classifiers], images, concurrency, args.seconds)
                results[classifiers, concurrency] = result
                print(f"{classifiers} classifier(s), concurrency {concurrency}: {result}",
                      file=sys.stderr)
                rows.append([classifiers, concurrency, f"{result['images_per_s']:.2f}", "",
                             f"{result['p50_s'] * 1000:.0f}", f"{result['p99_s'] * 1000:.0f}",
                             result["errors"]])
    raws.append(raw_backbone(backbone, size, args.max_batch, args.seconds / 2))
    raw = {"latency_1_s": min(r["latency_1_s"] for r in raws),
           "images_per_s": max(r["images_per_s"] for r in raws)}
    for row_ in rows:
        row_[3] = f"{float(row_[2]) / raw['images_per_s']:.2f}"

    best_one = max(results[1, c]["images_per_s"] for c in CONCURRENCIES)
    best_many = max(results[CLASSIFIERS, c]["images_per_s"] for c in CONCURRENCIES)
    checks = [
        ("best HTTP throughput / raw throughput", best_one / raw["images_per_s"], ">= 0.9"),
        (f"{CLASSIFIERS} classifiers / 1 classifier (best throughput)", best_many / best_one,
         ">= 0.9"),
        ("p50 at concurrency 1 / raw batch-1 latency",
         results[1, 1]["p50_s"] / raw["latency_1_s"], "<= 1.2"),
        ("cold start to ready /readyz (s), cached weights", cold_start, "<= 10"),
    ]
    table = common.markdown_table(
        ["classifiers", "concurrency", "images/s", "/ raw", "p50 ms", "p99 ms", "errors"], rows)
    summary = common.markdown_table(["ratio", "measured", "target"],
                                    [[name, f"{value:.2f}", target] for name, value, target in checks])
    latencies = " / ".join(f"{r['latency_1_s'] * 1000:.0f}" for r in raws)
    throughputs = " / ".join(f"{r['images_per_s']:.2f}" for r in raws)
    body = (f"Raw compiled backbone, before / after the HTTP runs: batch-1 latency {latencies} ms; "
            f"{throughputs} images/s at batch {args.max_batch}. The ratios use the better of "
            f"each.\n\n{summary}\n\n{table}\n")
    print(body)
    if args.write:
        heading = HEADING.format(size=size)
        common.write_section(heading, common.section(heading, body, {
            "load": f"closed loop, one JPEG per request, {args.seconds:g} s per level after a "
                    "3 s warm-up; the service with HEADSTART_WEB_THREADS=32"}))


if __name__ == "__main__":
    common.run_main(main)
