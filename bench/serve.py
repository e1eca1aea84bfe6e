"""Serving speed: HTTP prediction throughput and latency against the raw compiled backbone.

In one run, on an otherwise idle machine:
1. the raw backbone, in this process: the compiled function Headstart serves with, at batch 1
   (latency) and at the service's largest batch (throughput), before and after the HTTP runs;
   the better of the two is the reference (this VM's speed drifts by 10-20 % over minutes). It
   is measured twice over, in the precision the service chooses (`HEADSTART_PRECISION`, `auto`
   unless set: models/precision.py) and in float32, alternating passes of the two so drift and
   neighbours' load hit both alike (medians);
2. the real service (gunicorn, as deployed, with the same settings as `make run`) started with
   cached weights: seconds to a ready /readyz (cold start), and the precision it names there;
3. eight small classifiers trained through the API (4 images per label, no augmentation: the
   heads only need to exist);
4. closed-loop load, one image per request: concurrency 1, 8 and 32, against one classifier and
   spread over eight, for `--seconds` each after a short warm-up: images/s, p50 and p99 latency.

The serving issue's targets: best HTTP throughput >= 0.9 x raw throughput (in the service's
precision); eight classifiers >= 0.9 x one; p50 at concurrency 1 <= 1.2 x raw batch-1 latency;
cold start <= 10 s. The precision issue's: where the service chooses bfloat16, best HTTP
throughput >= 1.7 x the raw float32 backbone's.

    python -m bench.serve --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

from bench import common
from bench.common import BenchError, Part

HEADING = "Serving: HTTP throughput and latency vs the raw backbone (hymenoptera images, {size} px)"
CONCURRENCIES = (1, 8, 32)
CLASSIFIERS = 8


def load_raw_backbones(weights: str, size: int, batch: int, precision: str) -> dict:
    """{chosen policy: …, "float32": …}: the service's backbone in its precision, and float32."""
    from models.backbone import load_backbone
    from models.precision import resolve

    choice = resolve(precision)
    loaded = {}
    for policy in dict.fromkeys((choice.policy, "float32")):
        loaded[policy] = load_backbone(weights, size, precision=choice if policy == choice.policy
                                       else "float32")
        loaded[policy].warm_up((1, batch))
    return loaded


def raw_backbones(models: dict, size: int, batch: int, seconds: float) -> dict[str, dict]:
    """Per precision: batch-1 latency and batch-`batch` throughput of the compiled backbone,
    medians over rounds that each time every precision once, in turn, for about `seconds`."""
    one = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    many = np.repeat(one, batch, axis=0)
    latencies = {p: [] for p in models}
    passes = {p: [] for p in models}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or min(len(t) for t in passes.values()) < 3:
        for precision, backbone in models.items():
            for _ in range(3):
                started = time.perf_counter()
                backbone.features(one)
                latencies[precision].append(time.perf_counter() - started)
            started = time.perf_counter()
            backbone.features(many)
            passes[precision].append(time.perf_counter() - started)
    return {p: {"latency_1_s": statistics.median(latencies[p]),
                "images_per_s": batch / statistics.median(passes[p])} for p in models}


def create_classifiers(client: common.Client, split: common.Split, count: int,
                       extra_options: dict | None = None) -> list[str]:
    """`count` small classifiers, 4 different images per label each, no augmentation;
    `extra_options` are added to each one's options (e.g. a fine_tune)."""
    by_label: dict[str, list] = {}
    for example in split.train:
        by_label.setdefault(example[0], []).append(example)
    ids = []
    for seed in range(count):
        examples = [e for items in by_label.values() for e in items[seed * 4:seed * 4 + 4]]
        options = {"max_epochs": 5, "augmentation": {"views": 0}, "seed": seed,
                   "head": {"hidden_units": 0, "dropout": 0.2, "l2": 0.001},
                   **(extra_options or {})}
        created = client.post_multipart("/v1/classifiers", [
            Part("dataset", common.dataset_zip(examples), "d.zip", "application/zip"),
            Part("options", json.dumps(options).encode())])
        ids.append(created["id"])
    for classifier_id in ids:  # to its last stage: a ready classifier may still be refining
        while (classifier := client.get(f"/v1/classifiers/{classifier_id}"))["status"] in (
                "queued", "training") or classifier.get("refining"):
            time.sleep(0.5)
        if classifier["status"] != "ready":
            raise BenchError(f"classifier {classifier_id} ended {classifier['status']}")
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
    parser.add_argument("--precision", default=os.environ.get("HEADSTART_PRECISION", "auto"),
                        help="HEADSTART_PRECISION for the service (default: the environment's, "
                             "else auto, as `make run`)")
    parser.set_defaults(datasets="hymenoptera")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shared, weights = common.prepare(args)
    split = common.load_split("hymenoptera", shared, args.limit_per_label)
    size = args.image_size or split.image_size
    images = [path.read_bytes() for _, path in split.test[:32]]

    models = load_raw_backbones(weights, size, args.max_batch, args.precision)
    chosen = next(iter(models))
    raws = [raw_backbones(models, size, args.max_batch, args.seconds)]
    env = {"HEADSTART_PREDICT_MAX_BATCH": str(args.max_batch), "HEADSTART_WEB_THREADS": "32",
           "HEADSTART_PRECISION": args.precision}
    rows, results = [], {}
    with common.running_service(weights, size, extra_env=env) as client:
        cold_start = client.ready_after_s
        served = client.get("/readyz")["backbone"]
        if served["precision"] != chosen:
            raise BenchError(f"the service computes in {served['precision']} "
                             f"({served['precision_reason']}), the raw reference in {chosen}")
        ids = create_classifiers(client, split, CLASSIFIERS)
        for classifiers in (1, CLASSIFIERS):
            for concurrency in CONCURRENCIES:
                result = load(client, ids[:classifiers], images, concurrency, args.seconds)
                results[classifiers, concurrency] = result
                print(f"{classifiers} classifier(s), concurrency {concurrency}: {result}",
                      file=sys.stderr)
                rows.append([classifiers, concurrency, f"{result['images_per_s']:.2f}", "", "",
                             f"{result['p50_s'] * 1000:.0f}", f"{result['p99_s'] * 1000:.0f}",
                             result["errors"]])
        loaded = client.get("/readyz").get("precisions", [chosen])
    raws.append(raw_backbones(models, size, args.max_batch, args.seconds))
    raw = {p: {"latency_1_s": min(r[p]["latency_1_s"] for r in raws),
               "images_per_s": max(r[p]["images_per_s"] for r in raws)} for p in models}
    for row_ in rows:
        row_[3] = f"{float(row_[2]) / raw[chosen]['images_per_s']:.2f}"
        row_[4] = f"{float(row_[2]) / raw['float32']['images_per_s']:.2f}"

    best_one = max(results[1, c]["images_per_s"] for c in CONCURRENCIES)
    best_many = max(results[CLASSIFIERS, c]["images_per_s"] for c in CONCURRENCIES)
    checks = [
        (f"best HTTP throughput / raw throughput ({chosen})",
         best_one / raw[chosen]["images_per_s"], ">= 0.9"),
        ("best HTTP throughput / raw float32 throughput", best_one / raw["float32"]["images_per_s"],
         ">= 1.7" if chosen == "mixed_bfloat16" else ">= 0.9"),
        (f"raw {chosen} / raw float32 throughput",
         raw[chosen]["images_per_s"] / raw["float32"]["images_per_s"], ""),
        (f"{CLASSIFIERS} classifiers / 1 classifier (best throughput)", best_many / best_one,
         ">= 0.9"),
        ("p50 at concurrency 1 / raw batch-1 latency",
         results[1, 1]["p50_s"] / raw[chosen]["latency_1_s"], "<= 1.2"),
        ("cold start to ready /readyz (s), cached weights", cold_start, "<= 10"),
    ]
    table = common.markdown_table(
        ["classifiers", "concurrency", "images/s", f"/ raw {chosen}", "/ raw float32", "p50 ms",
         "p99 ms", "errors"], rows)
    summary = common.markdown_table(
        ["ratio", "measured", "target"],
        [[name, f"{value:.2f}", target] for name, value, target in checks])
    raw_lines = []
    for precision in models:
        latencies = " / ".join(f"{r[precision]['latency_1_s'] * 1000:.0f}" for r in raws)
        throughputs = " / ".join(f"{r[precision]['images_per_s']:.2f}" for r in raws)
        raw_lines.append(f"{precision}: batch-1 latency {latencies} ms, {throughputs} images/s "
                         f"at batch {args.max_batch}")
    body = (f"The service computes in {served['precision']} ({served['precision_reason']}); "
            f"precisions it loaded: {', '.join(loaded)}.\n\n"
            f"Raw compiled backbone, before / after the HTTP runs (medians of interleaved "
            f"passes): {'; '.join(raw_lines)}. The ratios use the better of each.\n\n"
            f"{summary}\n\n{table}\n")
    print(body)
    if args.write:
        heading = HEADING.format(size=size)
        common.write_section(heading, common.section(heading, body, {
            "load": f"closed loop, one JPEG per request, {args.seconds:g} s per level after a "
                    "3 s warm-up; the service with HEADSTART_WEB_THREADS=32 and "
                    f"HEADSTART_PRECISION={args.precision}"}))


if __name__ == "__main__":
    common.run_main(main)
