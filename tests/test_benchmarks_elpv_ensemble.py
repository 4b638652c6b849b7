"""benchmarks/elpv_ensemble.py: averaging prediction files, scored by the ELPV benchmark's own metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "elpv_ensemble.py"
GRADES = ["p0", "p33", "p67", "p100"]


def _write(path: Path, cells: list[tuple[str, str, list[float]]]) -> Path:
    lines = []
    for name, grade, probs in cells:
        row = {"path": name, "module_type": "mono", "grade": grade, "true_defective": grade in ("p67", "p100"),
               "probs": dict(zip(GRADES, probs))}  # fmt: skip
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_average_is_scored_cell_by_cell(tmp_path: Path) -> None:
    # a alone grades 2 of the 4 cells right (misses c2, c3), b 3 (misses c1); their average all 4.
    a = _write(
        tmp_path / "a.jsonl",
        [
            ("c1", "p0", [0.9, 0.1, 0, 0]),
            ("c2", "p33", [0.6, 0.4, 0, 0]),
            ("c3", "p67", [0, 0, 0.45, 0.55]),
            ("c4", "p100", [0, 0, 0.2, 0.8]),
        ],
    )
    b = _write(
        tmp_path / "b.jsonl",
        [
            ("c4", "p100", [0.4, 0, 0, 0.6]),
            ("c3", "p67", [0, 0, 0.8, 0.2]),
            ("c2", "p33", [0.1, 0.9, 0, 0]),
            ("c1", "p0", [0.2, 0.7, 0, 0.1]),
        ],
    )
    out = tmp_path / "ens.json"
    done = _run(str(a), str(b), "--out", str(out))
    assert done.returncode == 0, done.stderr
    overall = json.loads(out.read_text())["metrics"]
    # averages: c1 p0 .55 -> p0; c2 p33 .65 -> p33; c3 p67 .625 -> p67; c4 p100 .7 -> p100, P(def) c4 = 0.8
    assert overall["four_class"]["accuracy"] == 1.0
    assert overall["binary"]["accuracy"] == 1.0
    alone = _run(str(a), "--out", str(out))
    assert alone.returncode == 0, alone.stderr
    assert json.loads(out.read_text())["metrics"]["four_class"]["accuracy"] == 0.5
    assert "2 models: 4-class 100.00 %" in done.stdout


def test_files_of_other_cells_or_classes_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [("c1", "p0", [1, 0, 0, 0])])
    b = _write(tmp_path / "b.jsonl", [("c2", "p0", [1, 0, 0, 0])])
    done = _run(str(a), str(b))
    assert done.returncode != 0 and done.stderr.strip() == f"{b}: not the same cells as {a}"
    binary = tmp_path / "binary.jsonl"
    binary.write_text(json.dumps({"path": "c1", "probs": {"functional": 1.0, "defective": 0.0}}) + "\n")
    done = _run(str(binary))
    assert (
        done.returncode != 0
        and done.stderr.strip() == f"{binary}:1: expected probabilities for p0, p33, p67, p100"
    )


def test_unreadable_files_get_one_line_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"path": "c1", "probs": \n', encoding="utf-8")
    missing = tmp_path / "missing.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    for path, message in (
        (broken, f"{broken}:1: not a JSON row of benchmarks/elpv.py --predictions"),
        (empty, f"{empty}: no prediction rows"),
    ):
        done = _run(str(path))
        assert done.returncode != 0 and done.stderr.strip() == message
    done = _run(str(missing))
    assert done.returncode != 0 and done.stderr.startswith(f"{missing}: cannot be read:")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
