"""What a training stage makes: a head, its report and what serving and storage need of it.

Its own module so that the stages (`models.training`, `models.finetune`) can share it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from models import trust
from models.options import HeadOptions
from models.selection import Selection


@dataclass
class TrainingResult:
    """A trained head and everything the report needs.

    Attributes:
        spec: the chosen head; head: the Keras head refitted on every image.
        report: JSON-ready (see `train_classifier`).
        selection: every candidate's cross-validation.
        trust: the head's calibration, default threshold and OOD detector (`models.trust`),
            stored in its head file.
        stage: the stage that made it ("preview", "augmented", "fine_tuned"; see `STAGES`).
        val_loss: its out-of-fold validation loss (unrounded): what stages are compared on.
        stages: one summary per stage run so far, in order (see `stage_summary`).
        upper: a fine-tuned head's own blocks, conv layer name → (kernel HWIO, bias) float16.
        fine_tuned: {"blocks", "l2_sp", "learning_rate", "relative_shift"} or None.
    """

    spec: HeadOptions
    head: keras.Model
    report: dict
    selection: Selection
    trust: trust.Trust | None = None
    stage: str = "augmented"
    val_loss: float = float("nan")
    stages: tuple[dict, ...] = ()
    upper: dict | None = None
    fine_tuned: dict | None = None
