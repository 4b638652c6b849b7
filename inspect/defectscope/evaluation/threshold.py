"""The OK/NG threshold for a recall target, and what it costs in good parts rejected.

Training chooses it on the validation scores of the PyTorch model; export chooses it again on the
scores of the graph it writes (:mod:`defectscope.export.threshold`).  Both build the same report
with :func:`threshold_report` and say it the same way with :func:`threshold_lines`, including the
loud warning when the recall target costs a false-reject rate no line could run on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import choose_threshold, defects_to_catch, operating_point, tradeoff_table, tradeoff_text

#: threshold.warn_false_reject_rate of checkpoints that recorded none
DEFAULT_WARN_FALSE_REJECT_RATE = 0.10


def threshold_report(
    scores: np.ndarray, is_defect: np.ndarray, target_recall: float, warn_false_reject_rate: float
) -> dict[str, Any] | None:
    """Threshold, recall and false-reject rate reached, image counts and the trade-off table (plain
    data, stored in checkpoints and model metadata); None when there are no defect images."""
    threshold = choose_threshold(scores, is_defect, target_recall)
    if threshold is None:
        return None
    point = operating_point(scores, is_defect, threshold)
    return {
        "target_recall": float(target_recall),
        "threshold": threshold,
        "recall": point.get("recall"),
        "false_reject_rate": point.get("false_reject_rate"),
        "n_defect": point["n_defect"],
        "n_good": point["n_good"],
        "warn_false_reject_rate": float(warn_false_reject_rate),
        "tradeoff": tradeoff_table(scores, is_defect),
    }


def too_costly(report: dict[str, Any]) -> bool:
    """The chosen threshold rejects more good parts than ``warn_false_reject_rate`` allows."""
    frr = report.get("false_reject_rate")
    return frr is not None and frr > float(
        report.get("warn_false_reject_rate", DEFAULT_WARN_FALSE_REJECT_RATE)
    )


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f} %"


def summary_line(report: dict[str, Any]) -> str:
    """``threshold 0.057 for recall >= 99.0 %: recall 99.1 % of 112 defect, false rejects 67.0 % of 204 good``."""
    return (
        f"threshold {report['threshold']:.4g} for recall >= {_pct(report['target_recall'])}: "
        f"recall {_pct(report['recall'])} of {report['n_defect']} defect images, "
        f"false-reject rate {_pct(report['false_reject_rate'])} of {report['n_good']} good images"
    )


def rests_on_one_image(report: dict[str, Any]) -> bool:
    """The recall target allows no miss among the defect images, so the threshold is set by the one
    lowest-scoring defect image (as :func:`~.metrics.choose_threshold` counts them).  A single defect
    image always sets it; the data report already warns about so few, so that case is left out here."""
    n = int(report.get("n_defect") or 0)
    return n > 1 and defects_to_catch(n, float(report["target_recall"])) == n


def threshold_lines(report: dict[str, Any], where: str, how_to_change: str) -> list[str]:
    """The chosen threshold on ``where``; when too costly, a WARNING, the trade-off table and the levers;
    last, a note when one image sets it."""
    lines = [f"{summary_line(report)} ({where})"]
    if too_costly(report):
        lines += [
            f"WARNING: the recall target {_pct(report['target_recall'])} costs a false-reject rate of "
            f"{_pct(report['false_reject_rate'])}, above {_pct(report['warn_false_reject_rate'])} "
            "(threshold.warn_false_reject_rate): a line would reject that share of its good parts. "
            f"Choose knowingly from the trade-off below: {how_to_change}.",
            tradeoff_text(report["tradeoff"], report["threshold"], report.get("target_recall")),
        ]
    if rests_on_one_image(report):
        n = int(report["n_defect"])
        lines.append(
            f"note: recall {_pct(report['target_recall'])} of {n} defect images allows no miss (one image is "
            f"{_pct(1 / n)}), so the threshold is set by the single lowest-scoring defect image and moves with "
            "its score (another model, precision or retraining can move it far); more labelled defect "
            "images make it steadier"
        )
    return lines
