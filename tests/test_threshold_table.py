"""The trade-off table marks the row of the recall target that chose the threshold (a newcomer saw it on
the 98 % row of a 99 % target: on 20 defect images both targets need every one of them)."""

from __future__ import annotations

import numpy as np

from defectscope.evaluation.metrics import tradeoff_text
from defectscope.evaluation.threshold import threshold_lines, threshold_report


def _chosen_row(text: str) -> str:
    (row,) = [line for line in text.splitlines() if line.endswith("<- chosen")]
    return row.split()[0]


def test_the_chosen_mark_sits_on_the_targets_row() -> None:
    rng = np.random.default_rng(0)
    defect = np.r_[np.ones(20, bool), np.zeros(80, bool)]
    scores = np.r_[rng.uniform(0.3, 1.0, 20), rng.uniform(0.0, 0.6, 80)]
    for target, row in ((0.99, "99.0"), (0.98, "98.0"), (0.95, "95.0")):
        report = threshold_report(scores, defect, target, warn_false_reject_rate=0.0)
        assert report is not None
        table = [r for r in report["tradeoff"] if r["threshold"] == report["threshold"]]
        if target >= 0.98:  # 19.6 and 19.8 of 20 defect images: both targets catch all 20, one threshold
            assert {r["target_recall"] for r in table} >= {0.98, 0.99}
        assert _chosen_row(tradeoff_text(report["tradeoff"], report["threshold"], target)) == row
        lines = threshold_lines(report, "validation images", "retrain")  # a rate above 0 % warns: table shown
        assert _chosen_row("\n".join(lines)) == row
    rows = report["tradeoff"]
    assert "<- chosen" not in tradeoff_text(rows, 2.0, 0.95)  # a threshold no row has: nothing marked
    first = next(r for r in rows if r["threshold"] == rows[1]["threshold"])  # no target: the first such row
    assert _chosen_row(tradeoff_text(rows, rows[1]["threshold"])) == f"{100 * first['target_recall']:.1f}"
