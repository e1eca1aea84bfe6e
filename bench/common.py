"""Shared helpers of the benchmarks: data in ../shared, dataset zips, the real service as a
subprocess, a standard-library HTTP client, and bench/RESULTS.md sections.

Nothing here imports TensorFlow: `bench.quality` talks to the service only over HTTP.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT.parent / "shared"
RESULTS_PATH = REPO_ROOT / "bench" / "RESULTS.md"
WEIGHTS_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

#: flowers5 split of BASELINES.md: per label, after a seeded shuffle, the first 60 images train
#: and the next 100 test.
FLOWERS5_TRAIN_PER_LABEL = 60
FLOWERS5_TEST_PER_LABEL = 100
SPLIT_SEED = 0
#: The few-shot split of hymenoptera: this many training images per label, drawn (seeded) from
#: `train`; the test images are all of `val`.
FEW_SHOT_PER_LABEL = 20

#: (label, image file) — one labeled example.
Example = tuple[str, Path]


class BenchError(Exception):
    """A benchmark cannot run; the message says why and what to do."""


# ---------------------------------------------------------------- shared data


def locate_shared(path: str | Path | None = None) -> Path:
    """The shared directory (datasets, weights), or BenchError saying where it was looked for."""
    shared = Path(path) if path else DEFAULT_SHARED
    if not (shared / "datasets").is_dir():
        raise BenchError(
            f"shared data not found: {shared}/datasets does not exist. Pass --shared PATH "
            f"(the directory holding datasets/ and weights/; default {DEFAULT_SHARED}).")
    return shared


def resolve_weights(shared: Path, weights: str | None) -> str:
    """The HEADSTART_BACKBONE_WEIGHTS value: the shared VGG16 file by default, 'random',
    'imagenet', or a path that must exist."""
    if weights in ("random", "imagenet"):
        return weights
    path = Path(weights) if weights else shared / "weights" / WEIGHTS_NAME
    if not path.is_file():
        raise BenchError(f"backbone weights not found: {path}. Pass --weights PATH or "
                         "--weights random (smoke tests only).")
    return str(path.resolve())


def _label_files(folder: Path) -> dict[str, list[Path]]:
    """{label: sorted files} for the label folders of `folder`; dotfiles (.DS_Store) are left out."""
    if not folder.is_dir():
        raise BenchError(f"dataset folder not found: {folder}")
    return {
        label.name: sorted(p for p in label.iterdir() if p.is_file() and not p.name.startswith("."))
        for label in sorted(folder.iterdir()) if label.is_dir() and not label.name.startswith(".")
    }


@dataclass(frozen=True)
class Split:
    """A benchmark dataset: training examples (what gets uploaded) and held-out test examples.

    `train` is sorted by (label, file name), the order the service gives a dataset zip's images,
    so in-process training splits validation off exactly as the service does.
    """

    name: str
    image_size: int          # the default backbone input side for this dataset
    train: list[Example]
    test: list[Example]
    description: str

    @property
    def labels(self) -> list[str]:
        return sorted({label for label, _ in self.train})


def _take(files: Sequence[Path], count: int | None) -> list[Path]:
    return list(files if count is None else files[:count])


def hymenoptera_split(shared: Path, limit_per_label: int | None = None) -> Split:
    """hymenoptera `train` → `val` (every file, the GIF placeholder and the .jpeg included)."""
    root = shared / "datasets" / "hymenoptera"
    train = [(label, p) for label, files in _label_files(root / "train").items()
             for p in _take(files, limit_per_label)]
    test = [(label, p) for label, files in _label_files(root / "val").items()
            for p in _take(files, limit_per_label)]
    return Split("hymenoptera", 224, sorted(train, key=_order), test,
                 "hymenoptera train → val")


def hymenoptera_few_shot_split(shared: Path, limit_per_label: int | None = None, *,
                               per_label: int = FEW_SHOT_PER_LABEL,
                               seed: int = SPLIT_SEED) -> Split:
    """hymenoptera with `per_label` training images per label: per label (sorted label order,
    one seeded generator), a seeded choice from the sorted `train` files; every `val` file
    tests."""
    full = hymenoptera_split(shared, limit_per_label)
    if limit_per_label is not None:
        per_label = min(per_label, limit_per_label)
    rng = np.random.default_rng(seed)
    train = []
    for label in full.labels:
        files = [example for example in full.train if example[0] == label]
        if len(files) < per_label:
            raise BenchError(f"hymenoptera/train/{label} has {len(files)} images, fewer than "
                             f"{per_label}")
        train += [files[i] for i in sorted(rng.choice(len(files), per_label, replace=False))]
    return Split(f"hymenoptera-{per_label}", 224, sorted(train, key=_order), full.test,
                 f"hymenoptera {per_label}/label of train (seed {seed}) → val")


def flowers5_split(shared: Path, limit_per_label: int | None = None, *,
                   train_per_label: int = FLOWERS5_TRAIN_PER_LABEL,
                   test_per_label: int = FLOWERS5_TEST_PER_LABEL, seed: int = SPLIT_SEED) -> Split:
    """flowers5: per label (in sorted label order, one seeded generator), the sorted file list is
    shuffled; the first `train_per_label` train and the next `test_per_label` test."""
    if limit_per_label is not None:
        train_per_label = min(train_per_label, limit_per_label)
        test_per_label = min(test_per_label, limit_per_label)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, files in _label_files(shared / "datasets" / "flowers5").items():
        shuffled = [files[i] for i in rng.permutation(len(files))]
        if len(shuffled) < train_per_label + test_per_label:
            raise BenchError(f"flowers5/{label} has {len(shuffled)} images, fewer than "
                             f"{train_per_label} + {test_per_label}")
        train += [(label, p) for p in shuffled[:train_per_label]]
        test += [(label, p) for p in shuffled[train_per_label:train_per_label + test_per_label]]
    return Split("flowers5", 128, sorted(train, key=_order), test,
                 f"flowers5 {train_per_label}/label → {test_per_label}/label (seed {seed})")


def _order(example: Example) -> tuple[str, str]:
    return example[0], example[1].name


DATASETS = {"hymenoptera": hymenoptera_split, "flowers5": flowers5_split,
            f"hymenoptera-{FEW_SHOT_PER_LABEL}": hymenoptera_few_shot_split}
#: What a benchmark runs without --datasets (each benchmark may name its own).
DEFAULT_DATASETS = ("hymenoptera", "flowers5")


def load_split(name: str, shared: Path, limit_per_label: int | None = None) -> Split:
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name](shared, limit_per_label)


def dataset_zip(examples: Sequence[Example]) -> bytes:
    """A dataset zip in memory: members `label/file name`, stored (JPEGs do not deflate)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for label, path in examples:
            archive.write(path, f"{label}/{path.name}")
    return buffer.getvalue()


# ---------------------------------------------------------------- HTTP client


class ServiceError(Exception):
    """The service answered an error status; `problem` is its problem+json body (or the text)."""

    def __init__(self, method: str, url: str, status: int, problem):
        detail = problem.get("detail", problem) if isinstance(problem, dict) else problem
        super().__init__(f"{method} {url} → {status}: {detail}")
        self.status = status
        self.problem = problem


@dataclass(frozen=True)
class Part:
    """One multipart/form-data part: a field, or a file when `filename` is set."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def encode_multipart(parts: Sequence[Part]) -> tuple[bytes, str]:
    """The body and Content-Type header of a multipart/form-data request (RFC 7578)."""
    boundary = f"headstart-bench-{uuid.uuid4().hex}"
    body = io.BytesIO()
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        body.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        if part.content_type:
            body.write(f"Content-Type: {part.content_type}\r\n".encode())
        body.write(b"\r\n")
        body.write(part.data)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


class Client:
    """A minimal JSON/multipart client for the service (standard library only)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # NB: no proxies: an http_proxy in the environment must not capture localhost.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None, timeout_s: float | None = None):
        """Sends a request; returns the decoded JSON body (None when empty), or raises
        ServiceError for an error status."""
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout_s or self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                problem = json.loads(text)
            except json.JSONDecodeError:
                problem = text
            raise ServiceError(method, url, error.code, problem) from None
        return json.loads(payload) if payload else None

    def get(self, path: str, timeout_s: float | None = None):
        return self.request("GET", path, timeout_s=timeout_s)

    def post_multipart(self, path: str, parts: Sequence[Part]):
        body, content_type = encode_multipart(parts)
        return self.request("POST", path, body, content_type)

    def delete(self, path: str):
        return self.request("DELETE", path)


# ---------------------------------------------------------------- the service as a subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_service(weights: str, image_size: int, *, ready_timeout_s: float = 600.0,
                    extra_env: dict[str, str] | None = None) -> Iterator[Client]:
    """Starts `gunicorn -c service/gunicorn.conf.py service.wsgi:app` from the repo root on a free
    port with a fresh temporary store, waits until GET /readyz answers 200, yields a Client, and
    stops the server (SIGTERM, then wait) on exit.

    The server's log goes to a file in the temporary directory; its tail is shown when the server
    does not become ready.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="headstart-bench-") as tmp:
        log_path = Path(tmp) / "service.log"
        env = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(Path(tmp) / "store"),
               "HEADSTART_BACKBONE_WEIGHTS": weights, "HEADSTART_IMAGE_SIZE": str(image_size),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               **(extra_env or {})}
        command = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py",
                   "service.wsgi:app"]
        with open(log_path, "wb") as log:
            # NB: own session, so a forced stop can take the master and its workers together.
            server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        client = Client(f"http://127.0.0.1:{port}")
        try:
            started = time.monotonic()
            _wait_until_ready(client, server, log_path, ready_timeout_s)
            client.ready_after_s = time.monotonic() - started
            print(f"service ready on port {port} in {client.ready_after_s:.1f} s "
                  f"(weights={weights}, image_size={image_size})", file=sys.stderr)
            yield client
        finally:
            _stop(server)


def _wait_until_ready(client: Client, server: subprocess.Popen, log_path: Path,
                      timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"the service exited with status {server.returncode} before it was "
                             f"ready. Last lines of its log:\n{_tail(log_path)}")
        try:
            client.get("/readyz", timeout_s=5)
            return
        except ServiceError as error:
            last = f"{error.status} {error.problem}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
        time.sleep(0.1)
    _stop(server)
    raise BenchError(f"the service was not ready after {timeout_s:.0f} s (last /readyz: {last}). "
                     f"Last lines of its log:\n{_tail(log_path)}")


def _stop(server: subprocess.Popen, timeout_s: float = 90.0) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)  # the group this function's Popen created
        server.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    except OSError as error:
        return f"(log unreadable: {error})"


# ---------------------------------------------------------------- command line and results


def add_common_arguments(parser: argparse.ArgumentParser,
                         datasets: Sequence[str] = DEFAULT_DATASETS) -> None:
    parser.add_argument("--shared", default=str(DEFAULT_SHARED),
                        help="directory holding datasets/ and weights/ (default: %(default)s)")
    parser.add_argument("--datasets", default=",".join(datasets),
                        help=f"comma-separated, from: {', '.join(DATASETS)} "
                             "(default: %(default)s)")
    parser.add_argument("--limit-per-label", type=int, default=None, metavar="N",
                        help="at most N train and N test images per label (smoke tests)")
    parser.add_argument("--weights", default=None, metavar="PATH|random|imagenet",
                        help=f"backbone weights (default: SHARED/weights/{WEIGHTS_NAME})")
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="override every dataset's image size (hymenoptera 224, flowers5 128)")
    parser.add_argument("--write", action="store_true",
                        help=f"record the results in {RESULTS_PATH.relative_to(REPO_ROOT)}")


def dataset_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise BenchError(f"unknown dataset(s) {unknown or text!r}; choose from {', '.join(DATASETS)}")
    return names


def prepare(args: argparse.Namespace) -> tuple[Path, str]:
    """The checks every benchmark starts with: (shared dir, weights setting)."""
    check_write_allowed(args)
    shared = locate_shared(args.shared)
    return shared, resolve_weights(shared, args.weights)


def splits_with_backbones(args: argparse.Namespace, shared: Path,
                          weights: str) -> Iterator[tuple[Split, object]]:
    """Each of `args.datasets`' splits with a backbone of its size (one per size, loaded once,
    in the precision the service's "auto" picks here): the in-process studies' loop."""
    from models.backbone import load_backbone
    from models.precision import resolve

    backbones = {}
    for name in dataset_names(args.datasets):
        split = load_split(name, shared, args.limit_per_label)
        size = args.image_size or split.image_size
        if size not in backbones:
            backbones[size] = load_backbone(weights, size, precision=resolve("auto"))
        yield split, backbones[size]


def check_write_allowed(args: argparse.Namespace) -> None:
    """RESULTS.md holds full runs only: smoke settings must not overwrite real numbers."""
    if args.write and (args.limit_per_label is not None or args.weights == "random"):
        raise BenchError("--write records full runs only; drop --limit-per-label and "
                         "--weights random, or drop --write")


def command_line() -> str:
    """How this benchmark was started, as a command to paste (`python -m bench.x …`)."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
    return " ".join([program, shlex.join(sys.argv[1:])]).strip()


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def machine() -> dict[str, str]:
    """Where a benchmark ran: cores usable by this process (as `nproc`), CPU model, versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": str(cores), "cpu": model or platform.processor() or "unknown",
            "tensorflow": _version("tensorflow", "tensorflow-cpu"), "keras": _version("keras"),
            "python": platform.python_version()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def section(heading: str, body: str, extra: dict[str, str] | None = None) -> str:
    """A RESULTS.md section: heading, how and where it was measured, then `body`."""
    info = machine()
    lines = [
        f"## {heading}", "",
        f"- command: `{command_line()}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: nproc {info['nproc']}, {info['cpu']}; Python {info['python']}, "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}",
    ]
    lines += [f"- {key}: {value}" for key, value in (extra or {}).items()]
    return "\n".join(lines) + "\n\n" + body.strip() + "\n"


RESULTS_PREAMBLE = """# Benchmark results

Written by the scripts in bench/ with `--write` (see bench/README.md). Each section belongs to one
benchmark and dataset and is replaced when that benchmark is run again; the others are kept.
"""


def write_section(heading: str, text: str, path: Path = RESULTS_PATH) -> None:
    """Replaces the section titled `## {heading}` in `path`, or appends it; atomic write."""
    existing = path.read_text("utf-8") if path.exists() else RESULTS_PREAMBLE
    preamble, sections = _split_sections(existing)
    sections[heading] = text.rstrip("\n") + "\n"
    content = preamble.rstrip("\n") + "\n\n" + "\n".join(sections.values())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(content, "utf-8")
    os.replace(temporary, path)
    print(f"wrote section {heading!r} of {path}", file=sys.stderr)


def _split_sections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first `## ` heading, {heading: section text}) in file order."""
    preamble: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] = preamble
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        current.append(line)
    return "".join(preamble), {key: "".join(lines).rstrip("\n") + "\n"
                               for key, lines in sections.items()}


def run_main(main) -> None:
    """Runs a benchmark's main; a BenchError ends it with its message and status 2."""
    try:
        main()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
