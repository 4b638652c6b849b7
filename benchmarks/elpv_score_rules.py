"""Would another score from the same four probabilities rank good against defective ELPV cells better?

    python benchmarks/elpv_score_rules.py a.predictions.jsonl [b.predictions.jsonl ...] [--out rules.json]

The runtime scores a cell by the protocol's P(defect) = P(p67) + P(p100).  The ordered grades offer other
global scores from the same output: the expected grade, 1 - P(p0), P(p100) alone, and P(p67) + 2 P(p100).
For each prediction file of ``benchmarks/elpv.py --predictions`` this reports the false-reject rate on the
p0 cells at 95 and 99 % recall of the defective (p >= 0.5) cells for each score, with the thresholds
chosen as training and export choose them (``benchmarks/elpv_scores.operating_points``), on the test
cells themselves: what each score's ranking allows.  No model is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv_cells import GRADES
from elpv_ensemble import read_rows
from elpv_misses import p_defect
from elpv_scores import operating_points

Row = dict[str, Any]
SCORES: dict[str, Callable[[Row], float]] = {
    "p_defect": p_defect,
    "expected_grade": lambda r: sum(k * r["probs"][g] for k, g in enumerate(GRADES)),
    "one_minus_p0": lambda r: 1.0 - r["probs"]["p0"],
    "p100": lambda r: r["probs"]["p100"],
    "p67_plus_2p100": lambda r: r["probs"]["p67"] + 2.0 * r["probs"]["p100"],
}


def score_rule_rates(rows: dict[str, Row]) -> dict[str, dict[str, float | None]]:
    """``{score: {"frr_95": ..., "frr_99": ...}}``: p0 false-reject rates of each score's ranking."""
    grades = [r["grade"] for r in rows.values()]
    out: dict[str, dict[str, float | None]] = {}
    for name, score in SCORES.items():
        points = operating_points([score(r) for r in rows.values()], grades)
        out[name] = {k.replace("recall_", "frr_"): v.get("false_reject_rate_p0") for k, v in points.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", nargs="+", type=Path, help="predictions.jsonl of benchmarks/elpv.py")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    per_file = {str(p): score_rule_rates(read_rows(p)) for p in args.predictions}
    mean = {
        name: {
            key: float(np.mean([f[name][key] for f in per_file.values() if f[name][key] is not None]))
            for key in ("frr_95", "frr_99")
        }
        for name in SCORES
    }
    print(f"{'score':<16} {'FRR p0 @95 %':>13} {'@99 %':>7}   (mean over {len(per_file)} files)")
    for name, m in mean.items():
        print(f"{name:<16} {100 * m['frr_95']:>12.1f}% {100 * m['frr_99']:>6.1f}%")
    if args.out:
        args.out.write_text(json.dumps({"files": per_file, "mean": mean}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
