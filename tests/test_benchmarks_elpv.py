"""benchmarks/elpv.py: the ELPV accuracy protocol on real ELPV cells with small real ONNX models.

The models are the untrained fixtures of tests/onnx_models.py given ELPV class names, so their
accuracy means nothing; what is checked is that the evaluator runs the protocol's test cells through
the runtime and that every reported figure equals an independent computation from the per-cell
predictions it writes (and the TTA probabilities equal a by-hand flip-and-average).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from defectscope.runtime.inspector import Inspector
from onnx_models import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "elpv.py"
GRADES = ["p0", "p33", "p67", "p100"]
BINARY = ["functional", "defective"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("elpv_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _model(tmp_path: Path, names: list[str], name: str) -> Path:
    # max_side 64: the 300x300 cells are downscaled, so the model runs in milliseconds
    return build_model(
        tmp_path / f"{name}.onnx", class_names=names, good_class=names[0], max_side=64, model_name=name
    )


# ---------------------------------------------------------------- independent reference computations


def _confusion(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    counts = Counter(zip(truth, pred))
    return [[counts[(t, p)] for p in labels] for t in labels]


def _macro_f1(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    scores = []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        if tp + fp + fn:  # the class occurs in truth or prediction
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _check_block(block: dict[str, Any], truth: list[str], pred: list[str], labels: list[str]) -> None:
    assert block["labels"] == labels and block["n"] == len(truth)
    assert block["confusion"] == _confusion(truth, pred, labels)
    assert block["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, pred)) / len(truth))
    assert block["macro_f1"] == pytest.approx(_macro_f1(truth, pred, labels))
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        return
    assert block["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))


def _check_metrics(result: dict[str, Any], rows: list[dict[str, Any]], task: str) -> None:
    for group in ("overall", "mono", "poly"):
        sub = [r for r in rows if group in ("overall", r["module_type"])]
        m = result["metrics"][group]
        assert m["n"] == len(sub) > 0
        t_bin = [BINARY[r["grade"] in ("p67", "p100")] for r in sub]
        _check_block(m["binary"], t_bin, [BINARY[r["pred_defective"]] for r in sub], BINARY)
        if task == "binary":
            assert m["four_class"] is None and m["binary_argmax"] is None
            continue
        _check_block(m["four_class"], [r["grade"] for r in sub], [r["pred_grade"] for r in sub], GRADES)
        argmax_bin = [BINARY[r["pred_grade"] in ("p67", "p100")] for r in sub]
        _check_block(m["binary_argmax"], t_bin, argmax_bin, BINARY)


def _flip_average(model: Path, paths: list[str]) -> np.ndarray:
    """TTA 'flips' by hand: the runtime's preprocessing, four flips, probabilities averaged."""
    insp = Inspector(model, provider="cpu", threads=1)
    x = insp.preprocess(paths)
    views = [x, np.flip(x, 3), np.flip(x, 2), np.flip(np.flip(x, 2), 3)]
    return np.mean([insp.predict(np.ascontiguousarray(v), cam=False)["probs"] for v in views], axis=0)


# ---------------------------------------------------------------- tests


def test_protocol_split_and_always_functional_baseline(bench: ModuleType) -> None:
    split = bench.elpv_test_split()
    assert (split.n_total, split.n_train, len(split.cells)) == (2624, 1968, 656)
    assert (split.test_fraction, split.seed) == (0.25, 42)
    assert Counter(c.grade for c in split.cells) == {"p0": 377, "p33": 74, "p67": 26, "p100": 179}
    assert Counter(c.module_type for c in split.cells) == {"mono": 280, "poly": 376}
    assert all(Path(c.path).is_file() for c in split.cells[:20])

    base = bench.always_functional(split.cells)["overall"]
    assert base["binary"]["accuracy"] == (377 + 74) / 656 == 0.6875  # the "68.7 %"
    assert base["four_class"]["accuracy"] == 377 / 656
    mono = bench.always_functional([c for c in split.cells if c.module_type == "mono"])["overall"]
    assert (
        mono["binary"]["accuracy"]
        == sum(not c.defective for c in split.cells if c.module_type == "mono") / 280
    )

    sub = bench.limit_cells(split.cells, 40)
    assert Counter(c.grade for c in sub) == {"p0": 23, "p33": 4, "p67": 2, "p100": 11}  # stratified
    assert {c.path for c in sub} <= {c.path for c in split.cells}


@pytest.mark.slow
def test_four_class_model_cli_matches_independent_computation(bench: ModuleType, tmp_path: Path) -> None:
    model = _model(tmp_path, GRADES, "fixture4")
    out, plot = tmp_path / "res" / "r.json", tmp_path / "res" / "cm.png"
    args = ["--limit", "48", "--tta", "flips", "--batch-size", "16", "--threads", "1"]
    args += ["--out", str(out), "--plot", str(plot), "--label", "fixture-s1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(model), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "binary verdict: P(p67) + P(p100) >= 0.5" in proc.stdout
    assert "| fixture-s1 (48-cell subset) | 4class | flips |" in proc.stdout
    assert "1968 train / 656 test cells" in proc.stderr

    result = json.loads(out.read_text())
    rows = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert result["task"] == "4class" and result["split"]["n_evaluated"] == len(rows) == 48
    expected = bench.limit_cells(bench.elpv_test_split().cells, 48)
    assert [r["path"] for r in rows] == [c.path for c in expected]
    assert [(r["grade"], r["module_type"]) for r in rows] == [(c.grade, c.module_type) for c in expected]
    for r in rows:
        p = r["probs"]
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["pred_grade"] == max(GRADES, key=lambda g: p[g])
        assert r["p_defective"] == pytest.approx(p["p67"] + p["p100"])
        assert r["pred_defective"] == (p["p67"] + p["p100"] >= 0.5)
    assert len({r["pred_grade"] for r in rows}) >= 2  # the fixture does not predict one class only
    _check_metrics(result, rows, "4class")

    by_hand = _flip_average(model, [r["path"] for r in rows[:6]])
    got = np.array([[r["probs"][g] for g in GRADES] for r in rows[:6]])
    np.testing.assert_allclose(got, by_hand, atol=1e-6)

    s = result["speed"]
    assert s["images"] == 48 and s["threads"] == 1 and s["tta_views"] == 4
    assert s["compute_images_per_s"] > s["end_to_end_images_per_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_binary_model_has_no_four_class_figures(bench: ModuleType, tmp_path: Path) -> None:
    model = _model(tmp_path, BINARY, "fixture2")
    result, rows = bench.evaluate(str(model), limit=24, threads=1, provider="cpu", log=lambda _: None)
    assert result["task"] == "binary" and result["binary_rule"] == "P(defective) >= 0.5"
    assert len(rows) == 24 and all(r["pred_grade"] is None for r in rows)
    for r in rows:
        assert r["pred_defective"] == (r["probs"]["defective"] >= 0.5)
    _check_metrics(result, rows, "binary")
    # tta none gives exactly the plain runtime probabilities
    insp = Inspector(model, provider="cpu", threads=1)
    plain = insp.predict(insp.preprocess([r["path"] for r in rows[:4]]), cam=False)["probs"]
    np.testing.assert_allclose([[r["probs"][c] for c in BINARY] for r in rows[:4]], plain, atol=1e-6)


def test_foreign_class_names_are_rejected(bench: ModuleType, tmp_path: Path, capsys: Any) -> None:
    model = build_model(tmp_path / "generic.onnx")  # good / crack / scratch
    assert bench.main([str(model), "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "generic.onnx" in err and "['p0', 'p33', 'p67', 'p100']" in err and "data.source.task" in err


def test_table_merges_seeds_into_mean_and_std(bench: ModuleType, tmp_path: Path, capsys: Any) -> None:
    model = _model(tmp_path, GRADES, "fixture4")
    result, _ = bench.evaluate(str(model), limit=24, threads=1, provider="cpu", log=lambda _: None)
    accs = [0.80, 0.83, 0.85]
    files = []
    for seed, acc in zip((1, 2, 3), accs):
        doc = json.loads(json.dumps(result))
        doc["label"] = f"resnet_small-s{seed}"
        doc["metrics"]["overall"]["four_class"]["accuracy"] = acc
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(doc))
    other = dict(result, label="lenet-s1")  # a lone seed: no mean row
    files.append(tmp_path / "lenet.json")
    files[-1].write_text(json.dumps(other))

    assert bench.main(["--table", *map(str, files)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    mean_rows = [ln for ln in lines if "mean ± std" in ln]
    assert len(mean_rows) == 1 and mean_rows[0].startswith("| **resnet_small** (mean ± std, 3 seeds) |")
    cells = [c.strip() for c in mean_rows[0].split("|")]
    assert cells[5] == f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}"
    b = result["metrics"]["overall"]["binary"]["accuracy"]
    assert cells[4] == f"{100 * b:.2f} ± 0.00"  # identical binary figures: zero spread
    assert sum(ln.startswith("| resnet_small-s") for ln in lines) == 3
    assert any(ln.startswith("| lenet-s1 (24-cell subset) |") for ln in lines)
    base = next(ln for ln in lines if ln.startswith('| always "functional"'))
    assert "| 68.75 | 57.47 |" in base
    for ref in ("88.42", "82.44", "83.50"):
        assert f"| {ref} |" in table


@pytest.mark.slow
def test_checkpoint_path_agrees_with_its_onnx_export(bench: ModuleType, tmp_path: Path) -> None:
    """--checkpoint (PyTorch) and the exported model (runtime) give the same probabilities per cell."""
    from defectscope.export.cli import main as export_main
    from test_export_support import build_preset, checkpoint_info, model_presets, randomize, write_checkpoint

    test_cells = bench.elpv_test_split().cells
    cfg = model_presets()["tiny"]
    net = randomize(build_preset(cfg, num_classes=4, in_chans=1), seed=5)
    loader = {"channels": 1, "max_side": 96, "min_size": 32, "size_multiple": 1, "max_pixels": 4_000_000}
    val = [c.path for c in test_cells[:3]] + ["/elsewhere/cell.png"]  # a leak the evaluator must count
    info = checkpoint_info(cfg["name"], net.model_kwargs, class_names=GRADES, loader=loader, val_paths=val)
    ckpt = write_checkpoint(tmp_path / "best.ckpt", net, info)
    onnx_path = tmp_path / "tiny.onnx"
    assert export_main([str(ckpt), "-o", str(onnx_path), "--parity-images", "0"]) == 0

    import torch

    threads = torch.get_num_threads()
    quiet = {"limit": 32, "threads": 1, "log": lambda _: None}
    r_ckpt, rows_ckpt = bench.evaluate(str(ckpt), checkpoint=True, tta="hflip", **quiet)
    r_onnx, rows_onnx = bench.evaluate(str(onnx_path), provider="cpu", tta="hflip", **quiet)
    assert torch.get_num_threads() == threads  # the evaluator restores the caller's setting
    assert r_ckpt["model_format"] == "checkpoint" and r_ckpt["checkpoint_val_paths_in_test"] == 3
    assert "checkpoint_val_paths_in_test" not in r_onnx
    assert [r["path"] for r in rows_ckpt] == [r["path"] for r in rows_onnx]
    got = np.array([[r["probs"][g] for g in GRADES] for r in rows_onnx])
    ref = np.array([[r["probs"][g] for g in GRADES] for r in rows_ckpt])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    _check_metrics(r_ckpt, rows_ckpt, "4class")

    # flips built into the graph (export --tta hflip): the PyTorch mean of the copies' logits
    graph_path = tmp_path / "tiny-hflip.onnx"
    assert export_main([str(ckpt), "-o", str(graph_path), "--parity-images", "0", "--tta", "hflip"]) == 0
    r_graph, rows_graph = bench.evaluate(str(graph_path), provider="cpu", **quiet)
    assert r_graph["tta"] == "graph hflip" and r_graph["speed"]["tta_views"] == 2
    with pytest.raises(bench.EvalError, match="already averages test-time hflip in its graph"):
        bench.evaluate(str(graph_path), provider="cpu", tta="flips", **quiet)
    from defectscope.runtime.image import LoaderConfig, load_image, normalize_batch

    cells = [load_image(r["path"], LoaderConfig(**loader)) for r in rows_graph]
    x = torch.from_numpy(normalize_batch(cells, info["mean"], info["std"]))
    with torch.inference_mode():
        want = ((net(x) + net(x.flip(3))) / 2).softmax(1).double().numpy()
    got = np.array([[r["probs"][g] for g in GRADES] for r in rows_graph])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_val_list_is_the_training_validation_split(
    bench: ModuleType, tmp_path: Path, compose_train: Any
) -> None:
    """`--val-list` (export --int8 calibrates on it) is exactly what training validates on, no test cell."""
    from hydra.utils import instantiate

    out, test = tmp_path / "val.txt", tmp_path / "test.txt"
    assert bench.main(["--val-list", str(out), "--test-list", str(test)]) == 0
    listed = out.read_text(encoding="utf-8").splitlines()
    assert test.read_text(encoding="utf-8").splitlines() == [c.path for c in bench.elpv_test_split().cells]
    cfg = compose_train(["experiment=elpv", f"paths.output_dir={tmp_path}", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert sorted(listed) == sorted(s.path for s in dm.samples["val"]) and len(listed) == 295
    assert not set(listed) & {c.path for c in bench.elpv_test_split().cells}


def test_grading_rule_ordinal_figures_and_operating_point(bench: ModuleType, tmp_path: Path) -> None:
    """A model that ships a grading rule is graded by it (as the runtime does); balanced accuracy, the
    ordinal figures and the operating point agree with independent computations."""
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

    cuts = [0.3, 0.35, 0.4]
    model = build_model(
        tmp_path / "graded.onnx", class_names=GRADES, good_class="p0", max_side=64, model_name="graded",
        grading={"rule": "cuts", "cuts": cuts}, ng_classes=["p67", "p100"], threshold=0.3,
    )  # fmt: skip
    result, rows = bench.evaluate(str(model), limit=60, threads=1, provider="cpu", log=lambda _: None)
    assert result["grading"] == {"rule": "cuts", "cuts": cuts}  # cuts_for absent = accuracy
    for r in rows:
        e = sum(i * r["probs"][g] for i, g in enumerate(GRADES))
        assert r["expected_grade"] == pytest.approx(e)
        assert r["pred_grade"] == GRADES[sum(c <= e for c in cuts)]
    assert any(r["pred_grade"] != max(GRADES, key=lambda g: r["probs"][g]) for r in rows)  # not argmax
    truth, pred = [r["grade"] for r in rows], [r["pred_grade"] for r in rows]
    four = result["metrics"]["overall"]["four_class"]
    assert four["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    t, p = [GRADES.index(g) for g in truth], [GRADES.index(g) for g in pred]
    assert four["qwk"] == pytest.approx(cohen_kappa_score(t, p, weights="quadratic"))
    assert four["mae"] == pytest.approx(np.mean(np.abs(np.subtract(t, p))))
    assert four["off_by_more_than_one"] == pytest.approx(np.mean(np.abs(np.subtract(t, p)) > 1))

    scores = np.array([r["p_defective"] for r in rows])
    defective = np.array([r["grade"] in ("p67", "p100") for r in rows])
    for key, target in (("recall_95", 0.95), ("recall_99", 0.99)):
        point = result["metrics"]["overall"]["operating_point"][key]
        flagged = scores >= point["threshold"]
        assert flagged[defective].mean() >= target  # the threshold reaches the recall ...
        kth = np.sort(scores[defective])[::-1][math.ceil(target * defective.sum() - 1e-9) - 1]
        assert not (scores[defective] > kth).mean() >= target  # ... the k-th defect score decides it
        below = scores[~defective][scores[~defective] < kth]
        assert point["threshold"] == pytest.approx((kth + below.max()) / 2 if below.size else kth)  # mid-gap
        p0 = np.array([r["grade"] == "p0" for r in rows])
        assert point["false_reject_rate_p0"] == pytest.approx(flagged[p0].mean())
        assert point["false_reject_rate_functional"] == pytest.approx(flagged[~defective].mean())
    shipped = result["shipped"]
    assert shipped["threshold"] == 0.3 and shipped["ng_classes"] == ["p67", "p100"]
    assert shipped["recall"] == pytest.approx((scores[defective] >= 0.3).mean())
