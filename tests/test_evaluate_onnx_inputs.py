"""`defectscope evaluate MODEL.onnx DATA` with awkward inputs, through the real command: class names that
look like TeX, file names that are not UTF-8, a lot with no readable image, a model path holding '=',
options before the model, CSV labels the model does not know.  Real models, images and subprocesses."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from onnx_models import build_model, make_image
from test_cli_errors import defectscope, one_line_error


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


def _lot(root: Path, names: tuple[str, str] = ("good", "crack"), n: int = 6) -> Path:
    for i in range(n):
        make_image(root / names[i % 2] / f"{i}.png", 64, 64, bright=i % 2 == 1, seed=i)
    return root


def test_class_names_that_look_like_tex_are_plotted_as_text(tmp_path: Path) -> None:
    names = ["good", "$\\frac{a$", "x$^"]  # matplotlib would parse these as math text and fail
    model = build_model(tmp_path / "tex.onnx", class_names=names)
    lot = _lot(tmp_path / "lot", (names[0], names[1]))
    proc = defectscope("evaluate", model, lot, "--sweep", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0
    assert (tmp_path / "out" / "roc_pr.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["class_names"] == names


def test_a_file_name_that_is_not_utf8_gets_its_row(model: Path, tmp_path: Path) -> None:
    lot = _lot(tmp_path / "lot")
    odd = os.path.join(os.fsencode(lot / "crack"), b"\xff-odd.png")
    os.rename(make_image(tmp_path / "spare.png", 64, 64, bright=True, seed=9), odd)
    proc = defectscope("evaluate", model, lot, "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "scored 7 images" in proc.stdout
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    assert len(paths) == 7 and any(p.endswith("\\udcff-odd.png") for p in paths), paths


def test_a_lot_without_one_readable_image_is_refused(model: Path, tmp_path: Path) -> None:
    for name in ("good/a.png", "crack/b.png"):
        (tmp_path / "lot" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lot" / name).write_bytes(b"not an image")
    proc = defectscope("evaluate", model, tmp_path / "lot", "--out", tmp_path / "out", cwd=tmp_path)
    one_line_error(proc, "none of its 2 images could be read", "not_an_image")
    assert not (tmp_path / "out" / "evaluation.json").exists()


def test_a_model_path_with_equals_and_options_before_it(model: Path, tmp_path: Path) -> None:
    """Both are the exported-model form, not Hydra overrides (``ckpt_path=m.onnx`` stays one)."""
    _lot(tmp_path / "lot")
    (tmp_path / "seed=1").mkdir()
    (tmp_path / "seed=1" / "m.onnx").write_bytes(model.read_bytes())
    proc = defectscope("evaluate", "--threshold", "0.3", "seed=1/m.onnx", "lot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threshold 0.3 (given" in proc.stdout and "scored 6 images" in proc.stdout
    one_line_error(defectscope("evaluate", "ckpt_path=seed=1/m.onnx", cwd=tmp_path), "ckpt_path")


def test_csv_labels_the_model_does_not_know_are_one_line(model: Path, tmp_path: Path) -> None:
    lot = _lot(tmp_path / "lot")
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(lot.rglob("*.png"))]
    rows[1:3] = [f"{rows[1].split(',')[0]},dent", f"{rows[2].split(',')[0]},dent"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    line = one_line_error(
        defectscope("evaluate", model, "m.csv", cwd=tmp_path),
        "m.csv: 2 invalid row(s): row 3: label 'dent'; row 4: label 'dent'",
        "labels must be in the model's classes ['good', 'crack', 'scratch']",
    )
    assert "data.source" not in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--threads", "-1"], "argument --threads: expected a whole number >= 0, got '-1'"),
        (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
        (["--provider", "gpu"], "argument --provider: invalid choice: 'gpu'"),
    ],
)
def test_evaluate_and_inspect_hold_the_engine_options_to_one_rule(
    model: Path, tmp_path: Path, option: list[str], expected: str
) -> None:
    """--threads, --batch-size and --provider are typed in one place (runtime.options.add_engine_options):
    `evaluate MODEL DATA --threads -1` ran on every core where inspect refused it, and --provider had no choices."""
    lot = _lot(tmp_path / "lot")
    for command in (["evaluate", model, lot], ["inspect", model, lot, "-o", tmp_path / "r.jsonl"]):
        one_line_error(defectscope(*command, *option, cwd=tmp_path), expected)
