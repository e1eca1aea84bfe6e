import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEST_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def backbone():
    """A randomly initialised VGG16 at 32 px: real code, tiny cost."""
    from models.backbone import load_backbone

    return load_backbone("random", TEST_IMAGE_SIZE, seed=0)
