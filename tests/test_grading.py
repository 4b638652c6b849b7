"""Ordered grades, the torch-free part: grading rules, cut points, ordinal figures, "grade >= k" NG sugar."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest

from defectscope.runtime.decision import DecisionRuleError, check_ng_spec, decide, ng_class_names
from defectscope.runtime.grading import Grading, GradingError, choose_cuts, grade_indices, ordinal_metrics
from defectscope.runtime.metadata import MetadataError, ModelMetadata
from onnx_models import fixture_metadata

GRADES = ["p0", "p33", "p67", "p100"]


def test_ordinal_metrics_against_hand_computed_values() -> None:
    # truth 0,0,0,1,1,2,3 graded 0,1,0,1,3,2,1: errors |0-1| = 1, |1-3| = 2, |3-1| = 2
    cm = np.zeros((4, 4), int)
    for t, p in [(0, 0), (0, 1), (0, 0), (1, 1), (1, 3), (2, 2), (3, 1)]:
        cm[t, p] += 1
    got = ordinal_metrics(cm)
    assert got["mae"] == pytest.approx(5 / 7)
    assert got["off_by_more_than_one"] == pytest.approx(2 / 7)
    # kappa by hand: weights (i-j)^2/9; observed sum w*cm = (1 + 4 + 4) / 9 = 1;
    # expected E = outer(rows, cols) / 7 with rows (3,2,1,1), cols (2,3,1,1)
    rows, cols = [3, 2, 1, 1], [2, 3, 1, 1]
    expected = sum(rows[i] * cols[j] / 7 * (i - j) ** 2 / 9 for i in range(4) for j in range(4))
    assert got["qwk"] == pytest.approx(1 - 1 / expected)
    perfect = ordinal_metrics(np.diag([3, 2, 1, 1]))
    assert perfect == {"mae": 0.0, "off_by_more_than_one": 0.0, "qwk": 1.0}


def test_grading_rules_on_hand_examples() -> None:
    probs = np.array(
        [
            [0.40, 0.05, 0.05, 0.50],  # argmax 3; cumulative 0.40, 0.45, 0.50 -> median 2; E = 1.65
            [0.10, 0.45, 0.44, 0.01],  # argmax 1; median 1; E = 1.36
            [0.60, 0.20, 0.10, 0.10],  # argmax 0; median 0; E = 0.7
        ]
    )
    assert grade_indices(probs).tolist() == [3, 1, 0]
    assert grade_indices(probs, Grading("median")).tolist() == [2, 1, 0]
    assert grade_indices(probs, Grading("cuts", (0.5, 1.4, 2.5))).tolist() == [2, 1, 1]
    half = np.array([[0.5, 0.0, 0.0, 0.5]])  # E = 1.5 exactly: a cut at E counts
    assert grade_indices(half, Grading("cuts", (0.5, 1.5, 1.5))).tolist() == [3]
    assert grade_indices(half, Grading("cuts", (0.5, 1.5000001, 2.5))).tolist() == [1]


def _probs_with_expected_grade(e: np.ndarray, k: int) -> np.ndarray:
    """Probabilities on the two grades around each e, so that sum_k k p_k = e."""
    lo = np.floor(e).astype(int)
    frac = e - lo
    p = np.zeros((e.size, k))
    p[np.arange(e.size), lo] = 1 - frac
    p[np.arange(e.size), np.minimum(lo + 1, k - 1)] += frac
    return p


def _score(graded: np.ndarray, y: np.ndarray, cuts_for: str) -> float:
    """Images right, or the sum over the grades present of their recall (balanced accuracy x grades)."""
    if cuts_for == "accuracy":
        return float((graded == y).sum())
    return sum(float((graded[y == g] == g).mean()) for g in np.unique(y))


@pytest.mark.parametrize("cuts_for", ["accuracy", "balanced"])
def test_chosen_cut_points_are_the_best_placement(cuts_for: str) -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 14)), int(rng.integers(2, 5))
        y = rng.integers(0, k, n) if trial % 4 else np.full(n, rng.integers(0, k))
        e = np.round(np.clip(y + rng.normal(0, 0.8, n), 0, k - 1), 1)
        probs = _probs_with_expected_grade(e, k)
        cuts = choose_cuts(e, y, k, cuts_for)
        doc = Grading("cuts", cuts, cuts_for).to_doc()
        assert Grading.from_doc(doc, k) == Grading(
            "cuts", cuts, cuts_for
        )  # training's cuts, metadata accepts
        got = _score(grade_indices(probs, Grading("cuts", cuts)), y, cuts_for)
        # every placement of k - 1 cuts among the values that matter (brute force)
        values = sorted({-0.5, k - 0.5, *e.tolist(), *(e + 1e-9).tolist()})
        best = max(
            _score(grade_indices(probs, Grading("cuts", c)), y, cuts_for)
            for c in itertools.combinations_with_replacement(values, k - 1)
        )
        assert got == pytest.approx(best), (e, y, cuts)


def test_balanced_cut_points_give_a_rare_grade_its_range() -> None:
    # 18 images in order of E; the two grade-1 images sit among others: any range for grade 1 costs at
    # least as many images as it wins, so the most images right (16) never grades 1.  Weighted by grade
    # (8 : 2 : 8 images), the range over positions 6 .. 11 wins 2 x 1/2 for 4 x 1/8: balanced takes it.
    y = np.array([0] * 6 + [1, 0, 0, 2, 2, 1] + [2] * 6)
    e = np.arange(18) / 10
    probs = _probs_with_expected_grade(e, 3)
    for_accuracy = grade_indices(probs, Grading("cuts", choose_cuts(e, y, 3)))
    for_balance = grade_indices(probs, Grading("cuts", choose_cuts(e, y, 3, "balanced")))
    assert for_accuracy.tolist() == [0] * 9 + [2] * 9
    assert for_balance.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    with pytest.raises(GradingError, match="cuts_for must be one of accuracy, balanced"):
        choose_cuts(e, y, 3, "f1")


def test_cut_points_stay_in_range_when_float32_overshoots_the_top_grade() -> None:
    # float32 softmax can put E a hair above K - 1; with the top grade unused the last cut would land
    # half a grade above it, just outside what a model file may carry
    cuts = choose_cuts(np.array([0.0, 1.0, 3.0 + 1.5e-12]), np.array([0, 1, 2]), 4)
    assert cuts[-1] == 3.5
    assert Grading.from_doc(Grading("cuts", cuts).to_doc(), 4).cuts == cuts


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"rule": "mean"}, "grading.rule must be one of argmax, median, cuts"),
        ({"rule": "cuts", "cuts": [0.5]}, "grading.cuts needs 3 value(s)"),
        ({"rule": "cuts", "cuts": [1.5, 0.5, 2.5]}, "non-decreasing"),
        ({"rule": "cuts", "cuts": [0.5, 1.5, 9.0]}, "non-decreasing values in [-0.5, 3.5]"),
        ({"rule": "cuts", "cuts": [0.5, 1.5, float("nan")]}, "finite numbers"),
        ({"rule": "argmax", "cuts": [0.5, 1.5, 2.5]}, "needs 0 value(s)"),
        ({"rule": "argmax", "code": "import os"}, "unknown key(s) ['code']"),
        ({"rule": "cuts", "cuts": [0.5, 1.5, 2.5], "cuts_for": "f1"}, "grading.cuts_for must be one of"),
        ([1, 2], "grading must be an object"),
    ],
)
def test_untrusted_grading_documents_are_refused_by_field(doc: Any, message: str) -> None:
    with pytest.raises(GradingError, match=None) as exc:
        Grading.from_doc(doc, 4)
    assert message in str(exc.value)
    meta = json.loads(fixture_metadata(class_names=GRADES, good_class="p0").to_json())
    meta["grading"] = doc
    if isinstance(doc, dict) and any(isinstance(v, float) and v != v for v in doc.get("cuts", [])):
        return  # NaN is not JSON; the metadata parser refuses it earlier
    with pytest.raises(MetadataError) as meta_exc:
        ModelMetadata.from_json(json.dumps(meta), source="m.onnx")
    assert message in str(meta_exc.value) and str(meta_exc.value).startswith("m.onnx: ")


def test_models_without_grading_still_load_and_decide_by_argmax() -> None:
    doc = json.loads(fixture_metadata(class_names=GRADES, good_class="p0").to_json())
    assert "grading" not in doc  # unordered: not written, as by the versions before grading existed
    meta = ModelMetadata.from_json(json.dumps(doc))
    assert meta.grading == {} and meta.grader is None
    d = decide(np.array([0.4, 0.05, 0.05, 0.5]), GRADES, meta.ng_indices, 0.5, meta.grader)
    assert d.top_class == "p100" and d.expected_grade is None


def test_decide_gives_the_grade_of_the_rule_and_keeps_the_threshold_verdict() -> None:
    probs = np.array([0.40, 0.05, 0.05, 0.50])  # E = 1.65
    d = decide(probs, GRADES, [2, 3], 0.56, Grading("cuts", (0.5, 1.5, 2.5)))
    assert (d.top_class, d.top_prob, d.verdict) == ("p67", 0.05, "OK")  # graded p67, P(defect) 0.55
    assert d.expected_grade == pytest.approx(1.65) and d.defect_prob == pytest.approx(0.55)


def test_grade_at_least_resolves_to_a_class_list() -> None:
    assert ng_class_names(GRADES, "p0", ">= p67", ordered=True) == ["p67", "p100"]
    assert ng_class_names(GRADES, "p0", ">=p33", ordered=True) == ["p33", "p67", "p100"]
    with pytest.raises(DecisionRuleError, match="need ordered grades"):
        ng_class_names(GRADES, "p0", ">= p67")
    with pytest.raises(DecisionRuleError, match="'p50' is not among the classes"):
        ng_class_names(GRADES, "p0", ">= p50", ordered=True)
    with pytest.raises(DecisionRuleError, match="cannot also be an NG class"):
        ng_class_names(GRADES, "p0", ">= p0", ordered=True)
    with pytest.raises(DecisionRuleError, match=r"expected a list of class names \(\[p67\]\) or '>= GRADE'"):
        ng_class_names(GRADES, "p0", "p67", ordered=True)
    with pytest.raises(DecisionRuleError, match=r"'scratch': expected a list of class names \(\[scratch\]\)"):
        check_ng_spec(
            "scratch"
        )  # before any class list is known: the preflight's own check (it waited for the scan)


def test_the_grading_line_says_where_the_cut_points_came_from() -> None:
    """``grading_source`` is display-only: its known words are shown, anything else reads "not recorded"."""
    from defectscope.runtime.grading import grading_text

    cuts = Grading("cuts", (0.41, 0.82, 1.67), "balanced")
    chosen = {"method": "chosen on this graph", "variant": "int8", "cuts_for": "balanced", "count": 119,
              "images": "the checkpoint's 120 validation images"}  # fmt: skip
    assert grading_text(cuts, chosen) == (
        "ordered grades, the expected grade cut at 0.41, 0.82, 1.67 (for balanced), chosen on this int8 graph "
        "on 119 images of the checkpoint's 120 validation images"
    )
    kept = grading_text(cuts, {"method": "kept from training", "count": 5, "images": "lot7.csv"})
    assert kept.endswith(
        "kept from training (PyTorch): 5 images with labels at export, too few to choose them"
    )
    for source in ({}, {"method": ["import os"]}, {"method": "chosen by hand"}):  # older files, foreign words
        assert grading_text(cuts, source).endswith("where the cut points came from is not recorded "
                                                   "(exported before defectscope recorded it)")  # fmt: skip
    assert grading_text(Grading("median"), {}) == "ordered grades, the median of the predicted distribution"
    assert grading_text(None, chosen) == ""
    doc = json.loads(fixture_metadata(class_names=GRADES, good_class="p0").to_json())
    doc["grading_source"] = ["chosen on this graph"]
    with pytest.raises(MetadataError, match="grading_source must be an object"):
        ModelMetadata.from_json(json.dumps(doc), source="m.onnx")
    doc["grading"], doc["grading_source"] = cuts.to_doc(), chosen
    assert ModelMetadata.from_json(json.dumps(doc)).grading_source == chosen
