"""Pydantic models of every request, response and stored record. The OpenAPI document is built
from these, so a field's `description` is its documentation."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "training", "ready", "failed", "cancelled"]
ACTIVE_STATUSES = ("queued", "training")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Strict(BaseModel):
    """Rejects unknown fields: a typo in an option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- training options


class AugmentationOptions(Strict):
    noise: float = Field(8.0, ge=0, le=64, description="Std of Gaussian pixel noise (0-255 units)")
    flip: bool = Field(True, description="Mirror half of the views left-right")
    rotation: float = Field(15.0, ge=0, le=180, description="Largest rotation, degrees either way")
    shift: float = Field(0.1, ge=0, lt=0.5, description="Largest shift, fraction of the side")
    views: int = Field(4, ge=0, le=32, description="Augmented views per training image, besides the original")


class HeadOptions(Strict):
    hidden_units: int = Field(0, ge=0, le=4096, description="Hidden layer width; 0 = linear head")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on the head's inputs")
    l2: float = Field(1e-3, ge=0, le=10, description="L2 penalty on the dense kernels")


class TrainingOptions(Strict):
    """The `options` part of a create request. Every field is optional."""

    name: str | None = Field(None, min_length=1, max_length=200, description="Display name")
    validation_split: float = Field(0.2, gt=0, le=0.5, description="Share of each label held out")
    max_epochs: int = Field(100, ge=1, le=1000)
    patience: int = Field(10, ge=0, le=200, description="Epochs without val_loss improvement before stopping")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augmentation: AugmentationOptions = Field(default_factory=AugmentationOptions)
    head: HeadOptions | Literal["auto"] = Field(
        "auto", description='"auto" picks the head by validation loss among a few small candidates')


# ---------------------------------------------------------------- classifier resource


class SkippedFileOut(BaseModel):
    path: str
    reason: str


class DatasetSummary(BaseModel):
    images: int
    per_label: dict[str, int]
    skipped: list[SkippedFileOut] = []


class ProgressOut(BaseModel):
    stage: Literal["queued", "extracting", "training"]
    images_done: int | None = None
    images_total: int | None = None
    epoch: int | None = None
    max_epochs: int | None = None
    val_accuracy: float | None = None
    candidate: str | None = Field(None, description='Head candidate being trained, e.g. "2/4"')
    history: list[EpochRow] = Field(
        default_factory=list, description="The learning curve of the fit now running, one row "
                                          "per epoch so far (a new fit starts a new one)")


class MetricsOut(BaseModel):
    val_accuracy: float
    val_loss: float


class BackboneOut(BaseModel):
    name: str
    weights: str
    image_size: int
    features: str | None = Field(None, description="How a feature vector is pooled from the base")
    source: str | None = None
    fingerprint: str | None = None


class ErrorOut(BaseModel):
    title: str
    detail: str


class Classifier(BaseModel):
    """A classifier as users see it."""

    id: str
    name: str
    status: Status
    labels: list[str]
    created_at: datetime
    updated_at: datetime
    dataset: DatasetSummary
    progress: ProgressOut | None = None
    metrics: MetricsOut | None = None
    backbone: BackboneOut | None = None
    error: ErrorOut | None = None
    options: TrainingOptions


class ClassifierList(BaseModel):
    classifiers: list[Classifier]


class Lease(BaseModel):
    """Which worker runs the job, and when it last said so. A lease older than
    `lease_seconds` means the worker is gone."""

    owner: str
    heartbeat_at: datetime

    def expired(self, lease_seconds: float, now: datetime | None = None) -> bool:
        return ((now or utc_now()) - self.heartbeat_at).total_seconds() > lease_seconds


class ClassifierRecord(Classifier):
    """What the store keeps: the public resource plus the job's bookkeeping."""

    attempts: int = 0
    lease: Lease | None = None
    run: str | None = Field(None, description="The training run whose head and report are current")
    head: HeadOptions | None = Field(None, description="The head that was trained")
    training_seconds: float | None = None

    def public(self) -> Classifier:
        return Classifier.model_validate(self.model_dump(include=set(Classifier.model_fields)))


# ---------------------------------------------------------------- prediction


class Base64Image(Strict):
    b64: str = Field(description="The image file, base64-encoded")


class PredictRequest(Strict):
    instances: list[Base64Image] = Field(min_length=1)


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictionResponse(BaseModel):
    classifier_id: str
    predictions: list[Prediction]


class PredictQuery(Strict):
    top_k: int = Field(5, ge=1, le=1000, description="How many labels to list per image")


class EventsQuery(Strict):
    last_event_id: str | None = Field(
        None, max_length=200, description="Resume after this event id, for clients that cannot "
                                          "send the Last-Event-ID header (which wins)")


# ---------------------------------------------------------------- report


class LabelCounts(BaseModel):
    train: int
    validation: int


class DatasetSizes(BaseModel):
    train: int
    validation: int
    train_after_augmentation: int
    per_label: dict[str, LabelCounts]


class LabelScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class ValidationResult(BaseModel):
    accuracy: float
    loss: float
    per_label: dict[str, LabelScores]
    confusion_matrix: list[list[int]] = Field(description="Rows: true label; columns: predicted")


class EpochRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float


class Report(BaseModel):
    """The training report of a finished classifier."""

    classifier_id: str
    labels: list[str]
    m: DatasetSizes
    d: int = Field(description="Trainable parameters of the head")
    d_over_m: float
    diagnosis: list[str]
    head: HeadOptions
    candidates: list[dict[str, Any]] = Field(description="Heads tried, with their best validation loss")
    history: list[EpochRow]
    best_epoch: int
    stopped_early: bool
    train_accuracy: float
    validation: ValidationResult
    options: TrainingOptions
    timings_s: dict[str, float]
    backbone: BackboneOut
    device: str = Field(description="Where the head was trained and features extracted")
    precision: str = Field("float32", description="The backbone's compute precision in training")


# ---------------------------------------------------------------- operations


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Startup(BaseModel):
    status: str = Field(description='"ok", "loading", or why the backbone failed to load')


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Annotated[str, Field(description='"ok" or the reason it is not')]]
    backbone: BackboneOut | None = None
