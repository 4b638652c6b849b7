"""Training data: sources, splits, the pre-training scan, bucket batches and the DataModule.

The DataModule (torch, Lightning) is imported lazily so that `defectscope scan` and the
sources stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import Sample, SourceData
from .sources import SourceError, build_source

if TYPE_CHECKING:
    from .datamodule import DefectDataModule
    from .sampler import BucketBatchSampler

__all__ = ["BucketBatchSampler", "DefectDataModule", "Sample", "SourceData", "SourceError", "build_source"]


def __getattr__(name: str) -> Any:
    if name == "DefectDataModule":
        from .datamodule import DefectDataModule

        return DefectDataModule
    if name == "BucketBatchSampler":
        from .sampler import BucketBatchSampler

        return BucketBatchSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
