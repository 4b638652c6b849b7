"""The models the ELPV benchmark runs (``benchmarks/elpv.py``): an ONNX export through the line runtime or
a checkpoint through PyTorch, with the runtime's loader, normalisation and test-time views."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from defectscope.runtime.decision import is_ng
from defectscope.runtime.grading import Grading, expected_grade, grade_indices
from defectscope.runtime.image import LoaderConfig, load_image, normalize_batch
from defectscope.runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from defectscope.runtime.metadata import TTA_VIEWS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
from elpv_cells import BINARY, GRADES, Cell, EvalError


class Runner(Protocol):
    """What the evaluator needs from a model: its classes, its preprocessing and probabilities."""

    name: str
    class_names: list[str]
    loader_config: LoaderConfig
    mean: list[float]
    std: list[float]
    threads: int
    provider: str
    sha256: str | None
    info: dict[str, Any]

    def probs(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxRunner:
    """An exported model in the line-PC runtime (ONNX Runtime via :class:`Inspector`)."""

    def __init__(self, path: str, provider: str, threads: int | None) -> None:
        try:
            self.inspector = Inspector(path, provider=provider, threads=threads)
        except (ModelLoadError, MetadataError, ProviderError) as exc:
            raise EvalError(str(exc)) from None
        meta = self.inspector.metadata
        self.name = meta.model_name
        self.class_names = list(meta.class_names)
        self.loader_config = meta.loader
        self.mean, self.std = list(meta.mean), list(meta.std)
        self.threads = self.inspector.threads
        self.provider = self.inspector.provider
        self.sha256: str | None = self.inspector.sha256
        self.info: dict[str, Any] = {
            "threshold": meta.threshold,
            "good_class": meta.good_class,
            "ng_classes": list(meta.ng_classes),
            "grading": meta.grader,
            "graph_tta": meta.tta,
            "graph_tta_views": meta.tta_views,
        }

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.inspector.predict(batch, cam=False)["probs"], dtype=np.float64)


class TorchRunner:
    """A training checkpoint through PyTorch, with the same runtime loader and normalisation."""

    def __init__(self, path: str, threads: int | None) -> None:
        import torch

        from defectscope.checkpoint import CheckpointError, load_checkpoint
        from defectscope.export.grading import GradingExportError, checkpoint_grading
        from defectscope.models.corn import with_link
        from defectscope.runtime.decision import ng_class_names
        from defectscope.runtime.files import file_sha256

        self._torch = torch
        self.threads = threads or torch.get_num_threads()
        try:
            model, info = load_checkpoint(path)
            link, grading = checkpoint_grading(info)
        except (CheckpointError, GradingExportError) as exc:
            raise EvalError(f"{path}: {exc}") from None
        self.model = with_link(model, link).eval()
        self.name = str(info["model_name"])
        self.class_names = list(info["class_names"])
        self.loader_config = LoaderConfig(**info["loader"])
        self.mean, self.std = list(info["mean"]), list(info["std"])
        self.provider = "torch-cpu"
        self.sha256: str | None = file_sha256(path)
        self.info: dict[str, Any] = {
            "threshold": info["threshold"],
            "good_class": info["good_class"],
            "ng_classes": ng_class_names(self.class_names, info["good_class"], info.get("ng_classes")),
            "grading": Grading.from_doc(grading, len(self.class_names)) if grading else None,
            "val_paths": list(info.get("val_paths") or []),
        }

    def probs(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        before = torch.get_num_threads()  # restored: in-process callers keep their setting
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(np.ascontiguousarray(batch)))
                return logits.float().softmax(dim=1).double().numpy()
        finally:
            torch.set_num_threads(before)


def model_task(class_names: Sequence[str], source: str) -> str:
    """'4class' or 'binary' from the class names, which must be the ELPV source's names."""
    if sorted(class_names) == sorted(GRADES):
        return "4class"
    if sorted(class_names) == sorted(BINARY):
        return "binary"
    raise EvalError(
        f"{source}: class names {list(class_names)} are not an ELPV task; expected {list(GRADES)} "
        f"(data.source.task=4class) or {list(BINARY)} (data.source.task=binary)"
    )


def tta_views(batch: np.ndarray, tta: str) -> list[np.ndarray]:
    """The copies of a preprocessed NCHW batch whose probabilities are averaged: the runtime's table of
    test-time views (transposed first, then flipped)."""
    views = [batch]
    for transposed, axes in TTA_VIEWS[tta]:
        v = batch.transpose(0, 1, 3, 2) if transposed else batch
        views.append(np.flip(v, axes) if axes else v)
    return [np.ascontiguousarray(v) for v in views]


def _batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of equally shaped images, ``batch_size`` at a time (ELPV cells are all one size)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]


def predict_cells(
    runner: Runner, cells: Sequence[Cell], tta: str, batch_size: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Probabilities (cells x model classes) after TTA, and the timings of the pass."""
    t0 = time.perf_counter()
    arrays = [load_image(c.path, runner.loader_config) for c in cells]
    decode_s = time.perf_counter() - t0
    batches = list(_batches(arrays, batch_size))
    runner.probs(normalize_batch([arrays[i] for i in batches[0]], runner.mean, runner.std))  # warm-up
    probs = np.zeros((len(cells), len(runner.class_names)), dtype=np.float64)
    prep_s = compute_s = 0.0
    for idx in batches:
        t1 = time.perf_counter()
        views = tta_views(normalize_batch([arrays[i] for i in idx], runner.mean, runner.std), tta)
        t2 = time.perf_counter()
        probs[idx] = np.mean([runner.probs(v) for v in views], axis=0)
        t3 = time.perf_counter()
        prep_s += t2 - t1
        compute_s += t3 - t2
    n = len(cells)
    total = decode_s + prep_s + compute_s
    timings = {
        "images": n,
        "decode_s": decode_s,
        "preprocess_s": prep_s,
        "compute_s": compute_s,
        "compute_images_per_s": n / compute_s if compute_s > 0 else float("inf"),
        "end_to_end_images_per_s": n / total if total > 0 else float("inf"),
    }
    return probs, timings


def prediction_rows(
    cells: Sequence[Cell],
    probs: np.ndarray,
    class_names: Sequence[str],
    task: str,
    grading: Grading | None = None,
) -> list[dict[str, Any]]:
    """Per-cell rows (the auditable record every figure is computed from); with a grading rule the
    4-class answer is that rule's (and the row keeps the expected grade)."""
    rows = []
    col = {name: i for i, name in enumerate(class_names)}
    graded = grade_indices(probs, grading)
    expected = expected_grade(probs) if grading is not None else None
    for i, (c, p) in enumerate(zip(cells, probs)):
        pd = {name: float(p[col[name]]) for name in class_names}
        if task == "4class":
            pred_grade: str | None = class_names[int(graded[i])]
            p_def = pd["p67"] + pd["p100"]
        else:
            pred_grade = None
            p_def = pd["defective"]
        rows.append(
            {
                "path": c.path,
                "module_type": c.module_type,
                "grade": c.grade,
                "true_defective": c.defective,
                "probs": pd,
                "p_defective": p_def,
                "pred_defective": bool(is_ng(p_def, 0.5)),  # the protocol's cut, by the product's rule
                "pred_grade": pred_grade,
                **({"expected_grade": float(expected[i])} if expected is not None else {}),
            }
        )
    return rows
