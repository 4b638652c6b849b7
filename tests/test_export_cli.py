"""`defectscope export` as users run it: a zoo checkpoint in, a line-runner-ready model out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from defectscope.export.cli import main
from defectscope.runtime.inspector import Inspector
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata
from defectscope.synth import generate
from test_export_support import (
    build_preset,
    checkpoint_info,
    model_presets,
    randomize,
    sha256,
    write_checkpoint,
)

PRESETS = model_presets()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A resnet_small checkpoint (grayscale, 4 classes) whose val_paths are real synthetic images."""
    root = tmp_path_factory.mktemp("cli")
    data = generate(root / "data", 8, seed=3, channels=1, size_range=(48, 120))
    val = sorted(str(p) for p in data.rglob("*.png"))
    model = randomize(build_preset(PRESETS["resnet_small"], num_classes=4, in_chans=1), seed=2)
    info = checkpoint_info(
        "resnet", model.model_kwargs, class_names=["good", "scratch", "spot", "crack"], val_paths=val
    )
    path = write_checkpoint(root / "run" / "checkpoints" / "best.ckpt", model, info)
    return {"root": root, "path": path, "model": model, "info": info, "data": data}


@pytest.mark.slow
def test_export_cli_writes_a_model_the_line_runner_accepts(
    ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "model.onnx"
    rc = main([str(ckpt["path"]), "-o", str(out), "--threshold", "0.3", "--parity-images", "5"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for needle in (
        "export time:",
        "file size:",
        "max_abs_prob_fused",
        "max_abs_prob_unfused",
        f"wrote {out}",
    ):
        assert needle in text
    assert "folded 20 BatchNorm" in text

    insp = Inspector(out, provider="cpu")
    meta = insp.metadata
    assert meta.threshold == 0.3 and meta.model_name == "resnet" and meta.total_stride == 32
    assert meta.checkpoint_sha256 == sha256(ckpt["path"])
    assert meta.parity["real_images"] == 5
    assert meta.class_names == ["good", "scratch", "spot", "crack"] and insp.has_cam
    # the runner's own preprocessing + session give the PyTorch answer on a real image
    img = sorted(Path(ckpt["data"]).rglob("*.png"))[0]
    batch = insp.preprocess([img])
    got = insp.predict(batch)
    with torch.inference_mode():
        want = ckpt["model"](torch.from_numpy(batch)).softmax(1).numpy()
    assert float(np.abs(got["probs"] - want).max()) <= 1e-4
    assert got["cam"].shape[2:] == (-(-batch.shape[2] // 32), -(-batch.shape[3] // 32))


@pytest.mark.slow
def test_export_cli_builds_test_time_flips_into_the_graph(
    ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tta flips: the runner gets the mean logits of 4 flipped copies and says so in its report."""
    out = tmp_path / "flips.onnx"
    rc = main([str(ckpt["path"]), "-o", str(out), "--tta", "flips", "--parity-images", "4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fp32, test-time flips (4 views)" in text
    insp = Inspector(out, provider="cpu")
    assert insp.metadata.tta == "flips" and insp.metadata.parity["real_images"] == 4
    imgs = sorted(Path(ckpt["data"]).rglob("*.png"))
    batch = insp.preprocess([imgs[0]])
    got = insp.predict(batch)
    t = torch.from_numpy(batch)
    with torch.inference_mode():
        views = [t, t.flip(3), t.flip(2), t.flip((2, 3))]
        logits = torch.stack([ckpt["model"](v) for v in views]).mean(0)
    assert float(np.abs(got["probs"] - logits.softmax(1).numpy()).max()) <= 1e-4
    cam_mean = got["cam"].mean(axis=(2, 3))
    bias = ckpt["model"].head.bias.detach().numpy()
    assert float(np.abs(cam_mean - (logits.numpy() - bias)).max()) <= 1e-3

    from defectscope.runtime.cli import main as inspect_main

    report = tmp_path / "report.html"
    rc = inspect_main(
        [str(out), *map(str, imgs[:3]), "-o", str(tmp_path / "r.jsonl"), "--report", str(report)]
    )
    assert rc == 0, capsys.readouterr().err
    assert "test-time flips (4 views)" in report.read_text(encoding="utf-8")


def test_export_cli_rejects_bad_input_with_exit_2(
    ckpt: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "m.onnx")
    good = str(ckpt["path"])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    (empty / "good").mkdir(parents=True)
    (empty / "good" / "notes.txt").write_text("not an image")
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"\x89PNG truncated")
    listed = tmp_path / "list.txt"  # an --images list given as -o too: it was overwritten by the model
    listed.write_text("\n".join(str(p) for p in sorted(Path(ckpt["data"]).rglob("*.png"))[:4]) + "\n")
    listed_before = listed.read_bytes()
    unknown = write_checkpoint(
        tmp_path / "unknown.ckpt", ckpt["model"], dict(ckpt["info"], model_name="resnet9000")
    )
    pngs = sorted(Path(ckpt["data"]).rglob("*.png"))
    misnamed, goods = tmp_path / "misnamed", tmp_path / "goods"  # a labelled set with one folder misspelt
    for png in pngs:
        folder = {"crack": "Crack"}.get(png.parent.name, png.parent.name)
        (misnamed / folder).mkdir(parents=True, exist_ok=True)
        (misnamed / folder / png.name).write_bytes(png.read_bytes())
        if png.parent.name == "good":
            (goods / "good").mkdir(parents=True, exist_ok=True)
            (goods / "good" / png.name).write_bytes(png.read_bytes())
    manifest, image = tmp_path / "manifest.csv", tmp_path / "frame.png"  # outputs that are not models
    manifest.write_text("path,label\n")
    image.write_bytes(pngs[0].read_bytes())
    link = tmp_path / "current.onnx"
    link.symlink_to(tmp_path / "v1.onnx")
    cases = [
        ([str(tmp_path / "missing.ckpt"), "-o", out], "missing.ckpt: checkpoint file does not exist"),
        ([str(foreign), "-o", out], "not a defectscope checkpoint"),
        ([str(unknown), "-o", out], "unknown model 'resnet9000'"),
        ([good, "-o", out, "--opset", "17"], "opset >= 18"),
        # past the onnx package's newest opset the version converter failed, with a traceback, after the export
        (
            [good, "-o", out, "--opset", "99"],
            f"--opset 99 is newer than the installed onnx {onnx.__version__} knows",
        ),
        ([good, "-o", out, "--threshold", "1.5"], "--threshold: expected a number in [0, 1]"),
        (
            [good, "-o", out, "--target-recall", "1.2"],
            "--target-recall: expected a recall target in (0, 1], got '1.2'",
        ),
        (
            [good, "-o", out, "--target-recall", "0"],
            "--target-recall: expected a recall target in (0, 1], got '0'",
        ),
        ([good, "-o", out, "--tta", "rot90"], "argument --tta: invalid choice: 'rot90'"),
        ([good, "-o", out, "--parity-images", "-1"], "--parity-images: expected a whole number"),
        ([good, "-o", out, "--images", str(tmp_path / "none")], "--images"),
        # an explicit --images that lists no image fell back to random inputs with a warning
        ([good, "-o", out, "--images", str(empty)], "empty: lists no image file (expected .png, .jpg"),
        ([good, "-o", out, "--images", str(broken)], "none of its images could be read (first: "),
        (
            [good, "-o", out, "--register-name", "x"],
            "--register-name only makes sense together with --mlflow",
        ),
        ([good, "-o", str(tmp_path)], "is a directory"),
        ([good], "-o/--output"),
        # int8 settings without --int8 did nothing before; even a default value given is named
        ([good, "-o", out, "--fp32-convs", "1"], "--fp32-convs applies only with --int8 (an fp32 or fp16"),
        ([good, "-o", out, "--fp32-convs", "1"], "ignore it): add --int8, or drop it"),
        (
            [good, "-o", out, "--fp16", "--reduce-range", "--calibration", "minmax"],
            "--calibration, --reduce-range apply only with --int8",
        ),
        ([good, "-o", out, "--fp16", "--reduce-range"], "drop it (--fp16 excludes --int8)"),
        # refused before the export's work: the checkpoint itself (it was overwritten), a file as a folder
        ([good, "-o", good], "is a PyTorch checkpoint; it would be overwritten"),
        ([good, "-o", str(foreign)], "is a PyTorch checkpoint; it would be overwritten"),
        (
            [good, "-o", str(listed), "--images", str(listed)],
            "list.txt is the --images list; it would be overwritten",
        ),
        ([good, "-o", str(tmp_path / "foreign.ckpt" / "m.onnx")], "foreign.ckpt is a file, not a folder"),
        # a misspelt class folder made the set "unlabelled" and the threshold came silently from elsewhere
        (
            [good, "-o", out, "--images", str(misnamed)],
            "sub-folder(s) ['Crack'] are not among the model's classes",
        ),
        # no defect image: no threshold can reach the recall target (told after the export's work before)
        (
            [good, "-o", out, "--images", str(goods)],
            "is a defect (scratch, spot, crack), so no threshold reaches",
        ),
        # files that are not models were overwritten by one, a link replaced by a file
        (
            [good, "-o", str(manifest)],
            "manifest.csv is a file that is not an exported model; it would be over",
        ),
        ([good, "-o", str(image)], "frame.png is a PNG image; it would be overwritten"),
        ([good, "-o", str(link)], "current.onnx is a link to"),
        ([good, "-o", "-"], "-o -: the model is written to a file"),
    ]
    before = Path(good).read_bytes()
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert message in err, (argv, err)
    assert not Path(out).exists()
    assert Path(good).read_bytes() == before and listed.read_bytes() == listed_before
    assert manifest.read_text() == "path,label\n" and link.is_symlink()
    # unreadable --images are found before the work (they were found at parity, after the graph was
    # exported, and with --parity-images 0 only at the threshold step)
    rc = main([good, "-o", out, "--images", str(broken), "--parity-images", "0"])
    captured = capsys.readouterr()
    assert rc == 2 and "none of its images could be read (first: " in captured.err
    assert "fuse:" not in captured.out and not Path(out).exists()


@pytest.mark.slow
def test_export_console_command_in_a_subprocess(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """The real `defectscope export` command line (dispatcher -> export CLI), --no-cam --fp16 --images."""
    out = tmp_path / "m16.onnx"
    proc = subprocess.run(
        [
            sys.executable, "-m", "defectscope", "export", str(ckpt["path"]), "-o", str(out),
            "--no-cam", "--fp16", "--images", str(ckpt["data"]), "--parity-images", "3",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"wrote {out}" in proc.stdout and "fp16" in proc.stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_json(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.fp16 and meta.outputs == ["logits", "probs"] and meta.parity["real_images"] == 3
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]
    x = np.random.default_rng(0).standard_normal((4, 1, 96, 72)).astype(np.float32)
    with torch.inference_mode():
        want = ckpt["model"](torch.from_numpy(x)).softmax(1).numpy()
    assert float(np.abs(sess.run(["probs"], {"input": x})[0] - want).max()) <= 2e-2
