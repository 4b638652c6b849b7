"""Test helper: small but real CNN ONNX models shaped exactly like `defectscope export` output.

The graph is Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (``logits``),
Softmax (``probs``) and ``cam`` = 1x1 Conv of the last feature map with the Gemm weights (no bias).
Batch, height and width are dynamic.  Weights are random but seeded, plus one designed "brightness"
channel so tests can steer verdicts: dark images come out OK, images with bright regions come out
NG, and the CAM lights up where the bright region is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from defectscope import __version__
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata

CLASS_NAMES = ["good", "crack", "scratch"]


def fixture_metadata(**overrides: Any) -> ModelMetadata:
    """Metadata matching :func:`build_model`'s defaults; keyword overrides replace fields."""
    channels = int(overrides.pop("channels", 1))
    loader = {
        "channels": channels,
        "max_side": 512,
        "min_size": 32,
        "size_multiple": 1,
        "max_pixels": 4_000_000,
    }
    loader.update({k: overrides.pop(k) for k in list(overrides) if k in loader})
    fields: dict[str, Any] = {
        "class_names": list(CLASS_NAMES),
        "good_class": "good",
        "threshold": 0.5,
        "loader": LoaderConfig(**loader),
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "model_name": "fixture_cnn",
        "package_version": __version__,
        "total_stride": 4,
        "outputs": ["logits", "probs", "cam"],
    }
    fields.update(overrides)
    return ModelMetadata(**fields)


def _graph(num_classes: int, channels: int, seed: int, with_cam: bool) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    c1, c2 = 8, 16
    w1 = rng.normal(0, 0.15, (c1, channels, 3, 3)).astype(np.float32)
    w1[0] = 1.0 / (9 * channels)  # brightness detector: mean of the 3x3 neighbourhood
    b1 = rng.normal(0, 0.05, c1).astype(np.float32)
    b1[0] = -0.4  # only clearly bright pixels (normalised > 0.4, i.e. > ~0.6 raw) fire
    w2 = rng.normal(0, 0.1, (c2, c1, 3, 3)).astype(np.float32)
    w2[0] = 0.0
    w2[0, 0] = 1.0 / 9
    b2 = rng.normal(0, 0.05, c2).astype(np.float32)
    b2[0] = 0.0
    wg = rng.normal(0, 0.3, (num_classes, c2)).astype(np.float32)
    wg[:, 0] = 12.0  # every defect class gains from brightness ...
    wg[0, 0] = -12.0  # ... the good class loses
    bg = np.zeros(num_classes, np.float32)
    bg[0] = 3.0

    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
        numpy_helper.from_array(wg, "wg"),
        numpy_helper.from_array(bg, "bg"),
        numpy_helper.from_array(wg.reshape(num_classes, c2, 1, 1), "wcam"),
    ]
    conv: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num_classes]),
    ]
    if with_cam:
        nodes.append(helper.make_node("Conv", ["feat", "wcam"], ["cam"], kernel_shape=[1, 1]))
        outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", num_classes, "h", "w"]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])]
    return helper.make_graph(nodes, "fixture_cnn", inputs, outputs, inits)


def _nan_when_dark(graph: onnx.GraphProto, below: float) -> None:
    """``probs`` becomes NaN for every image whose mean normalised value is below ``below``."""
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    softmax.output[0] = "probs_raw"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 2, 3], np.int64), "spatial_axes"),
            numpy_helper.from_array(np.array([1], np.int64), "class_axis"),
            numpy_helper.from_array(np.array(below, np.float32), "dark_below"),
            numpy_helper.from_array(np.array(np.nan, np.float32), "nan"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["input", "spatial_axes"], ["level"], keepdims=0),
            helper.make_node("Less", ["level", "dark_below"], ["dark"]),
            helper.make_node("Unsqueeze", ["dark", "class_axis"], ["dark_column"]),
            helper.make_node("Where", ["dark_column", "nan", "probs_raw"], ["probs"]),
        ]
    )


def _width_from_height(graph: onnx.GraphProto, divisor: int) -> None:
    """``probs`` sliced to ``H // divisor`` columns (H of the input): no shape inference can know it."""
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    softmax.output[0] = "probs_full"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(2, np.int64), "height_axis"),
            numpy_helper.from_array(np.array(divisor, np.int64), "width_divisor"),
            numpy_helper.from_array(np.array([0], np.int64), "slice_start"),
            numpy_helper.from_array(np.array([1], np.int64), "slice_axis"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", ["input"], ["input_shape"]),
            helper.make_node("Gather", ["input_shape", "height_axis"], ["height"]),
            helper.make_node("Div", ["height", "width_divisor"], ["width"]),
            helper.make_node("Unsqueeze", ["width", "slice_start"], ["slice_end"]),
            helper.make_node("Slice", ["probs_full", "slice_start", "slice_end", "slice_axis"], ["probs"]),
        ]
    )
    graph.output[1].type.tensor_type.shape.dim[1].dim_param = "K"


def build_model(
    path: str | Path,
    *,
    seed: int = 0,
    with_cam: bool = True,
    metadata: ModelMetadata | None = None,
    raw_metadata: str | None = None,
    omit_metadata: bool = False,
    num_outputs: int | None = None,
    nan_when_dark: float | None = None,
    width_from_height: int | None = None,
    **overrides: Any,
) -> Path:
    """Write a fixture model to ``path`` and return it.

    ``overrides`` go to :func:`fixture_metadata`; ``raw_metadata`` stores that exact string
    instead (to test foreign or older documents); ``omit_metadata`` stores none at all.
    ``num_outputs``: a graph with that many classes whatever the metadata says; ``nan_when_dark``:
    NaN probabilities for images whose mean normalised value is below it (finite for the start-up
    probe's standard-normal input, whose mean is about 0); ``width_from_height``: ``probs`` keeps
    only its first ``height // width_from_height`` columns, a width that only running the graph shows.
    """
    meta = metadata or fixture_metadata(**overrides)
    graph = _graph(num_outputs or len(meta.class_names), meta.channels, seed, with_cam)
    if nan_when_dark is not None:
        _nan_when_dark(graph, nan_when_dark)
    if width_from_height is not None:
        _width_from_height(graph, width_from_height)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="defectscope-tests"
    )
    model.ir_version = 9
    if not omit_metadata:
        text = raw_metadata if raw_metadata is not None else meta.to_json()
        helper.set_model_props(model, {METADATA_KEY: text})
    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def metadata_without(*keys: str, **overrides: Any) -> str:
    """Metadata JSON with ``keys`` removed, as an older or foreign exporter might write it."""
    doc = json.loads(fixture_metadata(**overrides).to_json())
    for k in keys:
        doc.pop(k, None)
    return json.dumps(doc)


def make_image(
    path: str | Path, width: int, height: int, *, bright: bool, seed: int = 0, mode: str = "L"
) -> Path:
    """A dark textured image, with a bright blob when ``bright`` (the fixture calls it NG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(10, 70, (height, width), dtype=np.uint8)
    if bright:
        r = max(6, min(width, height) // 5)
        cy = int(rng.integers(r, max(r + 1, height - r)))
        cx = int(rng.integers(r, max(r + 1, width - r)))
        yy, xx = np.ogrid[:height, :width]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 250
    img = Image.fromarray(arr, "L")
    if mode != "L":
        img = img.convert(mode)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
