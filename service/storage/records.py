"""What the store keeps of a classifier: its record, a stored format of its own.

The record is not the public resource (`service.api.schemas.Classifier` is built from it), so an
API change cannot silently change what is on disk. `schema_version` names the format; records
written before it existed (no field) are version 1 and load unchanged.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.options import HeadOptions, TrainingOptions

#: The format this code writes. 1: records before `schema_version` existed (same fields).
#: Fields added since with a default (`version`, `promote`, `base`: a record without them is
#: version 1) keep the format: older code reads them as extra fields.
SCHEMA_VERSION = 2

Status = Literal["queued", "training", "ready", "failed", "cancelled"]
ACTIVE_STATUSES = ("queued", "training")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Stored(BaseModel):
    # NB: fields a newer writer added are kept, not refused, so a rolling upgrade can read them.
    model_config = ConfigDict(extra="allow")


class SkippedFile(Stored):
    path: str
    reason: str


class DatasetInfo(Stored):
    images: int
    per_label: dict[str, int]
    skipped: list[SkippedFile] = []
    skipped_total: int | None = None  # when `skipped` holds only the first entries


class Progress(Stored):
    stage: str
    images_done: int | None = None
    images_total: int | None = None
    epoch: int | None = None
    max_epochs: int | None = None
    val_accuracy: float | None = None
    candidate: str | None = None
    history: list[dict[str, Any]] = []
    training_stage: str | None = None


class Metrics(Stored):
    val_accuracy: float
    val_loss: float


class Backbone(Stored):
    name: str
    weights: str
    image_size: int
    features: str | None = None
    source: str | None = None
    fingerprint: str | None = None
    precision: str | None = None  # the features' Keras dtype policy (None: stored before, float32)
    precision_reason: str | None = None


class Error(Stored):
    title: str
    detail: str


class Lease(Stored):
    """Which worker runs the job, and when it last said so. A lease older than
    `lease_seconds` means the worker is gone."""

    owner: str
    heartbeat_at: datetime

    def expired(self, lease_seconds: float, now: datetime | None = None) -> bool:
        return ((now or utc_now()) - self.heartbeat_at).total_seconds() > lease_seconds


class ClassifierRecord(Stored):
    """A classifier and its job's bookkeeping, as stored in `classifiers/{id}/record.json`."""

    schema_version: int = 1
    id: str
    name: str
    status: Status
    labels: list[str]
    created_at: datetime
    updated_at: datetime
    dataset: DatasetInfo
    progress: Progress | None = None
    metrics: Metrics | None = None
    backbone: Backbone | None = None
    error: Error | None = None
    options: TrainingOptions
    attempts: int = 0
    lease: Lease | None = None
    run: str | None = Field(None, description="The training run whose head and report are current")
    head: HeadOptions | None = None
    fine_tuned: dict[str, Any] | None = Field(
        None, description="The committed head's fine-tuned blocks: blocks, l2_sp, learning_rate, "
                          "relative_shift; None when the blocks are the shared frozen ones")
    training_seconds: float | None = None
    stage: str | None = Field(None, description="The training stage whose head `run` is")
    refining: bool = Field(False, description="Ready, and its run is still making a better head")
    stages: list[dict[str, Any]] = Field(
        [], description="One summary per training stage run so far (models.training.stage_summary)")
    # Versions (records written before them are version 1; `promote` only matters for 2 and up)
    version: int = 1
    promote: Literal["if_better", "always", "never"] = "if_better"
    base: int | None = Field(None, description="The version whose images this one started from")
    threshold: float | None = Field(
        None, description="The committed head's default rejection threshold (None: stored "
                          "before trust data existed, or not ready)")

    @property
    def in_flight(self) -> bool:
        """Whether a job may still write this record: queued, training, or refining a served
        head (what the store's `active/` index lists)."""
        return self.status in ACTIVE_STATUSES or self.refining

    @property
    def features_precision(self) -> str:
        """The compute precision of its head's features: the backbone's, or float32 for records
        written before it was stored (float32 was the only default then)."""
        return (self.backbone.precision if self.backbone else None) or "float32"

    def to_json(self) -> bytes:
        return self.model_copy(update={"schema_version": SCHEMA_VERSION}).model_dump_json().encode()


class ClassifierVersions(Stored):
    """A classifier's versions and aliases, as stored in `classifiers/{id}/versions.json`.

    Its own object with its own compare-and-set, apart from the version records: moving an alias
    never touches a record a training run is writing. A classifier without this object (every
    classifier made before versions) has one version, 1, and `production` points at it.
    """

    versions: list[int] = [1]
    last: int = 1
    aliases: dict[str, int] = {"production": 1}
    promotions: dict[str, dict[str, Any]] = Field(
        {}, description="Per version (as a string): what its promotion decided and why")

    @property
    def production(self) -> int:
        return self.aliases.get("production", self.versions[0] if self.versions else 1)

    def aliases_of(self, version: int) -> list[str]:
        return sorted(name for name, target in self.aliases.items() if target == version)
