"""A model output that cannot decide an image never reads as OK: NaN probabilities become error rows in
`inspect` and `watch`, `evaluate` refuses them, and a graph whose width is not the metadata's class list
is refused at load (real ONNX Runtime sessions, real files, the real CLIs)."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import onnxruntime as ort
import pytest

from defectscope.evaluation.cli import main as evaluate_main
from defectscope.runtime.startcheck import StartCheckError, exercise
from inspect_runs import rows_of, run
from onnx_models import build_model, make_image
from watch_runs import png_bytes, read_rows, start_watch, wait_for

#: normalised mean of the fixture's dark images is about -1.38, of its bright ones about -1.0 to -1.2;
#: the start-up probe's standard-normal input has a mean of about 0
DARK_BELOW = -1.25


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("nan") / "nan.onnx", nan_when_dark=DARK_BELOW)


def _images(d: Path) -> tuple[list[Path], list[Path]]:
    dark = [make_image(d / f"dark_{i}.png", 64, 64, bright=False, seed=i) for i in range(3)]
    bright = [make_image(d / f"bright_{i}.png", 64, 64, bright=True, seed=i) for i in range(3)]
    return dark, bright


def test_nan_probabilities_are_error_rows_in_inspect(nan_model: Path, tmp_path: Path) -> None:
    dark, bright = _images(tmp_path / "imgs")
    out, csv_path, report = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.html"
    assert run(nan_model, tmp_path / "imgs", "-o", out, "--csv", csv_path, "--report", report) == 1
    for line in out.read_text().splitlines():  # every line stays strict JSON: no bare NaN
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a row"))
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert len(rows) == 6
    for p in dark:
        r = rows[p.name]
        assert (r["status"], r["verdict"], r["probs"]) == ("error", None, None)
        assert (
            r["error"]
            == "inference_failed: the model gave probabilities that are not finite (NaN or infinite)"
        )
    assert all(rows[p.name]["status"] == "ok" and rows[p.name]["verdict"] == "NG" for p in bright)
    with open(csv_path, newline="") as f:
        assert sorted(row["status"] for row in csv.DictReader(f)) == ["error"] * 3 + ["ok"] * 3
    assert report.is_file()


def test_nan_probabilities_go_to_the_error_folder_in_watch(nan_model: Path, tmp_path: Path) -> None:
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    proc = start_watch(nan_model, hot, out, log)
    wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    (hot / "dark.png").write_bytes(png_bytes(1, bright=False))
    (hot / "bright.png").write_bytes(png_bytes(2, bright=True))
    wait_for(lambda: len(read_rows(out)) == 2, what="both files handled")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
    placed = {Path(r["path"]).name: r["moved_to"] for r in read_rows(out)}
    assert placed == {"dark.png": "error/dark.png", "bright.png": "NG/bright.png"}
    assert not (out / "OK").exists() or not any((out / "OK").iterdir())


def test_evaluate_refuses_nan_probabilities(
    nan_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "lot"
    for cls, bright in (("good", False), ("crack", True)):
        for i in range(2):
            make_image(data / cls / f"{i}.png", 64, 64, bright=bright, seed=i)
    assert evaluate_main([str(nan_model), str(data), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "gave probabilities that are not finite (NaN or infinite) for 2 of 4" in err
    )
    assert not (tmp_path / "ev" / "evaluation.json").exists()


def test_a_graph_wider_or_narrower_than_the_class_list_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.png", 64, 64, bright=True)
    wide = build_model(tmp_path / "wide.onnx", num_outputs=4)  # the metadata names 3 classes
    assert run(wide, imgs, "-o", tmp_path / "w.jsonl") == 2
    assert (
        "graph output probs is shaped ['N', 4], but the metadata names 3 classes" in capsys.readouterr().err
    )
    assert not (tmp_path / "w.jsonl").exists()
    # a width that only shows when the graph runs: the start-up run checks it too
    narrow = ort.InferenceSession(str(build_model(tmp_path / "narrow.onnx", num_outputs=2)))
    with pytest.raises(
        StartCheckError, match=r"^start-up run at 1x1x32x32 gave 2 probabilities per image for 3 classes$"
    ):
        exercise(narrow, [(1, 1, 32, 32)], classes=3)
    assert exercise(narrow, [(1, 1, 32, 32)], classes=2) is None
    # through the CLI: the file is named, and no provider fallback is tried for a model problem
    hidden = build_model(tmp_path / "hidden.onnx", width_from_height=16)  # 2 of 3 columns at 32 px
    assert run(hidden, imgs, "-o", tmp_path / "h.jsonl") == 2
    err = capsys.readouterr().err
    assert (
        f"{hidden}: start-up run at 1x1x32x32 gave 2 probabilities per image for 3 classes "
        "(the metadata's class_names)" in err
    ), err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1 and not (tmp_path / "h.jsonl").exists()


def test_csv_cells_that_look_like_formulas_stay_text(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx", class_names=["good", "=HYPERLINK(1)", "+scratch"])
    make_image(tmp_path / "imgs" / "a.png", 64, 64, bright=True)
    out, csv_path = tmp_path / "r.jsonl", tmp_path / "r.csv"
    assert run(model, tmp_path / "imgs", "-o", out, "--csv", csv_path, "--threshold", 0.5) == 0
    row = rows_of(out)[0]
    assert row["top_class"] in {"=HYPERLINK(1)", "+scratch"}  # the JSONL keeps the exact name
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["top_class"] == "'" + row["top_class"]
    assert "prob_=HYPERLINK(1)" in table[0]  # a header that starts with prob_ is no formula
    assert table[0]["threshold_source"] == "--threshold"  # a fixed value, as documented: left alone


def test_report_shows_n_a_for_threshold_figures_that_are_not_numbers(tmp_path: Path) -> None:
    source = {
        "method": "recall target",
        "target_recall": "high",
        "too_costly": True,
        "false_reject_rate": 0.4,
        "tradeoff": [{"target_recall": 0.9, "threshold": "abc", "recall": None, "false_reject_rate": [1]}],
    }
    model = build_model(tmp_path / "m.onnx", threshold_source=source)
    make_image(tmp_path / "imgs" / "a.png", 64, 64, bright=True)
    report = tmp_path / "r.html"
    assert run(model, tmp_path / "imgs", "-o", tmp_path / "r.jsonl", "--report", report) == 0
    html = report.read_text()
    assert "<td>90.0 %</td><td>n/a</td><td>n/a</td><td>n/a</td>" in html
    assert "defect recall ≥ n/a" in html and json.loads((tmp_path / "r.jsonl").read_text())["status"] == "ok"
