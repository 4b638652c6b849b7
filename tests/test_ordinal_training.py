"""Ordered grades end to end: every ordinal objective trains on a tiny ordered synthetic set, the
checkpoint carries its grading rule, export keeps parity with it, and the runtime grades by it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defectscope.training.config import TrainingConfigError
from defectscope.training.ordinal import Objective, resolve_objective
from defectscope.training.train import train
from tiny_runs import tiny_folder_overrides

GRADES = ["g0", "g1", "g2", "g3"]
SIDES = (0, 6, 12, 20)  # the bright square grows with the grade


def make_ordered_set(root: Path, per_grade: int = 40, size: int = 48, seed: int = 0) -> Path:
    """Grey noise with a bright square whose side grows with the grade (g0: none)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for grade, side in zip(GRADES, SIDES):
        folder = root / grade
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_grade):
            img = rng.normal(90, 12, (size, size))
            if side:
                y, x = rng.integers(0, size - side, 2)
                img[y : y + side, x : x + side] += 90
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def ordered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ordered_set(tmp_path_factory.mktemp("ordered"))


def ordered_cfg(compose_train: Callable[..., Any], data: Path, out: Path, *extra: str) -> Any:
    ordered = [
        "scheduler=onecycle", f"data.source.classes=[{','.join(GRADES)}]", "data.ordered=true",
        'threshold.ng_classes=">= g2"',
    ]  # fmt: skip
    return compose_train([*tiny_folder_overrides(data, out, "g0", epochs=12), *ordered, *extra])


@pytest.fixture(scope="module")
def trained(
    ordered_dir: Path, compose_train: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, float]]]:
    """One short training per ordinal objective: (best checkpoint, final metrics)."""
    runs = {}
    for objective in ("soft", "expected", "corn"):
        out = tmp_path_factory.mktemp(objective)
        extra = ["ordinal.cuts_for=balanced"] if objective == "expected" else []  # the default is accuracy
        metrics = train(
            ordered_cfg(compose_train, ordered_dir, out, f"ordinal.objective={objective}", *extra)
        )
        runs[objective] = (out / "checkpoints" / "best.ckpt", metrics)
    return runs


@pytest.mark.parametrize("objective", ["soft", "expected", "corn"])
def test_each_ordinal_objective_learns_the_grades(
    trained: dict[str, tuple[Path, dict[str, float]]], objective: str
) -> None:
    ckpt, metrics = trained[objective]
    # chance on 4 balanced grades: accuracy 0.25, kappa 0, MAE 1.25
    assert metrics["test/acc"] >= 0.5 and metrics["test/qwk"] >= 0.6 and metrics["test/mae"] <= 0.6, metrics
    assert {"val/mae", "val/off_by_more_than_one", "val/qwk"} <= set(metrics)
    info = torch.load(ckpt, map_location="cpu", weights_only=True)["defectscope"]
    rule = {"soft": "argmax", "expected": "cuts", "corn": "median"}[objective]
    assert info["grading"]["objective"] == objective and info["grading"]["rule"] == rule
    assert info["grading"]["ordered"] is True and info["ng_classes"] == ["g2", "g3"]
    assert info["model_kwargs"]["num_classes"] == (3 if objective == "corn" else 4)
    if (
        objective == "expected"
    ):  # chosen on validation (for balanced accuracy), not the initial 0.5 / 1.5 / 2.5
        assert len(info["grading"]["cuts"]) == 3 and info["grading"]["cuts"] != [0.5, 1.5, 2.5]
        assert info["grading"]["cuts_for"] == "balanced"


def _rule_by_hand(probs: dict[str, float], grading: dict[str, Any]) -> str:
    p = [probs[g] for g in GRADES]
    if grading["rule"] == "median":
        total = 0.0
        for g, v in zip(GRADES, p):
            total += v
            if total >= 0.5:
                return g
        return GRADES[-1]
    expected = sum(i * v for i, v in enumerate(p))
    return GRADES[sum(c <= expected for c in grading["cuts"])]


@pytest.mark.parametrize("objective", ["expected", "corn"])
def test_export_keeps_parity_and_the_runtime_grades_by_the_rule(
    trained: dict[str, tuple[Path, dict[str, float]]],
    ordered_dir: Path,
    objective: str,
    tmp_path: Path,
    defectscope_cmd: list[str],
    cli_env: dict[str, str],
) -> None:
    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.onnx_export import export_model

    ckpt, _ = trained[objective]
    model, info = load_checkpoint(ckpt)
    result = export_model(model, info, tmp_path / "m.onnx", log=lambda _: None)
    meta = result.metadata
    assert meta.grading["rule"] == ("cuts" if objective == "expected" else "median")
    assert meta.grading.get("cuts_for") == ("balanced" if objective == "expected" else None)
    assert result.parity["max_abs_prob_fused"] <= 1e-4 and result.parity["max_rel_cam_unfused"] <= 1e-4
    assert meta.ng_classes == ["g2", "g3"] and meta.class_names == GRADES

    rows_file = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [*defectscope_cmd, "inspect", str(result.path), str(ordered_dir), "--recursive", "-o", str(rows_file),
         "--report", str(tmp_path / "r.html")],
        capture_output=True, text=True, env=cli_env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    how = {
        "expected": f"(for balanced), chosen on this fp32 graph on {meta.grading_source.get('count')} images of the",
        "corn": "ordered grades, the median of the predicted distribution",
    }[objective]
    assert how in (tmp_path / "r.html").read_text()
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 4 * 40
    for row in rows:
        assert row["top_class"] == _rule_by_hand(row["probs"], meta.grading)
        defect = row["probs"]["g2"] + row["probs"]["g3"]
        assert row["verdict"] == ("NG" if defect >= meta.threshold else "OK")
    truth = [Path(r["path"]).parent.name for r in rows]
    assert np.mean([r["top_class"] == t for r, t in zip(rows, truth)]) >= 0.5


def test_export_chooses_the_cut_points_for_what_it_is_told(
    trained: dict[str, tuple[Path, dict[str, float]]], tmp_path: Path
) -> None:
    """``export --cuts-for`` re-chooses the cuts on the graph for that objective; other rules refuse it."""
    import onnxruntime as ort

    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.grading import checkpoint_grading
    from defectscope.export.onnx_export import ExportError, export_model
    from defectscope.runtime.grading import choose_cuts, expected_grade
    from defectscope.runtime.image import load_image, normalize_batch

    model, info = load_checkpoint(trained["expected"][0])
    result = export_model(model, info, tmp_path / "m.onnx", cuts_for="accuracy", log=lambda _: None)
    meta = result.metadata
    session = ort.InferenceSession(result.model_bytes, providers=["CPUExecutionProvider"])
    batch = [normalize_batch([load_image(p, meta.loader)], meta.mean, meta.std) for p in info["val_paths"]]
    e = np.concatenate([expected_grade(session.run(["probs"], {"input": x})[0]) for x in batch])
    truth = np.array([GRADES.index(label) for label in info["val_labels"]])
    n = len(truth)
    assert n >= 20 and "cuts_for" not in meta.grading  # the default is not written (older runtimes)
    assert meta.grading["cuts"] == pytest.approx(list(choose_cuts(e, truth, 4)))
    assert meta.grading_source == {
        "method": "chosen on this graph", "variant": "fp32", "cuts_for": "accuracy", "count": n,
        "images": f"the checkpoint's {n} validation images", "unreadable_images": 0,
    }  # fmt: skip
    # too few validation images here to choose again: training's cut points ship, and the file says so
    few = {**info, "val_paths": info["val_paths"][:5], "val_labels": info["val_labels"][:5]}
    kept = export_model(model, few, tmp_path / "k.onnx", threshold=0.5, log=lambda _: None).metadata
    assert kept.grading == checkpoint_grading(info)[1]
    assert kept.grading_source == {
        "method": "kept from training", "cuts_for": "balanced", "count": 5,
        "images": "the checkpoint's 5 validation images", "unreadable_images": 0,
    }  # fmt: skip
    # a labelled --images is what the threshold and the cut points are both chosen on (and counted for
    # --cuts-for before the work: the checkpoint's 5 images here do not matter then)
    lot = tmp_path / "lot.csv"
    lot.write_text(
        "path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(info["val_paths"], info["val_labels"]))
    )
    graded = export_model(
        model, few, tmp_path / "l.onnx", images_dir=lot, cuts_for="accuracy", log=lambda _: None
    ).metadata
    assert graded.grading["cuts"] == pytest.approx(meta.grading["cuts"])
    assert graded.grading_source["images"] == graded.threshold_source["images"] == str(lot)
    assert graded.grading_source["count"] == n and graded.threshold_source["n_good"] + graded.threshold_source[
        "n_defect"] == n  # fmt: skip
    # a threshold set by hand still grades on the labelled --images (it fell back to the checkpoint's)
    by_hand = export_model(model, few, tmp_path / "h.onnx", images_dir=lot, threshold=0.5, log=lambda _: None)
    assert (
        by_hand.metadata.grading_source["images"] == str(lot)
        and by_hand.metadata.grading_source["count"] == n
    )
    # files that exist but cannot be read do not count: too few readable keep training's cut points, and
    # new ones asked for are refused (cuts chosen on 3 images, or the placeholder on none, shipped before)
    broken = tmp_path / "broken"
    broken.mkdir()
    rows = list(zip(info["val_paths"], info["val_labels"]))
    assert len(rows) >= 20  # enough files to pass the count before the work
    for i in range(len(rows) - 3):
        (broken / f"{i}.png").write_bytes(b"not a png")
    lot2 = tmp_path / "lot2.csv"
    lot2.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows[:3])
                    + "".join(f"{broken / f'{i}.png'},{c}\n" for i, (_, c) in enumerate(rows[3:])))  # fmt: skip
    few_readable = export_model(
        model, few, tmp_path / "f.onnx", images_dir=lot2, threshold=0.5, log=lambda _: None
    )
    assert few_readable.metadata.grading == checkpoint_grading(info)[1]
    assert few_readable.metadata.grading_source == {
        "method": "kept from training", "cuts_for": "balanced", "count": 3, "images": str(lot2),
        "unreadable_images": len(rows) - 3,
    }  # fmt: skip
    with pytest.raises(ExportError, match=r"--cuts-for accuracy re-chooses .* but only 3 are here"):
        export_model(model, few, tmp_path / "g.onnx", images_dir=lot2, threshold=0.5, cuts_for="accuracy",
                     log=lambda _: None)  # fmt: skip
    # the checkpoint's cuts are for balanced accuracy: without its validation images they cannot be
    # re-chosen for accuracy, and the file would carry cuts that were not chosen for what it says
    logged: list[str] = []
    refused = r"--cuts-for accuracy re-chooses the cut points on labelled images, but only 0 are here"
    with pytest.raises(ExportError, match=refused):
        export_model(
            model,
            {**info, "val_paths": []},
            tmp_path / "a.onnx",
            cuts_for="accuracy",
            threshold=0.5,
            log=logged.append,
        )
    assert logged == []  # refused before fusion, export and the parity gate
    model, info = load_checkpoint(trained["corn"][0])
    with pytest.raises(ExportError, match=r"--cuts-for applies to models graded by cut points .* 'median'"):
        export_model(model, info, tmp_path / "c.onnx", cuts_for="balanced", log=lambda _: None)
    unordered = {
        "class_names": ["good", "crack"],
        "grading": {"objective": "ce", "link": "softmax", "ordered": False},
    }
    for entry in (unordered, {"class_names": ["good", "crack"]}):  # today's checkpoints, and old ones
        with pytest.raises(ExportError, match="--cuts-for applies to ordered grades"):
            checkpoint_grading(entry, "balanced")
    worded = {"class_names": ["good", "crack"], "grading": {"link": "softmax", "ordered": "no"}}
    with pytest.raises(ExportError, match=r"^checkpoint grading\.ordered must be true or false, got 'no'$"):
        checkpoint_grading(worded)  # "no" read as true would have exported ordered grades
    assert not any(tmp_path.glob("[ac].onnx"))


def test_objectives_need_ordered_grades_and_name_the_key() -> None:
    with pytest.raises(
        ValueError, match=r"ordinal\.objective=corn needs ordered grades: set data.ordered=true"
    ):
        resolve_objective({"objective": "corn"}, ordered=False)
    with pytest.raises(ValueError, match=r"ordinal\.rule=cuts grades ordered classes only"):
        resolve_objective({"rule": "cuts"}, ordered=False)
    with pytest.raises(
        ValueError, match=r"ordinal\.objective must be auto or one of ce, soft, expected, corn"
    ):
        resolve_objective({"objective": "ordinal"}, ordered=True)
    assert resolve_objective({}, ordered=False).name == "ce"
    assert resolve_objective({"objective": "expected", "rule": "median"}, ordered=True).rule == "median"
    with pytest.raises(ValueError, match=r"ordinal\.cuts_for must be one of accuracy, balanced, got 'f1'"):
        resolve_objective({"objective": "expected", "cuts_for": "f1"}, ordered=True)
    with pytest.raises(
        ValueError, match=r"ordinal\.cuts_for=balanced applies to ordinal\.rule=cuts; the rule is median"
    ):
        resolve_objective({"objective": "corn", "cuts_for": "balanced"}, ordered=True)


def test_losses_on_hand_examples() -> None:
    y = torch.tensor([0, 2])
    raw = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.3, 1.2]])
    ce = torch.nn.functional.cross_entropy(raw, y)
    soft_sharp = Objective("soft", ordered=True, soft_beta=60.0).loss(raw, y)  # targets one-hot
    torch.testing.assert_close(soft_sharp, ce)
    # expected: squared error of sum_k k p_k, plus half the cross-entropy
    p = raw.softmax(1)
    want = ((p @ torch.arange(3.0) - y.float()) ** 2).mean() + 0.5 * ce
    torch.testing.assert_close(Objective("expected", ordered=True).loss(raw, y), want)
    # CORN: image 0 (grade 0) sees task 0 only ("> 0": no); image 2 sees both tasks ("> 0", "> 1": yes)
    corn_raw = torch.tensor([[0.4, -0.2], [1.0, 0.7]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    parts = [bce(torch.tensor(0.4), torch.tensor(0.0)), bce(torch.tensor(1.0), torch.tensor(1.0)),
             bce(torch.tensor(0.7), torch.tensor(1.0))]  # fmt: skip
    torch.testing.assert_close(Objective("corn", ordered=True).loss(corn_raw, y), sum(parts) / 3)
    probs = Objective("corn", ordered=True).probs(corn_raw)
    s = torch.sigmoid(corn_raw)
    by_hand = torch.stack([1 - s[:, 0], s[:, 0] * (1 - s[:, 1]), s[:, 0] * s[:, 1]], dim=1)
    torch.testing.assert_close(probs, by_hand)


def test_mixup_trains_on_the_mixed_images_with_the_mixed_losses() -> None:
    from defectscope.training.module import DefectClassifier

    stages = [{"channels": 4, "kernel": 3, "stride": 2}]
    common: dict[str, Any] = {
        "model": {"name": "gapcnn", "stages": stages}, "num_classes": 4, "in_chans": 1, "class_names": GRADES,
        "good_class": "g0", "optim": {"optimizer": {}}, "ordinal": {"objective": "soft"}, "ordered": True,
    }  # fmt: skip
    module = DefectClassifier(**common, loss={"mixup": 0.4})
    x, y = torch.randn(6, 1, 24, 24), torch.tensor([0, 1, 2, 3, 0, 3])
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer to log to
    torch.manual_seed(3)
    got = module.training_step({"image": x, "label": y}, 0)
    torch.manual_seed(3)  # the same draws, by hand
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    order = torch.randperm(6)
    raw = module.model(lam * x + (1 - lam) * x[order])
    want = lam * module.criterion(raw, y) + (1 - lam) * module.criterion(raw, y[order])
    torch.testing.assert_close(got, want)
    assert 0 < lam < 1 and not torch.equal(order, torch.arange(6))
    # wrong settings stop the module before any training, as defectscope's own (one-line CLI) errors
    bad = [({"loss": {"mixup": -1.0}}, r"loss\.mixup must be a number >= 0"),
           ({"finetune": {"layer_decay": 0.0}}, r"finetune\.layer_decay must be a number in \(0, 1\]"),
           ({"finetune": {"backbone_lr_scale": "half"}}, r"finetune\.backbone_lr_scale must be a number"),
           ({"scheduler": {"interval": "batch"}}, r"scheduler\.interval must be 'step' or 'epoch'"),
           ({"finetune": {"backbone_lr_scale": float("nan")}}, r"finetune\.backbone_lr_scale must be"),
           ({"finetune": {"freeze_epochs": 1.5}}, r"finetune\.freeze_epochs must be a whole number"),
           ({"finetune": {"layer_decay": 0.8}}, r"optim\.optimizer\.lr must be given"),
           ({"optim": {"optimizer": {"lr": 0.1}}, "finetune": {"layer_decay": 2}}, r"finetune\.layer_decay must be"),
           ({"optim": {"optimizer": {"lr": 0}}}, r"optim\.optimizer\.lr must be a number > 0"),
           ({"loss": {"label_smoothing": 1.5}}, r"loss\.label_smoothing must be a number in \[0, 1\)"),
           ({"threshold": {"target_recall": 0}}, r"threshold\.target_recall must be a recall target in \(0, 1\]"),
           ({"ordinal": {"objective": "soft", "soft_beta": "x"}}, r"ordinal\.soft_beta must be a number > 0")]  # fmt: skip
    for setting, message in bad:
        with pytest.raises(TrainingConfigError, match=message):
            DefectClassifier(**{**common, **setting})


def test_evaluate_grades_with_the_checkpoints_cut_points(
    trained: dict[str, tuple[Path, dict[str, float]]], compose_train: Callable[..., Any], tmp_path: Path
) -> None:
    from defectscope.training.evaluate import evaluate

    ckpt, metrics = trained["expected"]
    cfg = compose_train(
        [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", "paths.launch_dir=.", "threads=1",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
        config_name="evaluate",
    )  # fmt: skip
    got = evaluate(cfg)
    for key in ("test/acc", "test/mae", "test/qwk", "test/off_by_more_than_one"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_ng_weight_adds_the_binary_cross_entropy_of_p_defect() -> None:
    """``loss.ng_weight``: the objective's loss plus w * BCE(P(defect), label is NG), P(defect) as the
    threshold reads it (the NG classes' summed probability)."""
    from defectscope.training.module import DefectClassifier
    from defectscope.training.ordinal import ng_cross_entropy

    stages = [{"channels": 4, "kernel": 3, "stride": 2}]
    common: dict[str, Any] = {
        "model": {"name": "gapcnn", "stages": stages}, "num_classes": 4, "in_chans": 1, "class_names": GRADES,
        "good_class": "g0", "optim": {"optimizer": {}}, "ordinal": {"objective": "soft"}, "ordered": True,
        "threshold": {"ng_classes": ">= g2"},
    }  # fmt: skip
    plain, weighted = DefectClassifier(**common), DefectClassifier(**common, loss={"ng_weight": 0.7})
    raw, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    p = raw.softmax(dim=1)
    p_ng = p[:, 2] + p[:, 3]  # ">= g2": g2 and g3 are NG, g1 is not
    is_ng = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    mask = torch.tensor([False, False, True, True])
    # the loss's P(defect) and NG labels are the ones the threshold cuts (runtime.decision's rule)
    torch.testing.assert_close(weighted.defect_probability(raw), p_ng)
    assert weighted.ng_mask.nonzero().flatten().tolist() == list(weighted.ng_indices) == [2, 3]
    bce = -(is_ng * p_ng.log() + (1 - is_ng) * (1 - p_ng).log()).mean()
    torch.testing.assert_close(ng_cross_entropy(raw.log_softmax(dim=1), y, mask), bce)
    torch.testing.assert_close(weighted.criterion(raw, y), plain.criterion(raw, y) + 0.7 * bce)
    # per-class weights weigh each image's term by its class, as they do the objective's
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    by_class = (w[y] * -(is_ng * p_ng.log() + (1 - is_ng) * (1 - p_ng).log())).sum() / w[y].sum()
    torch.testing.assert_close(ng_cross_entropy(raw.log_softmax(dim=1), y, mask, w), by_class)
    # CORN: K - 1 raw outputs whose class probabilities are products of sigmoids, not a softmax
    corn = {**common, "ordinal": {"objective": "corn"}}
    corn_plain, corn_weighted = DefectClassifier(**corn), DefectClassifier(**corn, loss={"ng_weight": 0.7})
    corn_raw = torch.randn(5, 3)
    s = torch.sigmoid(corn_raw)
    p_ng = s[:, 0] * s[:, 1]  # P(grade > g1) = P(grade >= g2)
    torch.testing.assert_close(corn_weighted.defect_probability(corn_raw), p_ng)
    corn_bce = -(is_ng * p_ng.log() + (1 - is_ng) * (1 - p_ng).log()).mean()
    torch.testing.assert_close(
        corn_weighted.criterion(corn_raw, y), corn_plain.criterion(corn_raw, y) + 0.7 * corn_bce
    )
    with pytest.raises(TrainingConfigError, match=r"loss\.ng_weight must be a number >= 0"):
        DefectClassifier(**common, loss={"ng_weight": -0.1})
