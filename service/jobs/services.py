"""What the use cases need, built complete by the composition root (`service.app`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.jobs.datasets import DatasetLimits

if TYPE_CHECKING:
    from service.config import Settings
    from service.metrics import Metrics
    from service.serving.backbone import BackboneHolder, HeadCache
    from service.storage.classifiers import ClassifierStore
    from service.workers.thread import TrainingRunner


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: ClassifierStore
    backbone: BackboneHolder
    heads: HeadCache
    runner: TrainingRunner
    metrics: Metrics

    @property
    def dataset_limits(self) -> DatasetLimits:
        s = self.settings
        return DatasetLimits(max_members=s.max_dataset_members,
                             max_uncompressed_bytes=s.max_dataset_bytes,
                             max_image_bytes=s.max_image_bytes,
                             max_image_pixels=s.max_image_pixels,
                             max_dataset_pixels=s.max_dataset_pixels,
                             max_labels=s.max_labels)
