"""Evaluating a new lot (issue 15, part 3): every image is scored, with the checkpoint (PyTorch) and
with the exported model (ONNX Runtime), and both paths report the same figures from one metric module."""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from defectscope.runtime.image import load_image, normalize_batch
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata
from trust_files import cli, genuine_checkpoint, write_images

pytestmark = pytest.mark.slow  # subprocesses of the CLI with torch and an export


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lot")
    ckpt = root / "model.ckpt"
    genuine_checkpoint(ckpt, write_images(root / "train-images"))
    lot = write_images(root / "lot", per_class=9)
    (lot / "crack" / "notes.txt").write_text("not an image")  # ignored, like training does
    model = root / "model.onnx"
    proc = cli(["export", str(ckpt), "-o", str(model), "--images", str(lot)], root, cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "ckpt": ckpt, "lot": lot, "model": model}


def test_pytorch_evaluate_scores_every_image_of_the_lot(
    setup: dict[str, Any], cli_env: dict[str, str]
) -> None:
    out = setup["root"] / "ev-torch"
    proc = cli(
        ["evaluate", f"ckpt_path={setup['ckpt']}", "data=folder", f"data.source.root={setup['lot']}",
         f"hydra.run.dir={out}", "threads=1", "threshold=0.5"],
        setup["root"], cli_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"scored 18 images (9 good, 9 defect): every image of folder {setup['lot']}" in proc.stdout
    assert "confusion matrix (rows = truth, columns = prediction):" in proc.stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["evaluation"]["n"] == 18 and (out / "plots" / "confusion.png").is_file()

    # test_fraction=1.0 on the checkpoint's own data config works too (everything is the test split)
    proc = cli(
        ["evaluate", f"ckpt_path={setup['ckpt']}", "data=folder", f"data.source.root={setup['lot']}",
         "data.split.test_fraction=1.0", "evaluate_on=test", f"hydra.run.dir={out}-2", "threads=1"],
        setup["root"], cli_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 18 images (9 good, 9 defect): the test split of folder" in proc.stdout
    torch_figures = doc["evaluation"]
    setup["torch"] = torch_figures


def test_onnx_evaluate_matches_an_independent_count(setup: dict[str, Any], cli_env: dict[str, str]) -> None:
    out = setup["root"] / "ev-onnx"
    proc = cli(
        ["evaluate", str(setup["model"]), str(setup["lot"]), "--threshold", "0.5", "--sweep", "--out", str(out)],
        setup["root"], cli_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"scored 18 images (9 good, 9 defect): every readable image of {setup['lot']}" in proc.stdout
    doc = json.loads((out / "evaluation.json").read_text())
    for name in ("confusion.png", "roc_pr.png", "predictions.csv"):
        assert (out / name).is_file()
    with open(out / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 18

    sess = ort.InferenceSession(str(setup["model"]), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_json(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    truth, pred, p_defect = [], [], []
    for path in sorted(setup["lot"].rglob("*.png")):
        probs = sess.run(
            ["probs"], {"input": normalize_batch([load_image(path, meta.loader)], meta.mean, meta.std)}
        )[0][0]
        truth.append(meta.class_names.index(path.parent.name))
        pred.append(int(np.argmax(probs)))
        p_defect.append(1.0 - probs[meta.class_names.index(meta.good_class)])
    t, p, s = np.array(truth), np.array(pred), np.array(p_defect)
    defect = t != meta.class_names.index(meta.good_class)
    assert doc["accuracy"] == pytest.approx(float((t == p).mean()))
    recalls = [float((p[t == k] == k).mean()) for k in range(len(meta.class_names))]
    assert doc["balanced_accuracy"] == pytest.approx(float(np.mean(recalls)))
    assert doc["ok_ng"]["escape_rate"] == pytest.approx(float((s[defect] < 0.5).mean()))
    assert doc["ok_ng"]["false_reject_rate"] == pytest.approx(float((s[~defect] >= 0.5).mean()))
    assert doc["tradeoff"] and doc["threshold_source"]["images"] == str(setup["lot"])

    if "torch" in setup:  # the PyTorch path on the same lot and threshold: the same figures
        assert setup["torch"]["confusion"] == doc["confusion"]
        for key in ("accuracy", "balanced_accuracy"):
            assert setup["torch"][key] == pytest.approx(doc[key])


def test_evaluate_usage_errors_are_one_line(setup: dict[str, Any], cli_env: dict[str, str]) -> None:
    proc = cli(["evaluate"], setup["root"], cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.count("\n") == 1
        and "ckpt_path" in proc.stderr
        and "defectscope evaluate ckpt_path=" in proc.stderr
    )
    flat = setup["root"] / "flat"
    flat.mkdir()
    proc = cli(["evaluate", str(setup["model"]), str(flat)], setup["root"], cli_env)
    assert proc.returncode == 2 and "expected labelled images" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = cli(["evaluate", str(setup["model"]), str(flat), "--threshold", "-0.1"], setup["root"], cli_env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--threshold: expected a number in [0, 1], got '-0.1'" in proc.stderr
    # a lot with a folder the model has no class for: adding it to data.source.classes, as advised, was then
    # refused for differing from the checkpoint's classes (helper report, 2026-12-07)
    import shutil

    odd = setup["root"] / "odd-lot"
    shutil.copytree(setup["lot"], odd)
    shutil.copytree(odd / "crack", odd / "dent")
    proc = cli(["evaluate", f"ckpt_path={setup['ckpt']}", "data=folder", f"data.source.root={odd}", "threads=1",
                f"hydra.run.dir={setup['root'] / 'ev-odd'}"], setup["root"], cli_env)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "class folders ['dent'] are not in the checkpoint's classes" in proc.stderr
    assert "the model has no such class: rename them to one of those, or move them out" in proc.stderr


def test_evaluate_runs_in_the_layout_the_checkpoint_was_trained_in(
    setup: dict[str, Any], cli_env: dict[str, str]
) -> None:
    """memory_format: null takes the run config's layout, and the printed layout is the weights' own;
    either layout gives the same figures; a bad value, given or read from the file, is one line naming its key."""
    import torch

    from trust_files import genuine_checkpoint, variant

    root = setup["root"]
    two = root / "two-stage.ckpt"  # its second kernel (8 x 4 x 3 x 3) is laid out differently in NHWC
    ckpt = genuine_checkpoint(two, root / "train-images", stages=2)

    def recorded(value: Any) -> Any:
        return lambda c: c["hyper_parameters"]["run_config"].update(memory_format=value)

    trained_cl = variant(ckpt, root / "cl.ckpt", recorded("channels_last"))
    common = ["data=folder", f"data.source.root={setup['lot']}", "threads=1", "threshold=0.5",
              "shift_consistency.copies=0"]  # fmt: skip
    figures = {}
    for name, path, extra, said in [
        ("plain", two, [], "contiguous (the default; the checkpoint records no layout)"),
        ("as-trained", trained_cl, [], "channels_last (as trained)"),
        ("given", two, ["memory_format=channels_last"], "channels_last (memory_format)"),
        ("given-back", trained_cl, ["memory_format=contiguous"], "contiguous (memory_format)"),
    ]:
        out = root / f"layout-{name}"
        proc = cli(["evaluate", f"ckpt_path={path}", f"hydra.run.dir={out}", *common, *extra], root, cli_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"memory format:   {said}" in proc.stdout
        figures[name] = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert figures["plain"]["n"] == 18
    for name in ("as-trained", "given", "given-back"):
        assert figures[name]["confusion"] == figures["plain"]["confusion"]
        assert figures[name]["auroc"] == pytest.approx(figures["plain"]["auroc"], abs=1e-6)
        assert figures[name]["ok_ng"] == figures["plain"]["ok_ng"]

    for bad in ("torch.preserve_format", ["channels_last"], {"_target_": "os.system"}):
        odd = variant(ckpt, root / "odd.ckpt", recorded(bad))
        proc = cli(["evaluate", f"ckpt_path={odd}", *common], root, cli_env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert (
            f"{odd}: hyper_parameters.run_config.memory_format must be one of channels_last, contiguous"
            in (proc.stderr)
        )
    proc = cli(
        ["evaluate", f"ckpt_path={root / 'absent.ckpt'}", "memory_format=nhwc", *common], root, cli_env
    )
    # refused before the (absent) checkpoint file is looked at
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "memory_format must be one of channels_last, contiguous, got 'nhwc'" in proc.stderr
    assert torch.load(two, weights_only=True)["hyper_parameters"]["run_config"].get("memory_format") is None
