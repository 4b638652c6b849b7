"""The torch-free line runtime: image loading, model metadata and ONNX Runtime inspection.

Only numpy, Pillow and onnxruntime may be imported here (a test enforces it); onnxruntime is
imported when an :class:`Inspector` is created, so importing this package stays cheap.
"""

from .decision import Decision, decide, defect_probability, is_ng
from .image import ERROR_KINDS, ImageLoadError, LoaderConfig, load_image, normalize_batch, target_size
from .inspector import Inspector, ModelLoadError
from .metadata import METADATA_KEY, MetadataError, ModelMetadata
from .providers import ProviderError

__all__ = [
    "ERROR_KINDS",
    "METADATA_KEY",
    "Decision",
    "ImageLoadError",
    "Inspector",
    "LoaderConfig",
    "MetadataError",
    "ModelLoadError",
    "ModelMetadata",
    "ProviderError",
    "decide",
    "defect_probability",
    "is_ng",
    "load_image",
    "normalize_batch",
    "target_size",
]
