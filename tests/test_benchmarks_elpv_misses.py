"""benchmarks/elpv_misses.py: the defective cells passed at a false-reject rate, per model and by all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "elpv_misses.py"
GRADES = ["p0", "p33", "p67", "p100"]


def _write(path: Path, cells: list[tuple[str, str, float]]) -> Path:
    """Rows whose P(defect) = P(p67) + P(p100) is the given score (split over the two grades)."""
    rows = [
        {"path": name, "module_type": "poly" if name.endswith("p") else "mono", "grade": grade,
         "probs": dict(zip(GRADES, [1 - score, 0.0, score / 2, score / 2]))}
        for name, grade, score in cells
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_threshold_rejects_the_share_of_good_cells_and_lists_what_passes(tmp_path: Path) -> None:
    # ten good cells scored 0.0 .. 0.9: at 20 % false rejects the two highest (0.9, 0.8) are rejected and
    # the threshold is 0.7, the highest good score passed; a defective cell at or below it is missed.
    good = [(f"g{i}", "p0", i / 10) for i in range(10)]
    a = _write(tmp_path / "a.jsonl", [*good, ("d1", "p100", 0.75), ("d2p", "p67", 0.7), ("d3", "p100", 0.3)])
    b = _write(tmp_path / "b.jsonl", [*good, ("d1", "p100", 0.2), ("d2p", "p67", 0.95), ("d3", "p100", 0.1)])
    out = tmp_path / "misses.json"
    done = _run(str(a), str(b), "--frr", "0.2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    ma, mb = doc["models"][str(a)], doc["models"][str(b)]
    assert ma["threshold"] == 0.7 and ma["false_reject_rate_p0"] == 0.2
    assert ma["missed"] == ["d2p", "d3"] and abs(ma["recall"] - 1 / 3) < 1e-9
    assert ma["missed_by_grade"] == {"p67": 1, "p100": 1} and ma["missed_by_module"] == {"poly": 1, "mono": 1}
    assert mb["missed"] == ["d1", "d3"] and mb["missed_by_grade"] == {"p100": 2}
    assert doc["missed_by_all"] == ["d3"]
    assert "missed by all 2: 1: d3" in done.stdout


def test_each_module_type_can_have_its_own_threshold(tmp_path: Path) -> None:
    # mono good cells 0.0 .. 0.4, poly ("...p") 0.5 .. 0.9: one threshold for both (0.7 at 20 %) passes both
    # defects; mono's own (0.3: its 0.4 rejected) catches its defect at 0.45, poly's own (0.8) still passes 0.6
    good = [(f"g{i}", "p0", i / 10) for i in range(5)] + [(f"g{i}p", "p0", i / 10) for i in range(5, 10)]
    a = _write(tmp_path / "a.jsonl", [*good, ("d1", "p100", 0.45), ("d2p", "p67", 0.6), ("lone", "p33", 0.1)])
    out = tmp_path / "misses.json"
    done = _run(str(a), "--frr", "0.2", "--by-module", "--out", str(out))
    assert done.returncode == 0, done.stderr
    model = json.loads(out.read_text(encoding="utf-8"))["models"][str(a)]
    assert model["missed"] == ["d1", "d2p"] and model["recall"] == 0
    mono, poly = model["by_module"]["mono"], model["by_module"]["poly"]
    assert mono["threshold"] == 0.3 and mono["missed"] == [] and mono["recall"] == 1
    assert poly["threshold"] == 0.8 and poly["missed"] == ["d2p"] and poly["false_reject_rate_p0"] == 0.2
    assert "  mono alone: threshold 0.300 rejects 20.0 % of p0; recall 100.0 %" in done.stdout


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    only_defects = _write(tmp_path / "d.jsonl", [("d1", "p100", 0.9)])
    done = _run(str(only_defects))
    assert done.returncode != 0 and "no p0 cells" in done.stderr and "Traceback" not in done.stderr
    done = _run(str(only_defects), "--frr", "1.5")
    assert done.returncode != 0 and "--frr must lie in [0, 1)" in done.stderr
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"path": "c", "grade": "p0", "probs": dict.fromkeys(GRADES, "x")}) + "\n")
    done = _run(str(odd))
    assert done.returncode != 0 and f"{odd}:1: probabilities must be numbers in [0, 1]" in done.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    done = _run(str(broken))
    assert done.returncode != 0 and f"{broken}:1" in done.stderr and "Traceback" not in done.stderr
