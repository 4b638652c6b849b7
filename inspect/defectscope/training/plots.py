"""PNG plots logged with every run: confusion matrices, ROC/PR of defect vs. good, misclassified images.

matplotlib's object API (``Figure``) renders off-screen with the Agg canvas: no pyplot, no GUI
backend, no global state, so plotting is safe in training processes and on headless servers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from PIL import Image

from defectscope.runtime.decision import is_ng

from ..evaluation.metrics import roc_pr_curves

_P = ParamSpec("_P")
_R = TypeVar("_R")


def plain_text(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Draw with math text off: class, file and study names are the user's text, and a '$' in one is not TeX
    (matplotlib would parse it, and fail on an unbalanced or unknown command)."""

    @functools.wraps(draw)
    def drawn(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def _save(fig: Figure, path: str | os.PathLike[str]) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


def _matrix(ax: Any, counts: np.ndarray, labels: Sequence[str], title: str) -> None:
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.6 else "black",
                fontsize=8,
            )


@plain_text
def confusion_png(
    confmat: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray,
    is_defect: np.ndarray,
    threshold: float,
    path: str | os.PathLike[str],
) -> str:
    """Multi-class confusion (argmax, or the grading rule) next to the OK/NG confusion at the threshold."""
    ng = is_ng(scores, threshold)
    okng = np.array(
        [
            [np.sum(~is_defect.astype(bool) & ~ng), np.sum(~is_defect.astype(bool) & ng)],
            [np.sum(is_defect.astype(bool) & ~ng), np.sum(is_defect.astype(bool) & ng)],
        ]
    )
    fig = Figure(figsize=(4 + 0.6 * len(class_names) + 3.5, 4.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(class_names)), 2]})
    _matrix(ax1, np.asarray(confmat), list(class_names), "classes (as graded)")
    _matrix(ax2, okng, ["OK", "NG"], f"OK/NG at P(defect) >= {threshold:.3g}")
    fig.tight_layout()
    return _save(fig, path)


@plain_text
def roc_pr_png(
    scores: np.ndarray, is_defect: np.ndarray, threshold: float, path: str | os.PathLike[str]
) -> str:
    """ROC and PR curves of P(defect), with the operating point at ``threshold`` marked."""
    c = roc_pr_curves(scores, is_defect)
    y = is_defect.astype(bool)
    ng = is_ng(scores, threshold)
    tpr = float(ng[y].mean()) if y.any() else 0.0
    fpr = float(ng[~y].mean()) if (~y).any() else 0.0
    prec = float(y[ng].mean()) if ng.any() else 1.0
    fig = Figure(figsize=(9, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(c["fpr"], c["tpr"], lw=1.5)
    ax1.plot([0, 1], [0, 1], ls=":", c="grey")
    ax1.plot([fpr], [tpr], "o", c="red", label=f"threshold {threshold:.3g}")
    ax1.set(xlabel="false-reject rate (good called NG)", ylabel="defect recall", title="ROC: defect vs. good")
    ax1.legend(loc="lower right")
    ax2.plot(c["recall"], c["precision"], lw=1.5)
    ax2.plot([tpr], [prec], "o", c="red", label=f"threshold {threshold:.3g}")
    ax2.set(xlabel="defect recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    ax2.legend(loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def _display_image(chw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``(x/255 - mean)/std``: CHW float -> HWC in [0, 1] (grey for one channel, RGB for three)."""
    c = chw.shape[0]
    m = np.asarray(list(mean) or [0.0] * c, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(list(std) or [1.0] * c, dtype=np.float32).reshape(-1, 1, 1)
    img = np.clip(chw * s + m, 0.0, 1.0).transpose(1, 2, 0)
    if c == 1:
        return np.repeat(img, 3, axis=2)
    return img[:, :, :3] if c >= 3 else np.repeat(img[:, :, :1], 3, axis=2)


def _upsample(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    norm = (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)
    return np.asarray(
        Image.fromarray(norm.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )


@plain_text
def misclassified_png(
    items: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    path: str | os.PathLike[str],
    cols: int = 4,
) -> str:
    """Grid of misclassified images, each with the CAM of the predicted class overlaid."""
    n = max(1, len(items))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    jet = colormaps["jet"]
    for ax in axes:
        ax.axis("off")
    if not items:
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for ax, item in zip(axes, items):
        img = _display_image(np.asarray(item["image"]), mean, std)
        h, w = img.shape[:2]
        heat = jet(_upsample(np.asarray(item["cam"]), w, h))[:, :, :3]
        ax.imshow(0.55 * img + 0.45 * heat)
        name = os.path.basename(item.get("path", ""))
        ax.set_title(
            f"{class_names[item['label']]} -> {class_names[item['pred']]}\n"
            f"P(defect)={item['p_defect']:.2f} {name[:24]}",
            fontsize=8,
        )
    fig.tight_layout()
    return _save(fig, path)
