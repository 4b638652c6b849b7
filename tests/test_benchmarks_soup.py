"""benchmarks/weight_soup.py: the mean of checkpoints' weights, written as a checkpoint export accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defectscope.checkpoint import load_checkpoint
from trust_files import cli, genuine_checkpoint, variant, write_images

pytestmark = pytest.mark.slow  # torch in subprocesses and one export
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "weight_soup.py"


def _soup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--threads", "1"], capture_output=True, text=True, timeout=300
    )


def _tripled(ckpt: dict) -> None:
    for key, value in ckpt["state_dict"].items():
        if value.is_floating_point() and "running" not in key:
            ckpt["state_dict"][key] = value * 3


def test_soup_is_the_mean_and_exports(tmp_path: Path, cli_env: dict[str, str]) -> None:
    images = write_images(tmp_path / "images")
    a = tmp_path / "a.ckpt"
    first = genuine_checkpoint(a, images)
    b = variant(first, tmp_path / "b.ckpt", _tripled)
    proc = _soup(str(tmp_path / "soup.ckpt"), str(a), str(b))
    assert proc.returncode == 0, proc.stderr[-2000:]
    soup, info = load_checkpoint(tmp_path / "soup.ckpt")
    member, _ = load_checkpoint(a)
    for (name, mixed), (_, own) in zip(soup.state_dict().items(), member.state_dict().items()):
        if own.is_floating_point():
            factor = 1 if "running" in name else 2  # (w + 3w) / 2; statistics unchanged: (s + s) / 2
            torch.testing.assert_close(mixed, own * factor, msg=name)
    assert info["mlflow_run_id"] is None and info["class_names"] == ["crack", "good"]
    proc = cli(["export", str(tmp_path / "soup.ckpt"), "-o", str(tmp_path / "soup.onnx"), "--images", str(images)],
               tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # --bn-images: the running statistics are measured again on the training split (they were the members')
    proc = _soup(str(tmp_path / "bn.ckpt"), str(a), str(b), "--bn-images", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "re-estimated on" in proc.stdout
    bn, _ = load_checkpoint(tmp_path / "bn.ckpt")
    stats = [k for k in bn.state_dict() if k.endswith("running_var")]
    assert stats, "the test network has BatchNorm"
    for key in stats:
        assert not torch.allclose(bn.state_dict()[key], soup.state_dict()[key])
        assert torch.isfinite(bn.state_dict()[key]).all()


def test_members_of_another_task_are_refused(tmp_path: Path) -> None:
    """Each refusal is one line naming the file and what differs; nothing is written."""
    images = write_images(tmp_path / "images")
    a = tmp_path / "a.ckpt"
    first = genuine_checkpoint(a, images)
    other = variant(first, tmp_path / "other.ckpt", lambda c: c["defectscope"].update(class_names=["bad", "ok"],
                                                                                        good_class="ok"))  # fmt: skip
    wider = tmp_path / "wider.ckpt"
    genuine_checkpoint(wider, images, stages=2)
    cut = variant(first, tmp_path / "cut.ckpt", lambda c: c["defectscope"].update(ng_classes=["crack"]))
    cases = [
        ([str(a), str(other)], f"{other}: differs from the first member in class_names, good_class"),
        ([str(a), str(wider)], f"{wider}: differs from the first member in model_kwargs"),
        ([str(a), str(cut)], f"{cut}: differs from the first member in ng_classes"),
        ([str(a), str(tmp_path / "gone.ckpt")], "gone.ckpt: checkpoint file does not exist"),
        ([str(a), str(images / "good" / "good0.png")], "good0.png"),
        ([str(a), str(a), "--bn-images", "-1"], "--bn-images: expected a whole number >= 0, got -1"),
    ]
    for members, said in cases:
        proc = _soup(str(tmp_path / "soup.ckpt"), *members)
        assert proc.returncode != 0 and said in proc.stderr, (members, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / "soup.ckpt").exists()
