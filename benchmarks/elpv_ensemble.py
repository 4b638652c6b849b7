"""What averaging several ELPV models would score: the ceiling of distilling them into one.

    python benchmarks/elpv_ensemble.py a.predictions.jsonl b.predictions.jsonl ... [--out ensemble.json]

Reads the per-cell rows ``benchmarks/elpv.py --predictions`` wrote for 4-class models on the same test
cells, averages their class probabilities cell by cell and scores the average with the benchmark's own
``metrics`` (4-class by argmax, binary by P(p67) + P(p100) >= 0.5, the operating point from the
averaged P(defect)).  A student distilled from these models learns their averaged answers, so this is
what distillation can at best approach; if the average is not better than its best member, distilling
it is not worth a training run.  No model is run: it needs only the prediction files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv_cells import GRADES, Cell, metrics
from elpv_models import prediction_rows


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of one prediction file by cell path; refused unless each carries a grade and the 4 grades'
    probabilities."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: cannot be read: {exc}") from None
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise SystemExit(f"{path}:{n}: not a JSON row of benchmarks/elpv.py --predictions") from None
        if not isinstance(row, dict) or sorted(row.get("probs") or {}) != sorted(GRADES) or "path" not in row:
            raise SystemExit(f"{path}:{n}: expected probabilities for {', '.join(GRADES)}")
        if not all(_is_probability(v) for v in row["probs"].values()):
            raise SystemExit(f"{path}:{n}: probabilities must be numbers in [0, 1]")
        if row.get("grade") not in GRADES:
            raise SystemExit(
                f"{path}:{n}: grade must be one of {', '.join(GRADES)}, got {row.get('grade')!r}"
            )
        rows[row["path"]] = row
    if not rows:
        raise SystemExit(f"{path}: no prediction rows")
    return rows


def averaged_rows(files: list[Path]) -> list[dict[str, Any]]:
    """One row per cell with the members' mean probabilities, argmax grade and P(defect) verdict."""
    members = [read_rows(f) for f in files]
    first = members[0]
    paths = sorted(first)
    for f, m in zip(files[1:], members[1:]):
        if sorted(m) != paths:
            raise SystemExit(f"{f}: not the same cells as {files[0]}")
        if any(m[c]["grade"] != first[c]["grade"] for c in paths):
            raise SystemExit(f"{f}: grades differ from {files[0]} for the same cells")
    probs = np.array([[sum(m[c]["probs"][g] for m in members) / len(members) for g in GRADES] for c in paths])
    cells = [Cell(c, first[c]["grade"], first[c].get("module_type", "unknown")) for c in paths]
    return prediction_rows(cells, probs, GRADES, "4class")  # argmax grade, the protocol's P(defect) verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", nargs="+", type=Path, help="*.predictions.jsonl of 4-class models")
    p.add_argument("--out", type=Path, help="result JSON")
    args = p.parse_args(argv)
    overall = metrics(averaged_rows(args.predictions), "4class")["overall"]
    four, binary, op = overall["four_class"], overall["binary"], overall["operating_point"]
    frr = {k: (op.get(k) or {}).get("false_reject_rate_p0") for k in ("recall_95", "recall_99")}
    print(
        f"{len(args.predictions)} models: 4-class {100 * four['accuracy']:.2f} %, "
        f"binary {100 * binary['accuracy']:.2f} %, balanced {100 * four['balanced_accuracy']:.2f} %, "
        f"QWK {four['qwk']:.3f}, false rejects (p0) at 95 / 99 % recall "
        + " / ".join("n/a" if v is None else f"{100 * v:.1f}" for v in frr.values())
        + " %"
    )
    if args.out:
        doc = {"members": [str(f) for f in args.predictions], "metrics": overall}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
