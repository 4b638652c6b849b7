"""The torch-free line runtime: image loading, model metadata and ONNX Runtime inspection.

Only numpy, Pillow and onnxruntime may be imported here (a test enforces it).
"""

from .image import ERROR_KINDS, ImageLoadError, LoaderConfig, load_image, normalize_batch, target_size
from .metadata import METADATA_KEY, MetadataError, ModelMetadata

__all__ = [
    "ERROR_KINDS",
    "METADATA_KEY",
    "ImageLoadError",
    "LoaderConfig",
    "MetadataError",
    "ModelMetadata",
    "load_image",
    "normalize_batch",
    "target_size",
]
