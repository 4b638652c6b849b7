"""The versioned JSON document that makes an exported ONNX model self-describing.

Export writes it into ``metadata_props[METADATA_KEY]``; the runner reads and validates it, so a
line PC needs nothing but the ``.onnx`` file.  numpy/Pillow-free and torch-free by design.

The document is **untrusted input** (a model file may come from anywhere): :meth:`ModelMetadata.from_json`
caps its size and nesting, checks every field's type and range, and rejects what does not fit, with
an error naming the field.  Nothing in it is ever used to choose code.  Version 2 nests the loader
settings and adds the NG classes and the threshold's provenance; version 1 documents still load.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .decision import THRESHOLD_EXPECTED, DecisionRuleError, is_threshold, ng_class_names, ng_indices
from .grading import Grading, GradingError, is_finite_number
from .image import LoaderConfig

METADATA_KEY = "defectscope"
#: the one graph input every exported model has, (N, C, H, W) float32 normalised
INPUT_NAME = "input"
FORMAT_NAME = "defectscope.model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: one view of an image: (transposed, flipped axes); the transpose (H <-> W) comes first, then the
#: flips (NCHW: 3 = left-right, 2 = up-down)
View = tuple[bool, tuple[int, ...]]
_FLIPS: tuple[View, ...] = ((False, (3,)), (False, (2,)), (False, (2, 3)))
#: test-time views an export can build into the graph (``defectscope.models.tta``): name -> each
#: extra copy of the image; ``dihedral`` = all 8 symmetries of a square (training's ``data.dihedral``
#: draws from the same 8)
TTA_VIEWS: dict[str, tuple[View, ...]] = {
    "none": (),
    "hflip": ((False, (3,)),),
    "flips": _FLIPS,
    "dihedral": (*_FLIPS, (True, ()), *((True, axes) for _, axes in _FLIPS)),
}
TTA_NAMES: tuple[str, ...] = tuple(TTA_VIEWS)
OUTPUT_NAMES = ("logits", "probs", "cam")

#: caps on the untrusted document (generous for real models, small enough to keep a runner safe)
MAX_JSON_BYTES = 1 << 20
MAX_DEPTH = 8
MAX_CLASSES = 1000
MAX_NAME_CHARS = 200
MAX_CHANNELS = 64
MAX_SIDE = 1 << 16
MAX_PIXELS = 1 << 30
#: the ranges a model's normalisation may take: pixels in [0, 1] then stay finite in float32 (a std
#: of 1e-300 would be 0 there and make every probability NaN); checkpoints are held to the same
NORMALISATION_RANGE = {"mean": (-1e6, 1e6), "std": (1e-6, 1e6)}
#: the loader fields of a version-1 document (flat there, nested under ``loader`` since version 2)
LOADER_KEYS = ("channels", "max_side", "min_size", "size_multiple", "max_pixels")
#: loader fields added since: a document without one was made with the field's default
#: (``downscale``: "exact", the only policy before the field existed; ``upscale_to``: None, never enlarge)
LOADER_OPTIONAL_KEYS = ("downscale", "upscale_to")


class MetadataError(ValueError):
    """The model's metadata is missing, foreign, older or malformed."""


@dataclass
class ModelMetadata:
    """Everything the runner needs besides the graph.

    Decision rule (:mod:`.decision`): ``P(defect)`` = the summed probability of ``ng_classes``
    (empty = every class except ``good_class``); verdict NG when ``P(defect) >= threshold``.
    ``threshold_source`` says where the threshold came from (export fills it: the recall target,
    what it reached on how many validation images, the graph variant, or "set by hand").
    """

    class_names: list[str]
    good_class: str
    threshold: float
    loader: LoaderConfig
    mean: list[float]
    std: list[float]
    model_name: str
    package_version: str
    ng_classes: list[str] = field(default_factory=list)
    threshold_source: dict[str, Any] = field(default_factory=dict)
    total_stride: int = 1
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    fp16: bool = False
    #: static int8 (QDQ) graph for CPU line PCs; ``quantization`` holds its calibration and gate figures
    int8: bool = False
    quantization: dict[str, Any] = field(default_factory=dict)
    #: views averaged inside the graph (logits of the flipped/transposed copies); costs ``tta_views``
    #: passes per image
    tta: str = "none"
    #: ordered grades (:mod:`.grading`): ``{"rule": argmax|median|cuts, "cuts": [...]}`` (and
    #: ``"cuts_for": "balanced"`` for cuts chosen for balanced accuracy); empty = the
    #: classes are not grades and ``top_class`` is the most probable one
    grading: dict[str, Any] = field(default_factory=dict)
    #: where a ``cuts`` rule's cut points came from (display only, as ``threshold_source``): chosen on
    #: this graph (its variant, how many validation images) or kept from training (and why)
    grading_source: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    checkpoint_sha256: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise MetadataError("invalid defectscope metadata: " + "; ".join(problems))
        try:
            self.ng_classes = ng_class_names(self.class_names, self.good_class, self.ng_classes)
        except DecisionRuleError as exc:
            raise MetadataError(f"invalid defectscope metadata: ng_classes: {exc}") from None

    @property
    def channels(self) -> int:
        return self.loader.channels

    @property
    def ng_indices(self) -> list[int]:
        """Probability columns whose sum is P(defect)."""
        return ng_indices(self.class_names, self.good_class, self.ng_classes)

    @property
    def tta_views(self) -> int:
        """Backbone passes per image that the graph runs (1 without test-time flips)."""
        return 1 + len(TTA_VIEWS[self.tta])

    @property
    def grader(self) -> Grading | None:
        """The grading rule the runtime applies, or None for unordered classes."""
        return Grading.from_doc(self.grading, len(self.class_names)) if self.grading else None

    @property
    def variant(self) -> str:
        """One line for logs and reports, e.g. ``int8, test-time flips (4 views)``."""
        kind = "int8" if self.int8 else "fp16" if self.fp16 else "fp32"
        return kind if self.tta == "none" else f"{kind}, test-time {self.tta} ({self.tta_views} views)"

    def to_json(self) -> str:
        """The document a model file carries. Optional fields are written only where they differ from
        their default (as the loader's are): a runner refuses keys it does not know, so a field added
        later locks older runners out of the models that use it, not of every model exported after it."""
        doc = asdict(self)
        doc["loader"] = _loader_doc(self.loader)
        for f in fields(self):
            if f.name not in ("format", "format_version") and _is_default(f, doc[f.name]):
                del doc[f.name]
        return json.dumps(doc, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | None, source: str = "model") -> ModelMetadata:
        """Parse and validate an untrusted document; errors name the source and the field."""
        doc = _parse(text, source)
        version = doc.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise MetadataError(
                f"{source}: metadata format_version {version!r} is not supported "
                f"(this runner reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-export the model"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if version == 1:
            doc, unknown = _upgrade_v1(doc), []  # its writers' keys are all read or retired
        # a key this runner would ignore may change what the model means: refused, like the loader's
        if unknown:
            raise MetadataError(
                f"{source}: metadata has key(s) this runner does not know: "
                f"{', '.join(f'{k!r:.60}' for k in unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                f"(written by {_writer(doc.get('package_version'))}); "
                "run it with that version or newer, or re-export the model with this one"
            )
        required = ("class_names", "good_class", "threshold", "loader", "mean", "std", "model_name")
        missing = sorted(k for k in required if k not in doc)
        if missing:
            raise MetadataError(f"{source}: metadata lacks required keys: {', '.join(missing)}")
        values = {k: v for k, v in doc.items() if k in known}
        values.setdefault("package_version", "unknown")
        values["format_version"] = FORMAT_VERSION
        try:
            values["loader"] = parse_loader(values["loader"])
            return cls(**values)
        except (MetadataError, DecisionRuleError, TypeError, ValueError) as exc:
            raise MetadataError(f"{source}: {exc}") from None


def _writer(version: Any) -> str:
    """Who wrote a document, for a message: the version it names, or that it names none."""
    if not isinstance(version, str) or not version:
        return "an unknown defectscope version"
    shown = version[:40]
    return f"defectscope {shown if shown.isprintable() else repr(shown)}"


def _is_default(f: Any, value: Any) -> bool:
    """Whether ``value`` is dataclass field ``f``'s default (required fields have none)."""
    if f.default is not MISSING:
        return bool(value == f.default)
    return f.default_factory is not MISSING and bool(value == f.default_factory())


def _parse(text: str | None, source: str) -> dict[str, Any]:
    if not text:
        raise MetadataError(
            f"{source}: no {METADATA_KEY!r} metadata; this is not a model exported by "
            "`defectscope export` (re-export it with defectscope)"
        )
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise MetadataError(f"{source}: metadata is larger than {MAX_JSON_BYTES} bytes; refusing it")
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise MetadataError(f"{source}: metadata is not valid JSON: {str(exc).splitlines()[0]}") from None
    if _deeper_than(doc, MAX_DEPTH):
        raise MetadataError(f"{source}: metadata nests deeper than {MAX_DEPTH} levels; refusing it")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise MetadataError(f"{source}: metadata format is {got!r}, expected {FORMAT_NAME!r}")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in metadata")


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests dicts and lists more than ``limit`` levels; without recursion, so a
    document nested hundreds of levels deep is told as that, not as Python's recursion limit."""
    level: list[Any] = [doc]
    for _ in range(limit):  # after k steps, level holds the values k levels down
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


def _upgrade_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept the loader settings flat; everything else reads the same."""
    out = {k: v for k, v in doc.items() if k not in LOADER_KEYS}
    if all(k in doc for k in LOADER_KEYS):
        out["loader"] = {k: doc[k] for k in LOADER_KEYS}
    return out


def _loader_doc(loader: LoaderConfig) -> dict[str, Any]:
    """The loader as a model stores it: optional fields only where they differ from their default,
    so a model that does not use one stays readable by runners that predate it, and a model that
    does is refused by them instead of being preprocessed another way."""
    doc: dict[str, Any] = loader.to_dict()
    default = LoaderConfig()
    for key in LOADER_OPTIONAL_KEYS:
        if doc[key] == getattr(default, key):
            del doc[key]
    return doc


def parse_loader(value: Any) -> LoaderConfig:
    """Loader settings read from a file (a model's metadata, a checkpoint): keys, types, ranges."""
    if isinstance(value, LoaderConfig):
        return value
    allowed = {*LOADER_KEYS, *LOADER_OPTIONAL_KEYS}
    if not isinstance(value, dict) or not set(LOADER_KEYS) <= set(value) <= allowed:
        raise MetadataError(
            f"loader must be an object with exactly the keys {', '.join(LOADER_KEYS)} "
            f"(optionally also {', '.join(LOADER_OPTIONAL_KEYS)})"
        )
    check_loader_values(value)
    try:
        return LoaderConfig(**value)
    except ValueError as exc:
        raise MetadataError(f"metadata has an unusable loader config: {exc}") from None


def check_loader_values(value: dict[str, Any]) -> None:
    """Types and ranges of the loader fields present in ``value`` (a model file's or a config's)."""
    checks = {
        "channels": (1, MAX_CHANNELS),
        "min_size": (1, MAX_SIDE),
        "size_multiple": (1, MAX_SIDE),
        "max_pixels": (1, MAX_PIXELS),
    }
    for key, (lo, hi) in checks.items():
        if key in value:
            _int_in(value[key], f"loader.{key}", lo, hi)
    for key in ("max_side", "upscale_to"):
        if value.get(key) is not None:
            _int_in(value[key], f"loader.{key}", 1, MAX_SIDE)


def _int_in(value: Any, key: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MetadataError(f"{key} must be a whole number in [{lo}, {hi}], got {value!r}")


def is_model_name(value: Any) -> bool:
    """A class name a model file can carry: printable text (no newline, no undecodable byte) of
    1..MAX_NAME_CHARS characters; training checks its classes by this rule before it starts."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and value.isprintable()


def class_list_problem(names: Any, least: int = 2) -> str | None:
    """Why ``names`` cannot be a model's classes, or None: ``least``..MAX_CLASSES names a model file can carry
    (:func:`is_model_name`), each once. The one rule for a data source's classes (``least`` 1: the data
    module words the training minimum), a checkpoint's and a model file's."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        return f"expected a list of class names, got {names!r:.80}"
    odd = [n for n in names if not is_model_name(n)]
    if odd:
        return (
            f"class name(s) {', '.join(repr(n)[:80] for n in odd[:3])} cannot be carried by a model: "
            f"expected printable UTF-8 names of 1 to {MAX_NAME_CHARS} characters"
        )
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        return f"class name(s) {twice} listed twice in {list(names)!r:.200}; list each once"
    if len(names) > MAX_CLASSES:
        return f"{len(names)} classes; a model file carries at most {MAX_CLASSES}"
    if len(names) < least:
        return f"{len(names)} class(es); a model needs at least {least}"
    return None


def _problems(m: ModelMetadata) -> list[str]:
    """Every type and range problem of a document, so one error lists them all."""
    out: list[str] = []
    names = m.class_names
    problem = class_list_problem(names) if isinstance(names, list) else "expected a list of class names"
    if problem:
        out.append(f"class_names: {problem}")
    elif m.good_class not in names:
        out.append(f"good_class {m.good_class!r} is not one of class_names {names!r}")
    if not isinstance(m.ng_classes, list) or not all(map(is_model_name, m.ng_classes)):
        out.append("ng_classes must be a list of class names")
    if not is_finite_number(m.threshold) or not is_threshold(float(m.threshold)):
        out.append(f"threshold must be {THRESHOLD_EXPECTED}, got {m.threshold!r}")
    if not isinstance(m.loader, LoaderConfig):
        out.append("loader must be a LoaderConfig")
    for key, (low, high) in NORMALISATION_RANGE.items():
        vals = getattr(m, key)
        if not isinstance(vals, list) or not all(is_finite_number(v) and low <= v <= high for v in vals):
            out.append(f"{key} must be a list of numbers in [{low:g}, {high:g}], got {vals!r:.80}")
        elif isinstance(m.loader, LoaderConfig) and len(vals) != m.loader.channels:
            out.append(f"{key} needs {m.loader.channels} values (loader.channels), got {len(vals)}")
    for key in ("model_name", "package_version"):
        if not is_model_name(getattr(m, key)):
            out.append(f"{key} must be a printable name of <= {MAX_NAME_CHARS} characters")
    for key in ("mlflow_run_id", "checkpoint_sha256"):
        value = getattr(m, key)
        if value is not None and not is_model_name(value):
            out.append(f"{key} must be null or a printable string of <= {MAX_NAME_CHARS} characters")
    if (
        isinstance(m.total_stride, bool)
        or not isinstance(m.total_stride, int)
        or not 1 <= m.total_stride <= MAX_SIDE
    ):
        out.append(f"total_stride must be a whole number in [1, {MAX_SIDE}], got {m.total_stride!r}")
    outs = m.outputs
    if (
        not isinstance(outs, list)
        or not set(outs) <= set(OUTPUT_NAMES)
        or not {"logits", "probs"} <= set(outs)
    ):
        out.append(f"outputs must list logits, probs and optionally cam, got {outs!r}")
    for key in ("fp16", "int8"):
        if not isinstance(getattr(m, key), bool):
            out.append(f"{key} must be true or false")
    if m.fp16 is True and m.int8 is True:
        out.append("fp16 and int8 exclude each other")
    if m.tta not in TTA_NAMES:
        out.append(f"tta must be one of {', '.join(TTA_NAMES)}, got {m.tta!r}")
    for key in ("quantization", "parity", "threshold_source", "grading", "grading_source"):
        if not isinstance(getattr(m, key), dict):
            out.append(f"{key} must be an object")
    if isinstance(m.grading, dict) and m.grading and isinstance(names, list):
        try:
            Grading.from_doc(m.grading, len(names))
        except GradingError as exc:
            out.append(str(exc))
    return out
