"""Training options: the one declaration of each option's name, default, bounds and meaning.

The API accepts these as the `options` part of a create request (its OpenAPI document is built
from them), the store keeps them in the classifier's record, and training reads them. Pure
pydantic: importing this module imports no TensorFlow.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Rejects unknown fields: a typo in an option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


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
