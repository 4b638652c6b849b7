"""Which defective ELPV cells a model passes at a given false-reject rate, and which every model passes.

    python benchmarks/elpv_misses.py a.predictions.jsonl [b.predictions.jsonl ...] [--frr 0.10] [--out misses.json]

The operating-point target is about rejecting few good (p0) cells while catching the defective ones
(p67, p100).  For each prediction file of ``benchmarks/elpv.py --predictions`` this sets the threshold at
which ``--frr`` of the p0 cells are rejected and lists the defective cells scored below it, by grade and
module type; then the cells that every model passes.  Misses shared by all seeds point at the data (hard or
doubtful cells); misses that differ point at seed-to-seed variance.  ``--by-module`` adds the same with a
threshold of each module type's own (mono, poly), as a line that makes one product would set it.  No model
is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv_cells import DEFECTIVE_GRADES
from elpv_ensemble import read_rows


def p_defect(row: dict[str, Any]) -> float:
    """The protocol's defect probability, P(p67) + P(p100) (as benchmarks/elpv.py scores 4-class models)."""
    return float(sum(row["probs"][g] for g in DEFECTIVE_GRADES))


def misses_at(rows: dict[str, dict[str, Any]], frr: float) -> dict[str, Any]:
    """The threshold rejecting ``frr`` of the p0 cells (the smallest score among the rejected), and the
    defective cells scored below it."""
    good = np.sort([p_defect(r) for r in rows.values() if r["grade"] == "p0"])[::-1]
    if good.size == 0:
        raise SystemExit("no p0 cells in the predictions: the false-reject rate is undefined")
    rejected = int(np.floor(frr * good.size))
    # scores above the threshold are rejected: the (rejected + 1)-th highest p0 score is the first passed
    threshold = float(good[rejected]) if rejected < good.size else 0.0
    defective = {c: r for c, r in rows.items() if r["grade"] in DEFECTIVE_GRADES}
    missed = sorted(c for c, r in defective.items() if p_defect(r) <= threshold)
    return {
        "threshold": threshold,
        "false_reject_rate_p0": rejected / good.size,
        "recall": 1 - len(missed) / len(defective) if defective else None,
        "missed": missed,
        "missed_by_grade": dict(Counter(rows[c]["grade"] for c in missed)),
        "missed_by_module": dict(Counter(rows[c].get("module_type", "unknown") for c in missed)),
        "defective_by_grade": dict(Counter(r["grade"] for r in defective.values())),
    }


def by_module(rows: dict[str, dict[str, Any]], frr: float) -> dict[str, Any]:
    """:func:`misses_at` on each module type's cells alone, with that type's own threshold (types without
    both good and defective cells have no operating point and are left out)."""
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for cell, row in rows.items():
        parts.setdefault(str(row.get("module_type", "unknown")), {})[cell] = row
    return {
        kind: misses_at(part, frr)
        for kind, part in sorted(parts.items())
        if {"p0"} <= {r["grade"] for r in part.values()}
        and any(r["grade"] in DEFECTIVE_GRADES for r in part.values())
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", nargs="+", type=Path, help="*.predictions.jsonl of 4-class models")
    p.add_argument("--frr", type=float, default=0.10, help="share of the p0 cells rejected (default 0.10)")
    p.add_argument(
        "--by-module", action="store_true", help="also per module type, each with its own threshold"
    )
    p.add_argument("--out", type=Path, help="result JSON")
    args = p.parse_args(argv)
    if not 0.0 <= args.frr < 1.0:
        raise SystemExit(f"--frr must lie in [0, 1), got {args.frr}")
    per_model = {}
    for f in args.predictions:
        rows = read_rows(f)
        per_model[str(f)] = misses_at(rows, args.frr)
        if args.by_module:
            per_model[str(f)]["by_module"] = by_module(rows, args.frr)
    for name, m in per_model.items():
        for label, part in [(name, m), *((f"  {k} alone", v) for k, v in m.get("by_module", {}).items())]:
            print(
                f"{label}: threshold {part['threshold']:.3f} rejects {100 * part['false_reject_rate_p0']:.1f} % "
                f"of p0; recall {100 * part['recall']:.1f} %, missed {len(part['missed'])} "
                f"(by grade {part['missed_by_grade']}, by module {part['missed_by_module']})"
            )
    by_all = sorted(set.intersection(*(set(m["missed"]) for m in per_model.values())))
    print(f"missed by all {len(per_model)}: {len(by_all)}: " + ", ".join(Path(c).name for c in by_all))
    if args.out:
        doc = {"frr": args.frr, "models": per_model, "missed_by_all": by_all}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
