"""What a running training job tells its caller, and how the caller stops it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class Cancelled(Exception):
    """Raised inside training when `should_stop` says the job was cancelled."""


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running job, for the classifier resource.

    Attributes:
        stage: "extracting" (backbone passes) or "training" (heads on cached features).
        training_stage: which head of a staged run is being made ("preview", "augmented",
            see `models.training.STAGES`), or None outside staged training.
        images_done, images_total: extraction progress.
        epoch, max_epochs, val_accuracy: the fit currently running.
        candidate: which fit runs, e.g. "2/10 fold 3/5" while heads are cross-validated, or
            "refit" for the chosen head's final fit on every image.
        history: the rows so far of the fit currently running, one per epoch:
            {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}, for live learning
            curves; a new fit (the next candidate or fold) starts a new one. Empty during the
            refit, which has no validation rows.
    """

    stage: str
    images_done: int | None = None
    images_total: int | None = None
    epoch: int | None = None
    max_epochs: int | None = None
    val_accuracy: float | None = None
    candidate: str | None = None
    history: tuple[dict, ...] = ()
    training_stage: str | None = None


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]
