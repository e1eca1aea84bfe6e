"""The one test on the real VGG16 ImageNet weights, at 224 px (about a minute on 2 cores)."""

from pathlib import Path

import numpy as np
import pytest

from models.augmentation import Augmentation
from models.backbone import load_backbone
from models.prediction import class_scores
from models.preprocessing import ImageDecodeError, load_image
from models.training import TrainingConfig, train_classifier
from tests.conftest import SHARED

WEIGHTS = SHARED / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"

pytestmark = pytest.mark.skipif(
    not (WEIGHTS.is_file() and HYMENOPTERA.is_dir()),
    reason=f"needs the real weights and data from ../shared ({SHARED}), absent here")


def images_of(folder: Path, per_label: int | None = None):
    data, labels = [], []
    for index, label in enumerate(("ants", "bees")):
        files = sorted(p for p in (folder / label).iterdir() if not p.name.startswith("."))
        for path in files[:per_label]:
            data.append(path.read_bytes())
            labels.append(index)
    return data, np.array(labels)


def test_hymenoptera_subset_scores_above_085_on_val(tmp_path):
    backbone = load_backbone(str(WEIGHTS), 224)
    assert backbone.identity.weights == "imagenet"
    train_images, train_labels = images_of(HYMENOPTERA / "train", per_label=40)
    config = TrainingConfig(augmentation=Augmentation(views=1))
    result = train_classifier(train_images, train_labels, ["ants", "bees"], backbone, config)

    val_images, val_labels = images_of(HYMENOPTERA / "val")
    pixels, kept = [], []
    for data, label in zip(val_images, val_labels):
        try:
            pixels.append(load_image(data, 224))
            kept.append(label)
        except ImageDecodeError:
            continue
    scores = np.concatenate([class_scores(backbone, result.head, np.stack(pixels[i:i + 32]))
                             for i in range(0, len(pixels), 32)])
    accuracy = float((scores.argmax(axis=1) == np.array(kept)).mean())
    assert accuracy > 0.85, accuracy
