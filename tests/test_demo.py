"""The main job end to end: `defectscope demo` runs the real CLI (synth -> train -> export -> inspect)
and scores the held-out images against their class folders."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from defectscope.demo import score_holdout


def _row(path: str, label: str, verdict: str | None, status: str = "ok") -> dict[str, object]:
    """A row as the first row format wrote it (``label``, ``score``), which results files still read."""
    figures = {"defect_prob": 0.9 if verdict == "NG" else 0.1, "score": 0.8} if status == "ok" else {}
    return {"path": path, "status": status, "label": label, "verdict": verdict, **figures}


def test_score_holdout_counts_escapes_and_false_rejects(tmp_path: Path) -> None:
    rows = [
        _row("/h/good/a.png", "good", "OK"),
        _row("/h/good/b.png", "spot", "NG"),  # false reject
        _row("/h/spot/c.png", "spot", "NG"),
        _row("/h/crack/d.png", "good", "OK"),  # escape
        _row("/h/crack/e.png", "scratch", "NG"),  # right verdict, wrong label
        _row("/h/spot/f.png", "", None, status="error"),
    ]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    score = score_holdout(results)
    assert score["images"] == 6 and score["inspected"] == 5
    assert score["label_accuracy"] == pytest.approx(2 / 5)
    assert score["verdict_accuracy"] == pytest.approx(3 / 5)
    assert score["escape_rate"] == pytest.approx(1 / 3)
    assert score["false_reject_rate"] == pytest.approx(1 / 2)


@pytest.mark.slow
def test_demo_runs_the_whole_product(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*defectscope_cmd, "demo", "--workdir", str(work), "--holdout", "24", "--experiment", "smoke"],
        cwd=tmp_path,  # the local MLflow store (mlflow.db) lands here, not in the checkout
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    holdout = sorted((work / "holdout").rglob("*.png"))
    assert len(holdout) == 24
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in holdout)  # one row per input
    # held-out images follow the training data's size range (smoke: 64..96 px)
    assert all(64 <= r["width"] <= 96 and 64 <= r["height"] <= 96 for r in rows)
    report = work / "report.html"
    assert report.stat().st_size > 1000 and "<html" in report.read_text(encoding="utf-8").lower()
    assert (tmp_path / "mlflow.db").is_file()
    # the printed held-out check is the one recomputed from the rows on disk
    printed = re.search(r"OK/NG accuracy\s+([\d.]+)%", proc.stdout)
    assert printed is not None, proc.stdout[-2000:]
    assert float(printed.group(1)) == pytest.approx(
        100 * score_holdout(results)["verdict_accuracy"], abs=0.05
    )
    assert f"Report:  {report}" in proc.stdout


def test_demo_refuses_non_synthetic_data_before_training(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """The held-out images are generated, so ELPV (or a folder) must be refused before a long fit."""
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*defectscope_cmd, "demo", "--workdir", str(work), "--experiment", "elpv"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "data.source.kind must be 'synthetic'" in proc.stderr and "'elpv'" in proc.stderr
    assert "== train:" not in proc.stdout and not (work / "train").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--holdout", "0"], "argument --holdout: expected a whole number >= 1, got '0'"),
        (["data.split.val_fraction=2"], "train: error: data.split.val_fraction must be a number in [0, 1)"),
        (["model=nosuch"], "demo: error: the training config does not compose: "),
    ],
)
def test_demo_mistakes_are_one_line_before_training(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str], args: list[str], message: str
) -> None:
    """--holdout 0 stopped only after training and export; a config error printed train's stderr whole."""
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*defectscope_cmd, "demo", "--workdir", str(work), "--experiment", "smoke", *args],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and not list(work.rglob("*.ckpt"))
