"""Parity gate: the exported graph must compute what the trained PyTorch model computes.

The ONNX model is run in ONNX Runtime (CPU, the line PC's fallback provider, default graph
optimisations) against *both* the BN-folded and the original PyTorch model, on random inputs of
several sizes and batch sizes (dynamic axes really work) and on real validation images loaded
through the runtime's own loader (preprocessing matches the line).  References use the model's own
API (``forward`` and ``cam``), so a mistake in the export wrapper cannot hide.  Probabilities are
the gate; logits and CAM are measured and reported too (CAM also gated, relative to its scale).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from defectscope.data.sources import SourceError, csv_source
from defectscope.evaluation.labelled import is_manifest
from defectscope.runtime.files import (
    IMAGE_EXTENSIONS,
    is_image_name,
    list_file_problem,
    read_path_list,
    walk_files,
)
from defectscope.runtime.image import ImageLoadError, LoaderConfig, load_image, normalize_batch
from defectscope.runtime.metadata import INPUT_NAME
from defectscope.runtime.providers import import_ort

from .errors import ExportError

FP32_PROB_TOL = 1e-4
FP16_PROB_TOL = 2e-2
FP32_CAM_REL_TOL = 1e-4
FP16_CAM_REL_TOL = 1e-1  # fp16 heat maps: ~5% of the peak on a 50-layer net is expected


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance; ``numbers`` holds the measurements."""

    def __init__(self, message: str, numbers: dict[str, Any]) -> None:
        super().__init__(message)
        self.numbers = numbers


@dataclass
class ParityInputs:
    """Batches to compare on, with a description for the report."""

    batches: list[np.ndarray] = field(default_factory=list)
    random_shapes: list[list[int]] = field(default_factory=list)
    real_images: int = 0
    real_skipped: list[str] = field(default_factory=list)


def random_sizes(min_side: int) -> list[tuple[int, int]]:
    """Three (H, W): the minimum, an odd non-square size and a larger landscape size."""
    s = max(int(min_side), 32)
    return [(s, s), (s + 5, 2 * s + 7), (2 * s, s + 16)]


def random_batches(channels: int, min_side: int, seed: int = 0) -> list[np.ndarray]:
    """Normal-distributed inputs (already in normalised space) at batch 1 and 4 for each size."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((n, channels, h, w)).astype(np.float32)
        for h, w in random_sizes(min_side)
        for n in (1, 4)
    ]


def list_images(source: str | os.PathLike[str]) -> list[str]:
    """Image files below a directory (recursive, sorted for reproducibility), the ``path`` column of a
    CSV manifest (the training data source's reader), or the paths listed in a text file
    (:func:`~defectscope.runtime.files.read_path_list`: relative lines are resolved against the list's
    folder, as `defectscope inspect @list.txt` does)."""
    d = Path(source)
    if d.is_file():
        if is_image_name(d.name):
            raise FileNotFoundError(
                f"{d}: --images takes a folder of images or a text file listing images, not one image"
            )
        problem = list_file_problem(d)
        if problem:
            raise FileNotFoundError(
                f"{d}: --images {problem} (a list of image paths, one per line, or a CSV)"
            )
        if is_manifest(d):  # labelled: the rows' paths (the threshold reads their labels too)
            try:
                return [s.path for s in csv_source(d, good_class=None, missing="keep").samples]
            except SourceError as exc:
                raise FileNotFoundError(str(exc)) from None
        try:
            return list(read_path_list(d))
        except OSError as exc:
            raise FileNotFoundError(f"{d}: --images list cannot be read: {exc}") from None
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d}: --images must be an existing directory of images or a text file listing image paths"
        )
    return sorted(p for p in walk_files(d) if is_image_name(p) and os.path.isfile(p))


def image_paths(info: dict[str, Any], images_dir: str | Path | None) -> list[str]:
    """Real images for the gates: ``images_dir`` (recursive) or the checkpoint's validation paths.

    ``--images`` is the user's explicit choice, so one that lists no image is an error, not a
    silent fall-back to random inputs; the checkpoint's paths may be empty (another machine)."""
    try:
        paths = list_images(images_dir) if images_dir is not None else list(info.get("val_paths") or [])
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    if images_dir is not None and not paths:
        raise ExportError(
            f"--images {images_dir}: lists no image file (expected {', '.join(IMAGE_EXTENSIONS)} files "
            "below the folder, or a text file listing them)"
        )
    return paths


def load_groups(
    paths: Iterable[str], cfg: LoaderConfig, limit: int
) -> tuple[list[list[np.ndarray]], int, list[str]]:
    """Up to ``limit`` images through the runtime loader (HWC uint8), grouped by shape.

    Unreadable or vanished files are skipped (the checkpoint may come from another machine) and
    returned as ``path: reason`` strings so the caller can say so.
    """
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    skipped: list[str] = []
    used = 0
    for p in paths:
        if used >= limit:
            break
        try:
            arr = load_image(p, cfg)
        except ImageLoadError as exc:
            skipped.append(str(exc))
            continue
        groups.setdefault(arr.shape, []).append(arr)
        used += 1
    return list(groups.values()), used, skipped


def real_batches(
    paths: Iterable[str],
    cfg: LoaderConfig,
    mean: Sequence[float],
    std: Sequence[float],
    limit: int,
) -> tuple[list[np.ndarray], int, list[str]]:
    """:func:`load_groups`, each group normalised into one NCHW float32 batch."""
    groups, used, skipped = load_groups(paths, cfg, limit)
    return [normalize_batch(imgs, mean, std) for imgs in groups], used, skipped


@torch.inference_mode()
def torch_outputs(model: nn.Module, x: np.ndarray, cam: bool) -> dict[str, np.ndarray]:
    """Reference outputs from the model's own API: ``forward`` -> logits/probs, ``cam``."""
    t = torch.from_numpy(x)
    logits = model(t).float()
    out = {"logits": logits.numpy(), "probs": torch.softmax(logits, 1).numpy()}
    if cam:
        out["cam"] = cast(Any, model).cam(t).float().numpy()
    return out


def ort_session(model_bytes: bytes) -> Any:
    ort = import_ort()

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def check_parity(
    model_bytes: bytes,
    references: dict[str, nn.Module],
    inputs: ParityInputs,
    *,
    fp16: bool = False,
    prob_tol: float | None = None,
) -> dict[str, Any]:
    """Compare ORT with every reference model on every batch; raise :class:`ParityError` if off.

    Returns flat, JSON-friendly numbers (stored in the model's metadata).
    """
    prob_tol = (FP16_PROB_TOL if fp16 else FP32_PROB_TOL) if prob_tol is None else prob_tol
    cam_tol = FP16_CAM_REL_TOL if fp16 else FP32_CAM_REL_TOL
    session = ort_session(model_bytes)
    names = [o.name for o in session.get_outputs()]
    with_cam = "cam" in names
    worst: dict[str, float] = {}
    for x in inputs.batches:
        got = dict(zip(names, session.run(names, {INPUT_NAME: x})))
        for ref_name, model in references.items():
            want = torch_outputs(model, x, with_cam)
            for key in want:
                if got[key].shape != want[key].shape:
                    raise ParityError(
                        f"parity: ONNX output {key!r} has shape {got[key].shape}, PyTorch "
                        f"({ref_name}) {want[key].shape} for input {x.shape}",
                        {},
                    )
                diff = float(np.max(np.abs(got[key].astype(np.float64) - want[key])))
                if not math.isfinite(diff):
                    diff = math.inf
                if key == "cam":
                    diff /= max(float(np.max(np.abs(want[key]))), 1e-6)
                label = {"probs": "max_abs_prob", "logits": "max_abs_logit", "cam": "max_rel_cam"}[key]
                k = f"{label}_{ref_name}"
                worst[k] = max(worst.get(k, 0.0), diff)
    numbers: dict[str, Any] = {
        **{k: float(f"{v:.3e}") if math.isfinite(v) else "inf" for k, v in sorted(worst.items())},
        "prob_tolerance": prob_tol,
        "cam_rel_tolerance": cam_tol,
        "random_shapes": inputs.random_shapes,
        "real_images": inputs.real_images,
        "provider": "CPUExecutionProvider",
    }
    bad = [
        f"{k} = {v:.3e} > {prob_tol:g}"
        for k, v in worst.items()
        if k.startswith("max_abs_prob") and not v <= prob_tol
    ] + [
        f"{k} = {v:.3e} > {cam_tol:g}"
        for k, v in worst.items()
        if k.startswith("max_rel_cam") and not v <= cam_tol
    ]
    if bad:
        raise ParityError(
            "parity gate failed: ONNX Runtime disagrees with PyTorch: " + "; ".join(bad), numbers
        )
    return numbers


def format_numbers(numbers: dict[str, Any]) -> str:
    """One line per measurement, for the CLI."""
    return "\n".join(f"  {k}: {v}" for k, v in numbers.items())
