"""benchmarks/elpv_score_rules.py: the p0 false-reject rate each global score's ranking allows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "elpv_score_rules.py"
GRADES = ["p0", "p33", "p67", "p100"]


def _write(path: Path, cells: list[tuple[str, list[float], int]]) -> Path:
    """``count`` rows of each (grade, probabilities over p0, p33, p67, p100)."""
    rows = [
        {"path": f"{grade}-{i}-{n}", "grade": grade, "probs": dict(zip(GRADES, probs))}
        for n, (grade, probs, count) in enumerate(cells)
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_score_is_judged_by_its_own_ranking(tmp_path: Path) -> None:
    # 20 defective cells: P(defect) 0.9, expected grade 1.9, 1 - P(p0) 0.9, P(p100) 0.1, P(p67) + 2 P(p100) 1.0.
    # 10 good cells "A" mostly p33: 0 / 0.95 / 0.95 / 0 / 0; 10 good cells "B": 0.5 / 1.5 / 0.5 / 0.5 / 1.0.
    # A outranks the defects only on 1 - P(p0); B reaches them on P(p100) and ties them on P(p67) + 2 P(p100).
    cells = [
        ("p100", [0.1, 0.0, 0.8, 0.1], 20),
        ("p0", [0.05, 0.95, 0.0, 0.0], 10),
        ("p0", [0.5, 0.0, 0.0, 0.5], 10),
    ]
    a, b = _write(tmp_path / "a.jsonl", cells), _write(tmp_path / "b.jsonl", cells[::-1])
    out = tmp_path / "rules.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    want = {"p_defect": 0.0, "expected_grade": 0.0, "one_minus_p0": 0.5, "p100": 0.5, "p67_plus_2p100": 0.5}
    for name, frr in want.items():
        assert doc["files"][str(a)][name] == doc["files"][str(b)][name] == {"frr_95": frr, "frr_99": frr}, (
            name
        )
        assert doc["mean"][name] == {"frr_95": frr, "frr_99": frr}, name
    lines = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert lines["one_minus_p0"] == ["50.0%", "50.0%"] and lines["p_defect"] == ["0.0%", "0.0%"]
    assert "mean over 2 files" in done.stdout


def test_a_row_without_the_grade_probabilities_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "x", "grade": "p0"}\n', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert str(bad) in done.stderr
