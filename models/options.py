"""Training options: the one declaration of each option's name, default, bounds and meaning.

The API accepts these as the `options` part of a create request (its OpenAPI document is built
from them), the store keeps them in the classifier's record, and training reads them
(`TrainingConfig` adds what the API does not expose). Pure pydantic: importing this module
imports no TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    """Rejects unknown fields: a typo in an option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class AugmentationOptions(Strict):
    """How training images are perturbed: each augmented view is one random affine transform
    (flip, rotation about the centre, shift) plus Gaussian pixel noise."""

    noise: float = Field(8.0, ge=0, le=64, description="Std of Gaussian pixel noise (0-255 units)")
    flip: bool = Field(True, description="Mirror half of the views left-right")
    rotation: float = Field(15.0, ge=0, le=180, description="Largest rotation, degrees either way")
    shift: float = Field(0.1, ge=0, lt=0.5, description="Largest shift, fraction of the side")
    views: int = Field(4, ge=0, le=32,
                       description="Augmented views per training image, besides the original")


class HeadOptions(Strict):
    """Architecture and regularisation of one head: standardisation → dropout → optional hidden
    ReLU layer → dense softmax, with L2 on the dense kernels.

    A linear head without dropout is a logistic regression and is solved exactly (L-BFGS); any
    other head is trained by Adam with early stopping.
    """

    hidden_units: int = Field(0, ge=0, le=4096, description="Hidden layer width; 0 = linear head")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on the head's inputs")
    l2: float = Field(1e-3, ge=0, le=10, description="L2 penalty on the dense kernels")

    @property
    def is_exact(self) -> bool:
        """True when the head is a plain logistic regression, solved exactly."""
        return self.hidden_units == 0 and self.dropout == 0

    def parameters(self, feature_dim: int, num_classes: int) -> int:
        """d: the trainable parameters of this head on `feature_dim` features."""
        if not self.hidden_units:
            return feature_dim * num_classes + num_classes
        return (feature_dim * self.hidden_units + self.hidden_units
                + self.hidden_units * num_classes + num_classes)

    def size_key(self, feature_dim: int, num_classes: int) -> tuple:
        """Orders heads from the smallest hypothesis up: fewer parameters, then stronger L2,
        then more dropout."""
        return (self.parameters(feature_dim, num_classes), -self.l2, -self.dropout)

    def as_dict(self) -> dict:
        return self.model_dump()


class HeadCandidate(Strict):
    """One candidate of `head: "auto"`: a head and the rows it is trained on."""

    head: HeadOptions
    trained_on: Literal["augmented", "original"] = Field(
        "augmented", description="augmented: every image's original and its augmented views; "
                                 "original: the un-augmented image only (a linear probe)")

    @property
    def path(self) -> tuple:
        """Candidates on one path differ only in L2: the same architecture, dropout and rows."""
        return (self.head.hidden_units, self.head.dropout, self.trained_on)

    def as_dict(self) -> dict:
        return {"head": self.head.as_dict(), "trained_on": self.trained_on}


#: L2 strengths of the logistic regressions, strongest first: five orders of magnitude, because
#: the right strength differs that much between data sets (bench/RESULTS.md: the lowest
#: cross-validated loss was at 0.1-0.3 on hymenoptera and flowers5, 1-3 on 20 images per
#: label); the weak end is for larger, cleaner data sets.
L2_PATH: tuple[float, ...] = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
#: The heads of `head: "auto"` trained on augmented rows: logistic regressions (linear heads
#: without dropout, solved exactly) along `L2_PATH`, and one hidden layer that must beat the
#: best of them by more than a standard error to be chosen.
AUTO_HEADS: tuple[HeadOptions, ...] = (
    *(HeadOptions(hidden_units=0, dropout=0.0, l2=l2) for l2 in L2_PATH),
    HeadOptions(hidden_units=256, dropout=0.5, l2=1e-3),
)
#: Candidates of `head: "auto"`, chosen by k-fold cross-validation (`models.selection`): the
#: lowest mean validation loss along each L2 path, then the one-standard-error rule between
#: paths. Besides `AUTO_HEADS` on augmented rows, the same logistic regressions on the
#: originals only: the linear probe a careful practitioner tries first, scored on the same
#: folds, so the choice is at least as good as the probe up to cross-validation noise where
#: augmentation does not help.
AUTO_CANDIDATES: tuple[HeadCandidate, ...] = (
    *(HeadCandidate(head=head) for head in AUTO_HEADS),
    *(HeadCandidate(head=HeadOptions(hidden_units=0, dropout=0.0, l2=l2), trained_on="original")
      for l2 in L2_PATH),
)


class FineTuneOptions(Strict):
    """One fine-tuning run of the deepest VGG16 blocks, tethered to the ImageNet weights by
    L2-SP: the loss adds α/2·‖w − w⁰‖² over the trained conv kernels to the head's own L2."""

    blocks: Literal[1, 2] = Field(1, description="1 trains block5_*, 2 trains block4_* and "
                                                 "block5_*; lower blocks stay frozen and shared")
    l2_sp: float = Field(0.01, ge=0, le=100,
                         description="α of the L2-SP penalty α/2·‖w − w⁰‖² (w⁰: ImageNet weights)")
    learning_rate: float = Field(1e-5, gt=0, le=0.01,
                                 description="Adam's step size for the blocks and the head")
    max_epochs: int = Field(10, ge=1, le=200, description="Epoch limit of fine-tuning")
    patience: int = Field(3, ge=0, le=50,
                          description="Epochs without val_loss improvement before stopping")


#: What `fine_tune: "auto"` tries, cheapest and most tethered first, as many as the time
#: budget allows (at least the first): block5 only, at two tether strengths and two step sizes.
AUTO_FINE_TUNES: tuple[FineTuneOptions, ...] = (
    FineTuneOptions(blocks=1, l2_sp=0.01, learning_rate=1e-5),
    FineTuneOptions(blocks=1, l2_sp=0.1, learning_rate=1e-5),
    FineTuneOptions(blocks=1, l2_sp=0.01, learning_rate=1e-4),
)
class RejectOptions(Strict):
    """When predict answers "not recognised" (`"label": null, "rejected": true`) instead of a
    label. Scores are calibrated (temperature scaling on the out-of-fold scores) either way."""

    target_precision: float | None = Field(
        None, gt=0, le=1,
        description="Choose the classifier's default threshold on its calibrated out-of-fold "
                    "scores: the lowest top score at which the predictions that pass reach this "
                    "precision; predictions below it are rejected (reason below_threshold). "
                    "null: threshold 0 (only ?threshold= rejects by score)")
    out_of_distribution: bool = Field(
        True, description="Reject images unlike every training image (reason "
                          "out_of_distribution): nearest-neighbour distance of their backbone "
                          "features, thresholded to keep 97 % of in-distribution images")


class TrainingOptions(Strict):
    """The `options` part of a create request. Every field is optional."""

    name: str | None = Field(None, min_length=1, max_length=200, description="Display name")
    validation_split: float = Field(
        0.2, gt=0, le=0.5,
        description="Share of each label held out per cross-validation fold: round(1 / "
                    "validation_split) folds (at most the smallest label's image count, at "
                    "least 2); every image is validated once, by a head that did not train on it")
    max_epochs: int = Field(100, ge=1, le=1000,
                            description="Epoch limit of heads trained by Adam")
    patience: int = Field(10, ge=0, le=200,
                          description="Epochs without val_loss improvement before stopping")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam's learning rate")
    batch_size: int = Field(64, ge=1, le=4096, description="Adam's batch size")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augmentation: AugmentationOptions = Field(default_factory=AugmentationOptions)
    head: HeadOptions | Literal["auto"] = Field(
        "auto", description='"auto" picks the head by k-fold cross-validation among linear heads '
                            "(L2 1e-4 to 10, trained on augmented views and on the originals "
                            "only) and one hidden layer: the lowest validation loss along each L2 "
                            "path, then the smallest head within one standard error of the best; "
                            "or a fixed head (trained on augmented views)")
    fine_tune: FineTuneOptions | Literal["off", "auto"] = Field(
        "auto", description='After the frozen head: "off"; "auto" (the default) fine-tunes '
                            "block5 with L2-SP when the frozen head leaves room on validation "
                            "and the estimated cost fits the worker's time budget "
                            "(HEADSTART_FINE_TUNE_BUDGET_S: on a GPU most data sets fit, on a "
                            "small CPU only small ones), trying up to three tether strengths "
                            "and step sizes, and keeps the result only if its validation loss "
                            "beats the frozen head's on the same images by more than a "
                            "standard error; or one fixed run")
    reject: RejectOptions | Literal["off"] = Field(
        default_factory=RejectOptions,
        description='Rejection: {"target_precision": p} sets a default threshold for a '
                    'precision, {"out_of_distribution": false} turns the out-of-distribution '
                    'check off; "off" turns both off (scores stay calibrated, ?threshold= still '
                    "applies). Default: no score threshold, out-of-distribution check on")


class TrainingConfig(TrainingOptions):
    """`TrainingOptions` plus what the API does not expose. Defaults are the product's.

    Attributes:
        candidates: the heads `head: "auto"` chooses from.
        fine_tune_candidates: what `fine_tune: "auto"` tries, in order, as the budget allows.
        extract_batch_size: images per backbone pass.
        max_image_pixels: decompression bombs: the upload limit applies in training too.
    """

    candidates: tuple[HeadCandidate, ...] = Field(AUTO_CANDIDATES, min_length=1)
    extract_batch_size: int = Field(32, ge=1)
    max_image_pixels: int = Field(40_000_000, gt=0)
    fine_tune_candidates: tuple[FineTuneOptions, ...] = Field(AUTO_FINE_TUNES, min_length=1)
    fine_tune_budget_s: float = Field(
        0.0, ge=0, description='Estimated seconds `fine_tune: "auto"` may spend; past it, it '
                               "is skipped (an explicit fine_tune runs regardless); 0: never")
    fine_tune_memory_bytes: int = Field(
        2 * 1024**3, gt=0, description="Cached activations past this spill to a memory-mapped "
                                       "temporary file")

    @field_validator("candidates", mode="before")
    @classmethod
    def _plain_heads_train_on_augmented_rows(cls, value):
        """A plain `HeadOptions` among the candidates is that head on augmented rows."""
        if isinstance(value, (list, tuple)):
            return tuple(HeadCandidate(head=v) if isinstance(v, HeadOptions) else v
                         for v in value)
        return value

    @classmethod
    def of(cls, options: TrainingOptions, **overrides) -> TrainingConfig:
        """The config of a run with these options, plus `overrides` of the config's own fields."""
        fields = {name: getattr(options, name) for name in TrainingOptions.model_fields}
        return cls(**{**fields, **overrides})

    @property
    def heads(self) -> tuple[HeadCandidate, ...]:
        """The heads to cross-validate: the candidates, or the one fixed head (trained on
        augmented rows)."""
        return self.candidates if self.head == "auto" else (HeadCandidate(head=self.head),)


class VersionOptions(TrainingOptions):
    """The `options` part of a new-version request: training options (those given replace the
    base version's; the others are the base version's), where its images come from, and whether
    it takes `production` when it is ready."""

    base: int | None = Field(None, ge=1, description="The version whose images (and options) "
                                                     "this one starts from; default: production")
    replace: bool = Field(False, description="Use only the images sent now, not the base's")
    promote: Literal["if_better", "always", "never"] = Field(
        "if_better", description='"if_better": take production only if this version is right '
                                 "on more of its images that production never trained on "
                                 "(out-of-fold predictions against production's); "
                                 '"always"; "never" (move the alias yourself)')

    def training_options(self, base: TrainingOptions) -> TrainingOptions:
        """The base version's options with the training options given here in their place."""
        given = {name: getattr(self, name) for name in self.model_fields_set
                 if name in TrainingOptions.model_fields}
        return base.model_copy(update=given)
