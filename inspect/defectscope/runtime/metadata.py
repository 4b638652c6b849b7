"""The versioned JSON document that makes an exported ONNX model self-describing.

Export writes it into ``metadata_props[METADATA_KEY]``; the runner reads and validates it, so a
line PC needs nothing but the ``.onnx`` file.  numpy/Pillow-free and torch-free by design.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .image import LoaderConfig

METADATA_KEY = "defectscope"
FORMAT_NAME = "defectscope.model"
FORMAT_VERSION = 1
#: test-time flips an export can build into the graph (``defectscope.models.tta``): name -> the
#: flipped axes of each extra copy of the image (NCHW: 3 = left-right, 2 = up-down)
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "hflip": ((3,),),
    "flips": ((3,), (2,), (2, 3)),
}
TTA_NAMES: tuple[str, ...] = tuple(TTA_FLIPS)


class MetadataError(ValueError):
    """The model's metadata is missing, foreign, older or malformed."""


@dataclass
class ModelMetadata:
    """Everything the runner needs besides the graph.

    Decision rule: ``defect_prob = 1 - P(good_class)``; verdict NG when ``defect_prob >= threshold``.
    """

    class_names: list[str]
    good_class: str
    threshold: float
    channels: int
    mean: list[float]
    std: list[float]
    max_side: int | None
    min_size: int
    size_multiple: int
    max_pixels: int
    model_name: str
    package_version: str
    total_stride: int = 1
    outputs: list[str] = field(default_factory=lambda: ["logits", "probs", "cam"])
    fp16: bool = False
    #: static int8 (QDQ) graph for CPU line PCs; ``quantization`` holds its calibration and gate figures
    int8: bool = False
    quantization: dict[str, Any] = field(default_factory=dict)
    #: flips averaged inside the graph (logits of the flipped copies); costs ``tta_views`` passes per image
    tta: str = "none"
    mlflow_run_id: str | None = None
    checkpoint_sha256: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    #: where the threshold came from: chosen on this graph for a recall target, or set by hand
    threshold_source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = []
        if len(self.class_names) < 2:
            problems.append(f"class_names needs at least 2 names, got {self.class_names!r}")
        if self.good_class not in self.class_names:
            problems.append(f"good_class {self.good_class!r} is not one of class_names {self.class_names!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            problems.append(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(
                f"mean/std need {self.channels} values (channels), got {len(self.mean)}/{len(self.std)}"
            )
        if self.fp16 and self.int8:
            problems.append("fp16 and int8 exclude each other")
        if self.tta not in TTA_NAMES:
            problems.append(f"tta must be one of {', '.join(TTA_NAMES)}, got {self.tta!r}")
        if any(float(s) <= 0 for s in self.std):
            problems.append(f"std values must be > 0, got {self.std!r}")
        if problems:
            raise MetadataError("invalid defectscope metadata: " + "; ".join(problems))

    @property
    def good_index(self) -> int:
        return self.class_names.index(self.good_class)

    @property
    def tta_views(self) -> int:
        """Backbone passes per image that the graph runs (1 without test-time flips)."""
        return 1 + len(TTA_FLIPS[self.tta])

    @property
    def variant(self) -> str:
        """One line for logs and reports, e.g. ``int8, test-time flips (4 views)``."""
        kind = "int8" if self.int8 else "fp16" if self.fp16 else "fp32"
        return kind if self.tta == "none" else f"{kind}, test-time {self.tta} ({self.tta_views} views)"

    def loader_config(self) -> LoaderConfig:
        return LoaderConfig(
            channels=self.channels,
            max_side=self.max_side,
            min_size=self.min_size,
            size_multiple=self.size_multiple,
            max_pixels=self.max_pixels,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, source: str = "model") -> ModelMetadata:
        """Parse and validate; errors name the source and every missing key."""
        if not text:
            raise MetadataError(
                f"{source}: no {METADATA_KEY!r} metadata; this is not a model exported by "
                "`defectscope export` (re-export it with defectscope)"
            )
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{source}: metadata is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise MetadataError(
                f"{source}: metadata format is {doc.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise MetadataError(
                f"{source}: metadata format_version {version!r} is not supported "
                f"(this runner reads version {FORMAT_VERSION}); re-export the model"
            )
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - doc.keys())
        if missing:
            raise MetadataError(f"{source}: metadata lacks required keys: {', '.join(missing)}")
        return cls(**{k: v for k, v in doc.items() if k in known})
