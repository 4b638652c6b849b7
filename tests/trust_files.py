"""Test helper: a small genuine checkpoint (with the run config training records) and hostile variants.

Attack payloads write marker files, so a test can assert that nothing ran: no marker, no output.
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from defectscope.data.rebuild import DATAMODULE_TARGET
from defectscope.models import create_model
from test_export_support import checkpoint_info, write_checkpoint


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m defectscope ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "defectscope", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


class Payload:
    """Unpickling this writes ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code from a file ran"))


def write_images(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("good", "crack")) -> Path:
    """``root/<class>/*.png``: 40x40 grey images, bright squares on the defects."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (40, 40), dtype=np.uint8)
            if c:
                img[10:20, 10:20] = 250
            Image.fromarray(img).save(root / name / f"{name}{i}.png")
    return root


def genuine_checkpoint(path: Path, data_root: Path, stages: int = 1) -> dict[str, Any]:
    """A tiny gapcnn checkpoint (``stages`` convolutions: 4, 8, ... channels) shaped like training's,
    whose run config reads ``data_root``."""
    torch.manual_seed(0)
    widths = [{"channels": 4 << i, "stride": 2} for i in range(stages)]
    model: Any = create_model("gapcnn", num_classes=2, in_chans=1, stages=widths)
    loader = {"channels": 1, "max_side": None, "min_size": 32, "size_multiple": 1, "max_pixels": 4_000_000}
    info = checkpoint_info(
        "gapcnn", model.model_kwargs, class_names=["crack", "good"], good_class="good", loader=loader
    )
    write_checkpoint(path, model, info)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"] = {
        "threshold": {"target_recall": 0.9},
        "run_config": {
            "data": {
                "_target_": DATAMODULE_TARGET,
                "source": {"kind": "folder", "root": str(data_root), "good_class": "good"},
                "split": {"val_fraction": 0.25, "test_fraction": 0.5, "seed": 1},
                "batch_size": 4,
                "num_workers": 0,
                "scan_workers": 1,
                "train_transform": {
                    "_target_": "albumentations.Compose",
                    "transforms": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}],
                },
                "eval_transform": None,
            }
        },
    }
    torch.save(ckpt, path)
    return ckpt


def variant(ckpt: dict[str, Any], path: Path, edit: Any) -> Path:
    """Save a deep copy of ``ckpt`` changed by ``edit(copy)``."""
    evil = copy.deepcopy(ckpt)
    edit(evil)
    torch.save(evil, path)
    return path


def data_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = ckpt["hyper_parameters"]["run_config"]["data"]
    return data


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's one error line (stderr may also hold logging lines; no traceback allowed)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln or ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]
