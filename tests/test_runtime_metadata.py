"""The metadata document is untrusted input, and the NG rule exists once (runtime/decision.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from defectscope.runtime.decision import decide, defect_probability, is_defect_label, is_ng, ng_indices
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.metadata import MAX_JSON_BYTES, MetadataError, ModelMetadata
from onnx_models import fixture_metadata


def _doc(**changes: Any) -> str:
    doc = json.loads(fixture_metadata().to_json())
    doc.update(changes)
    return json.dumps(doc)


def test_round_trip_nests_the_loader_and_defaults_the_ng_classes() -> None:
    meta = fixture_metadata()
    doc = json.loads(meta.to_json())
    assert doc["format_version"] == 2 and doc["loader"]["max_side"] == 512 and "max_side" not in doc
    back = ModelMetadata.from_json(meta.to_json())
    assert back == meta and back.loader == LoaderConfig(1, 512, 32, 1, 4_000_000)
    assert back.ng_classes == ["crack", "scratch"] and back.ng_indices == [1, 2]


def test_version_1_documents_still_load() -> None:
    doc = json.loads(fixture_metadata().to_json())
    flat = {k: v for k, v in doc.items() if k not in ("loader", "ng_classes", "threshold_source")}
    flat.update(doc["loader"], format_version=1)
    meta = ModelMetadata.from_json(json.dumps(flat))
    assert meta.loader == fixture_metadata().loader and meta.ng_classes == ["crack", "scratch"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"threshold": "0.5"}, "threshold must be a number in [0, 1]"),
        ({"threshold": 1.5}, "threshold must be a number in [0, 1]"),
        ({"threshold": True}, "threshold must be a number"),
        ({"class_names": ["good"] * 2}, "class_names: class name(s) ['good'] listed twice"),
        ({"class_names": ["good", "x" * 201]}, "cannot be carried by a model: expected printable UTF-8 names"),
        ({"class_names": [f"c{i}" for i in range(1001)]}, "class_names: 1001 classes; a model file carries at most 1000"),
        ({"class_names": ["good", "bad\nline"]}, "printable"),
        ({"class_names": "good,bad"}, "class_names: expected a list of class names"),
        ({"ng_classes": ["good"]}, "cannot also be an NG class"),
        ({"ng_classes": ["rust"]}, "are not among the classes"),
        ({"mean": [0.5, 0.5]}, "mean needs 1 values"),
        ({"std": [0.0]}, "std must be a list of numbers in [1e-06, 1e+06], got [0.0]"),
        # finite in float64 but 0 or inf in the runtime's float32 normalisation: every probability NaN
        ({"std": [1e-300]}, "std must be a list of numbers in [1e-06, 1e+06]"),
        ({"mean": [1e300]}, "mean must be a list of numbers in [-1e+06, 1e+06]"),
        ({"mean": [10**400]}, "mean must be a list of numbers"),
        ({"threshold": 10**400}, "threshold must be a number in [0, 1]"),
        ({"grading": {"rule": "cuts", "cuts": [0.5, 1.5, 10**400]}}, "grading.cuts must be a list of finite numbers"),
        ({"loader": {"channels": 1, "max_side": None, "min_size": 32, "size_multiple": 4096,
                     "max_pixels": 10000}}, "size_multiple (4096) squared must be <= max_pixels (10000)"),
        ({"loader": {"channels": 1}}, "loader must be an object with exactly the keys"),
        ({"loader": {"channels": 10**9, "max_side": None, "min_size": 32, "size_multiple": 1,
                     "max_pixels": 100}}, "loader.channels must be a whole number in [1, 64]"),
        ({"loader": {"channels": 1, "max_side": -5, "min_size": 32, "size_multiple": 1,
                     "max_pixels": 100}}, "loader.max_side must be a whole number"),
        ({"outputs": ["logits", "probs", "exec"]}, "outputs must list logits, probs"),
        ({"tta": "rot90"}, "tta must be one of none, hflip, flips"),
        ({"fp16": "yes"}, "fp16 must be true or false"),
        ({"parity": [1, 2]}, "parity must be an object"),
        ({"total_stride": 0}, "total_stride must be a whole number"),
        ({"checkpoint_sha256": 7}, "checkpoint_sha256 must be null or a printable string"),
    ],
)  # fmt: skip
def test_malformed_fields_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(MetadataError) as exc:
        ModelMetadata.from_json(_doc(**changes), source="m.onnx")
    assert message in str(exc.value) and str(exc.value).startswith("m.onnx: ")


def test_size_depth_and_non_finite_numbers_are_refused() -> None:
    with pytest.raises(MetadataError, match="larger than"):
        ModelMetadata.from_json(_doc(parity={"pad": "x" * MAX_JSON_BYTES}))
    for levels in (50, 300):  # 300 (600 nestings): deeper than the old recursive check could look
        nested: Any = 1
        for _ in range(levels):
            nested = {"a": [nested]}
        with pytest.raises(MetadataError, match="nests deeper than 8 levels"):
            ModelMetadata.from_json(_doc(grading_source=nested))
    shallow: Any = {"a": {"b": [1]}}  # within the limit in a display-only field: read
    assert ModelMetadata.from_json(_doc(grading_source=shallow)).grading_source == shallow
    with pytest.raises(MetadataError, match="NaN is not allowed"):
        ModelMetadata.from_json(_doc().replace('"threshold": 0.5', '"threshold": NaN'))
    with pytest.raises(MetadataError, match="not valid JSON"):
        ModelMetadata.from_json("[" * 100_000)


def test_one_rule_for_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 4)).astype(np.float32)
    probs = torch.tensor(logits).softmax(1)
    idx = ng_indices(["p0", "p33", "p67", "p100"], "p0", ["p67", "p100"])
    assert idx == [2, 3]
    np_scores = defect_probability(probs.numpy().astype(np.float64), idx)
    t_scores = defect_probability(probs.double(), idx)
    np.testing.assert_array_equal(np_scores, t_scores.numpy())
    np.testing.assert_allclose(np_scores, probs.numpy()[:, 2] + probs.numpy()[:, 3], rtol=1e-6)
    assert is_ng(np_scores, 0.4).tolist() == is_ng(t_scores, 0.4).tolist()
    labels = np.array([0, 1, 2, 3, 1])
    assert is_defect_label(labels, idx).tolist() == [False, False, True, True, False]
    assert is_defect_label(torch.tensor(labels), idx).tolist() == [False, False, True, True, False]


def test_decide_uses_the_ng_classes_and_the_threshold_inclusively() -> None:
    names = ["p0", "p33", "p67", "p100"]
    probs = np.array([0.2, 0.5, 0.2, 0.1])
    d = decide(probs, names, [2, 3], threshold=0.3)
    assert d.verdict == "NG" and d.top_class == "p33" and d.defect_class == "p67"
    assert d.defect_prob == pytest.approx(0.3)
    assert decide(probs, names, [2, 3], threshold=0.31).verdict == "OK"
    assert decide(probs, names, [1, 2, 3], threshold=0.75).verdict == "NG"
