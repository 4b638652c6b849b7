"""The shipped threshold is earned by the shipped graph: export chooses it again on what it writes.

Training chose a threshold on the PyTorch fp32 scores of its validation images; fp16, int8 and
test-time flips move those scores.  So export runs the final graph bytes in an ONNX Runtime CPU
session, through the runtime's loader, over labelled validation images (the checkpoint's
``val_paths``/``val_labels``, or ``--images`` with labels), and picks the threshold for the
checkpoint's recall target with the same rule as training (:mod:`defectscope.evaluation`).
``--threshold`` skips this and is recorded as set by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.sources import SourceError
from defectscope.evaluation.labelled import Labelled, read_labelled
from defectscope.evaluation.metrics import operating_point
from defectscope.evaluation.scoring import score_paths
from defectscope.evaluation.threshold import DEFAULT_WARN_FALSE_REJECT_RATE, threshold_report, too_costly
from defectscope.runtime.decision import DEFAULT_TARGET_RECALL, defect_probability, ng_class_names
from defectscope.runtime.metadata import INPUT_NAME, ModelMetadata
from defectscope.runtime.providers import import_ort

from .errors import ExportError

#: fewer defect images than this and the recall reached moves in steps of more than 5 pp
MIN_DEFECT_IMAGES = 20
HOW_TO_CHANGE = "re-export with --target-recall R or --threshold T, or improve the model"


class ThresholdError(ExportError):
    """The threshold cannot be re-derived as asked (no labelled images, no defect images)."""


@dataclass(frozen=True)
class ThresholdPlan:
    """Decided before any export work: re-derive on ``images`` for ``target_recall``, or take ``by_hand``.
    ``images`` are also what a graded model's cut points are chosen on (by hand too: None = there are none)."""

    target_recall: float
    warn_false_reject_rate: float
    training_threshold: float
    images: Labelled | None = None
    by_hand: float | None = None


def checkpoint_images(info: dict[str, Any]) -> Labelled | None:
    paths, labels = list(info.get("val_paths") or []), info.get("val_labels")
    if not paths or not labels:
        return None
    return Labelled(paths, list(labels), f"the checkpoint's {len(paths)} validation images")


def labelled_images(
    info: dict[str, Any], images: str | Path | None, log: Callable[[str], None], *, by_hand: bool = False
) -> Labelled | None:
    """The labelled images the exported graph earns its threshold and cut points on: ``--images`` when it
    carries labels, else the checkpoint's validation images; None when there are neither."""
    names, good = list(info["class_names"]), str(info["good_class"])
    if images is not None and not Path(images).exists():
        raise ThresholdError(f"--images {images}: not an existing folder or file")
    try:
        labelled = read_labelled(Path(images), names, good) if images is not None else None
    except SourceError as exc:  # its message names the file or folder already
        text = str(exc)
        raise ThresholdError(
            f"--images {text}" if text.startswith(str(Path(str(images)))) else f"--images {images}: {text}"
        ) from None
    if images is not None and labelled is None and not by_hand:
        log(f"threshold: --images {images} has no labels; re-deriving on the checkpoint's validation images")
    return labelled or checkpoint_images(info)


def plan_threshold(
    info: dict[str, Any],
    images: str | Path | None,
    *,
    target_recall: float | None,
    by_hand: float | None,
    log: Callable[[str], None],
) -> ThresholdPlan:
    """Choose the labelled images up front (:func:`labelled_images`); with a threshold set by hand they
    still serve the cut points of graded models. ``target_recall`` None = the checkpoint's."""
    if target_recall is None:
        target_recall = float(info.get("target_recall") or DEFAULT_TARGET_RECALL)
    warn = float(info.get("warn_false_reject_rate") or DEFAULT_WARN_FALSE_REJECT_RATE)
    trained = float(info["threshold"])
    labelled = labelled_images(info, images, log, by_hand=by_hand is not None)
    if by_hand is not None:
        return ThresholdPlan(target_recall, warn, trained, images=labelled, by_hand=by_hand)
    names, good = list(info["class_names"]), str(info["good_class"])
    if labelled is None:
        raise ThresholdError(
            "the threshold must be chosen again on the exported graph, but the checkpoint records no labelled "
            "validation images (val_paths/val_labels; written before defectscope recorded them?): pass "
            "--images DIR|CSV with labels (a folder of class folders, or a CSV with header path,label), or "
            "--threshold T to set it by hand"
        )
    present = [os.path.isfile(p) for p in labelled.paths]
    if not any(present):
        raise ThresholdError(
            f"none of {labelled.source} exists here (first: {labelled.paths[0]}); pass --images DIR|CSV with "
            "labelled images, or --threshold T"
        )
    kept = [(p, c) for (p, c), ok in zip(zip(labelled.paths, labelled.labels), present) if ok]
    if len(kept) < len(labelled.paths):
        first = next(p for p, ok in zip(labelled.paths, present) if not ok)
        log(
            f"threshold: {len(labelled.paths) - len(kept)} of {labelled.source} do not exist here (first: "
            f"{first}); using the rest"
        )
    chosen = Labelled([p for p, _ in kept], [c for _, c in kept], labelled.source)
    ng = ng_class_names(names, good, info.get("ng_classes") or None)
    if not chosen.is_defect(names, [names.index(c) for c in ng]).any():  # before the export's work, not after
        raise ThresholdError(
            f"none of the {len(kept)} images of {labelled.source} is a defect ({', '.join(ng)}), so no threshold "
            f"reaches recall {target_recall:g}; pass --images DIR|CSV with defect images, or --threshold T"
        )
    return ThresholdPlan(target_recall, warn, trained, images=chosen)


def ort_predict(model_bytes: bytes) -> Callable[[np.ndarray], np.ndarray]:
    ort = import_ort()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["probs"], {INPUT_NAME: batch})[0]


def earn_threshold(model_bytes: bytes, meta: ModelMetadata, plan: ThresholdPlan) -> dict[str, Any]:
    """The metadata fields the final graph earns: ``threshold`` and its ``threshold_source``."""
    source = rederive(model_bytes, meta, plan)
    return {"threshold": float(source["threshold"]), "threshold_source": source}


def rederive(model_bytes: bytes, meta: ModelMetadata, plan: ThresholdPlan) -> dict[str, Any]:
    """Score the labelled images with the final graph and choose the threshold: the provenance record."""
    if plan.by_hand is not None:
        return {
            "method": "set by hand",
            "threshold": plan.by_hand,
            "variant": meta.variant,
            "training_threshold": plan.training_threshold,
        }
    images = plan.images
    assert images is not None
    scored = score_paths(ort_predict(model_bytes), images.paths, meta.loader, meta.mean, meta.std)
    if problem := scored.not_finite(images.paths, f"the {meta.variant} graph"):
        raise ThresholdError(problem)
    defect = images.is_defect(meta.class_names, meta.ng_indices)[scored.index]
    p_defect = defect_probability(scored.probs, meta.ng_indices) if len(scored.index) else np.zeros(0)
    report = threshold_report(p_defect, defect, plan.target_recall, plan.warn_false_reject_rate)
    if report is None:
        raise ThresholdError(
            f"none of the {len(scored.index)} readable images of {images.source} is a defect, so no threshold "
            f"reaches recall {plan.target_recall:g}; pass --images DIR|CSV with defect images, or --threshold T"
        )
    return {
        "method": "recall target",
        **report,
        "too_costly": too_costly(report),
        "variant": meta.variant,
        "images": images.source,
        "unreadable_images": len(scored.failed),
        "training_threshold": plan.training_threshold,
        # what training's threshold would have given on this graph: how far the variant moved the scores
        "at_training_threshold": {
            k: v
            for k, v in operating_point(p_defect, defect, plan.training_threshold).items()
            if k in ("recall", "false_reject_rate")
        },
    }
