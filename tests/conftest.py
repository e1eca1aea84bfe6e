import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# NB: fine_tune "auto" (the default) is skipped ("no budget") in tests unless a test asks for
# it (tests/test_finetune.py): each fine-tuning run costs seconds of compiling at 32 px, and
# the other tests are about other things. Servers started by tests inherit this.
os.environ.setdefault("HEADSTART_FINE_TUNE_BUDGET_S", "0")

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEST_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def backbone():
    """A randomly initialised VGG16 at 32 px: real code, tiny cost."""
    from models.backbone import load_backbone

    return load_backbone("random", TEST_IMAGE_SIZE, seed=0)
