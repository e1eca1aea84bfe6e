"""Pydantic models of every public request and response. The OpenAPI document is built from
these, so a field's `description` is its documentation. Stored records have their own models
(`service.storage.records`); the training options are declared once, in `models.options`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.export import FORMATS as EXPORT_FORMATS
from models.options import (AugmentationOptions, HeadOptions, Strict, TrainingOptions,
                            VersionOptions)
from service.storage.records import ClassifierRecord, ClassifierVersions, Status

__all__ = ["AugmentationOptions", "HeadOptions", "TrainingOptions",  # part of the public API
           "VersionOptions"]


# ---------------------------------------------------------------- classifier resource


class SkippedFileOut(BaseModel):
    path: str
    reason: str


class DatasetSummary(BaseModel):
    images: int
    per_label: dict[str, int]
    skipped: list[SkippedFileOut] = Field(
        [], description="The first skipped files (at most 100), with the reason for each")
    skipped_total: int = Field(0, description="How many files were skipped in all")


#: The training stages, in the order a run goes through them (models.training.STAGES).
TrainingStage = Literal["preview", "augmented", "fine_tuned"]


class ProgressOut(BaseModel):
    stage: Literal["queued", "extracting", "training", "fine_tuning"]
    training_stage: TrainingStage | None = Field(
        None, description="Which head the run is making: preview (un-augmented features), "
                          "augmented, fine_tuned")
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
    precision: str = Field("float32", description="The compute precision the features come from "
                                                  "(a Keras dtype policy); a head is trained and "
                                                  "served on one")
    precision_reason: str | None = Field(
        None, description='Why, e.g. "auto: avx512_bf16" or "set explicitly"')

    @field_validator("precision", mode="before")
    @classmethod
    def _float32_before_it_was_stored(cls, value):
        return "float32" if value is None else value


class ErrorOut(BaseModel):
    title: str
    detail: str


class FineTunedOut(BaseModel):
    """A fine-tuned classifier's own blocks: what trained and how far it moved."""

    blocks: int = Field(description="1: block5_* trained; 2: block4_* and block5_*")
    l2_sp: float = Field(description="α of the penalty α/2·‖w − w⁰‖² toward the ImageNet weights")
    learning_rate: float
    relative_shift: dict[str, float] = Field(
        description="Per trained conv layer, ‖w − w⁰‖/‖w⁰‖ of its kernel")


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
    error: ErrorOut | None = Field(None, description="Why training failed; on a ready "
                                                     "classifier, why its refinement stopped")
    options: TrainingOptions
    fine_tuned: FineTunedOut | None = Field(
        None, description="The served head's own fine-tuned blocks, or null (frozen backbone)")
    stage: TrainingStage | None = Field(
        None, description="The training stage of the served head (ready classifiers)")
    refining: bool = Field(
        False, description="Ready, and a later stage is still training: a better head may "
                           "replace the served one (then `progress` is non-null too)")
    version: int = Field(1, description="The version `production` names: what predict uses")
    versions: int = Field(1, description="How many versions there are")
    aliases: dict[str, int] = Field({"production": 1}, description="Alias → version")
    threshold: float | None = Field(
        None, description="The default rejection threshold on the calibrated top score, chosen "
                          "on validation (training option reject); null before the classifier is "
                          "ready or for one trained before it existed")

    @classmethod
    def from_record(cls, record: ClassifierRecord,
                    versions: ClassifierVersions | None = None) -> Classifier:
        """The public view of production's stored record: only the fields this model declares."""
        versions = versions or ClassifierVersions()
        return cls.model_validate({**_public(record, cls), "version": record.version,
                                   "versions": len(versions.versions),
                                   "aliases": versions.aliases})


def _public(record: ClassifierRecord, model: type[BaseModel]) -> dict:
    """A stored record's fields that `model` declares, the nested ones cut to theirs too."""
    data = record.model_dump(include=set(model.model_fields))
    if data["dataset"].get("skipped_total") is None:  # records written before it was kept
        data["dataset"]["skipped_total"] = len(data["dataset"]["skipped"])
    for name, part in (("dataset", DatasetSummary), ("progress", ProgressOut)):
        if data.get(name) is not None:
            data[name] = {key: value for key, value in data[name].items()
                          if key in part.model_fields}
    return data


class Version(BaseModel):
    """One version of a classifier: one training run on one dataset."""

    version: int
    status: Status
    labels: list[str]
    created_at: datetime
    updated_at: datetime
    dataset: DatasetSummary
    progress: ProgressOut | None = None
    metrics: MetricsOut | None = None
    fine_tuned: dict[str, Any] | None = Field(
        None, description="The fine-tuned blocks, or null for a frozen backbone")
    threshold: float | None = Field(None, description="Its default rejection threshold")
    stage: TrainingStage | None = Field(
        None, description="The training stage of its served head (ready versions)")
    refining: bool = Field(
        False, description="Ready, and a later stage is still training (see the classifier's "
                           "`refining`)")
    error: ErrorOut | None = None
    aliases: list[str] = Field(description="The aliases that point at this version")
    base: int | None = Field(None, description="The version whose images this one started from "
                                               "(null: only its own, `replace`)")
    promote: Literal["if_better", "always", "never"]
    promotion: dict[str, Any] | None = Field(
        None, description="Once trained: whether it took production and why (the comparison on "
                          "images production never trained on)")
    options: TrainingOptions

    @classmethod
    def from_record(cls, record: ClassifierRecord, versions: ClassifierVersions) -> Version:
        data = _public(record, cls)
        data["fine_tuned"] = getattr(record, "fine_tuned", None)
        return cls.model_validate({**data, "aliases": versions.aliases_of(record.version),
                                   "promotion": versions.promotions.get(str(record.version))})


class VersionList(BaseModel):
    versions: list[Version] = Field(description="Newest first")


class AliasIn(Strict):
    version: int = Field(ge=1, description="The version the alias points at")


class Aliases(BaseModel):
    classifier_id: str
    aliases: dict[str, int]


class ClassifierList(BaseModel):
    classifiers: list[Classifier]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


# ---------------------------------------------------------------- prediction


class Base64Image(Strict):
    b64: str = Field(description="The image file, base64-encoded")


class PredictRequest(Strict):
    instances: list[Base64Image] = Field(min_length=1)


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str | None = Field(description="The predicted label; null when rejected")
    score: float = Field(description="The top label's calibrated score, rejected or not")
    top_k: list[LabelScore]
    rejected: bool = Field(False, description="True when the classifier does not recognise the "
                                              "image: see reason")
    reason: Literal["below_threshold", "out_of_distribution"] | None = Field(
        None, description="Why it was rejected: below_threshold (the top score is under the "
                          "threshold), out_of_distribution (the image is unlike every training "
                          "image)")


class PredictionResponse(BaseModel):
    classifier_id: str
    version: int = Field(1, description="The version that answered")
    predictions: list[Prediction]


class AuthOut(BaseModel):
    """What the caller may do. Without keys configured everyone may do everything (admin)."""

    scope: Literal["admin", "predict"] = Field(
        description="admin: everything; predict: list, get, read reports and predict")
    keys_required: bool = Field(description="Whether this server asks for an API key")


class ListQuery(Strict):
    limit: int = Field(100, ge=1, le=1000, description="Most classifiers in one page")
    cursor: str | None = Field(None, pattern=r"^clf_[0-9a-z]{20}$",
                               description="`next_cursor` of the previous page (a classifier id)")


class PredictQuery(Strict):
    top_k: int = Field(5, ge=1, le=1000, description="How many labels to list per image")
    version: int | None = Field(None, ge=1, description="Predict with this version; default: "
                                                          "production")
    alias: str | None = Field(None, max_length=40, description="Predict with the version this "
                                                               "alias names")
    threshold: float | None = Field(
        None, ge=0, le=1, description="Reject predictions whose calibrated top score is below "
                                      "this (400 outside 0-1); default: the classifier's "
                                      "threshold")


class SuggestQuery(Strict):
    limit: int = Field(20, ge=1, le=1000, description="Most images to list")
    method: Literal["margin", "entropy"] = Field(
        "margin", description="margin: 1 - (p1 - p2) of the two best calibrated scores; "
                              "entropy: of all scores, normalised to 0-1")


class Suggestion(BaseModel):
    path: str = Field(description="The image's path in the uploaded zip")
    uncertainty: float = Field(description="By `method`, 0-1: higher is more unsure")
    label: str = Field(description="The classifier's current prediction")
    score: float = Field(description="Its calibrated score")
    out_of_distribution: bool = Field(
        description="Unlike every training image: listed after the others (it may need a new "
                    "label, or none)")


class SuggestResponse(BaseModel):
    """Unlabeled images ranked by how much a label for each would help, most first."""

    classifier_id: str
    method: Literal["margin", "entropy"]
    images: int = Field(description="Images scored")
    suggestions: list[Suggestion]
    skipped: list[SkippedFileOut] = Field([], description="Files that are not usable images")


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


class StageOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    stage: TrainingStage
    val_loss: float = Field(description="Out-of-fold validation loss of the stage's head")
    val_accuracy: float
    elapsed_s: float = Field(description="Seconds from the start of training to the head")
    served: bool = Field(description="Whether it replaced the served head (its loss was lower "
                                     "than every earlier stage's)")
    augmentation: dict | None = Field(
        None, description="Where the stage's selection compared its linear head trained on "
                          "augmented views with the same head on the originals only: "
                          "{augmented, original (candidate indices), gain (mean per-image "
                          "out-of-fold loss of the original less the augmented), gain_se, "
                          "earned (gain > gain_se: the views are served), rule}")


class CalibrationOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float = Field(description="Scores are softmax(logits / temperature)")
    ece_before: float = Field(description="Expected calibration error of the out-of-fold "
                                          "scores before scaling (15 bins)")
    ece_after: float


class HealthOut(BaseModel):
    """What in the dataset makes the classifier worse or its metrics wrong; every entry names
    archive paths."""

    model_config = ConfigDict(extra="allow")
    duplicates: list[dict[str, Any]] = Field(
        description="Files with the same bytes: paths, labels, across_split (leakage), "
                    "conflicting_labels")
    near_duplicates: list[dict[str, Any]] = Field(
        description="Pairs of distinct files with nearly the same features: paths, labels, "
                    "similarity, across_split")
    suspected_mislabels: list[dict[str, Any]] = Field(
        description="path, given, predicted, confidence: out-of-fold predictions that disagree "
                    "with the folder (confident learning)")
    imbalance: dict[str, Any]
    warnings: list[str]
    counts: dict[str, int] = {}


class FeatureCacheReport(BaseModel):
    """The training run's (image, view) features: how many came from the classifier's feature
    cache, how many the backbone computed, and what the cache holds after the run."""

    requested: int = Field(description="(image, view) features the run needed")
    from_cache: int = Field(description="Of those, read from the feature cache")
    computed: int = Field(description="Of those, computed by the backbone (one image pass each)")
    stored: int = Field(description="(image, view) features the cache holds after the run")
    dropped: int = Field(description="Features not kept because of the bound (oldest first)")
    bytes: int = Field(description="Size of the cache's features and keys after the run")
    max_bytes: int = Field(description="The bound, HEADSTART_FEATURE_CACHE_BYTES")
    note: str | None = Field(None, description="Why something was not read or stored")


class Report(BaseModel):
    """The training report of the served head."""

    classifier_id: str
    stage: TrainingStage = Field("augmented", description="The training stage that made this "
                                                          "head")
    final: bool = Field(True, description="False while the run goes on and a later stage may "
                                          "still replace this head; computed from the "
                                          "classifier when the report is read")
    stages: list[StageOut] = Field(
        [], description="Every training stage run so far, in order (empty for classifiers "
                        "trained before stages)")
    labels: list[str]
    m: DatasetSizes
    d: int = Field(description="Trainable parameters: the head's, plus the trained conv layers' "
                               "when fine-tuned")
    d_over_m: float
    diagnosis: list[str]
    head: HeadOptions
    selection: dict[str, Any] | None = Field(
        None, description="How the head was chosen: k-fold cross-validation of every candidate "
                          "(mean, std and standard error of validation loss and accuracy), the "
                          "rule, the chosen one and how it was refitted")
    candidates: list[dict[str, Any]] | None = Field(
        None, description="Reports made before cross-validation: heads tried, with their best "
                          "validation loss")
    history: list[EpochRow] = Field(
        description="The chosen head's learning curve: per epoch, the mean over its folds that "
                    "ran it (`folds` says how many), while more than half of them did")
    best_epoch: int
    stopped_early: bool
    train_accuracy: float
    validation: ValidationResult
    options: TrainingOptions
    timings_s: dict[str, float]
    features: FeatureCacheReport | None = Field(
        None, description="Where the (image, view) features came from: the classifier's feature "
                          "cache or the backbone")
    backbone: BackboneOut
    device: str = Field(description="Where the head was trained and features extracted")
    precision: str = Field("float32", description="The backbone's compute precision in training")
    fine_tuned: FineTunedOut | None = Field(
        None, description="The served head's fine-tuned blocks, or null (frozen backbone)")
    fine_tuning: dict[str, Any] | None = Field(
        None, description="What the fine-tuning stage did: ran or not and why, the candidates "
                          "tried on the held-out split with their validation loss, the frozen "
                          "head's loss on the same images, which won and by how much")
    promotion: dict[str, Any] | None = Field(
        None, description="Versions 2 and up: this version against production's, on the images "
                          "production never trained on (null for a first version)")
    calibration: CalibrationOut | None = Field(
        None, description="Temperature scaling fitted on the out-of-fold scores; null for "
                          "classifiers trained before it existed")
    threshold: float | None = Field(None, description="The classifier's default threshold")
    rejection: dict[str, Any] | None = Field(
        None, description="How the threshold was chosen: target_precision, and the out-of-fold "
                          "precision and coverage it gives")
    ood: dict[str, Any] | None = Field(
        None, description="The out-of-distribution check: enabled, method, threshold, bytes")
    health: HealthOut | None = None


# ---------------------------------------------------------------- operations


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = Field(
        None, description="Field-level problems: the first 20")
    errors_total: int | None = Field(
        None, description="How many field-level problems there were, when more than 20")


class Health(BaseModel):
    status: Literal["ok"]


class Startup(BaseModel):
    status: str = Field(description='"ok", "loading", or why the backbone failed to load')


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Annotated[str, Field(description='"ok" or the reason it is not')]]
    backbone: BackboneOut | None = None
    precisions: list[str] = Field(
        [], description="The precisions this process computes in: its own (backbone.precision) "
                        "first, then any loaded to serve classifiers trained in another")


# ---------------------------------------------------------------- export


class ExportQuery(Strict):
    format: Literal[EXPORT_FORMATS] = Field(
        description="savedmodel (decodes JPEG/PNG/GIF/BMP bytes itself, or takes pixels), tflite "
                    "or onnx (take pixels)")
    version: int | None = Field(None, ge=1, description="The version to export; default: the "
                                                          "served one")


class ExportJob(BaseModel):
    """An export being built: poll the `Location` until it answers 200 with the zip."""

    classifier_id: str
    format: str
    version: int
    status: Literal["building"] = "building"
