"""Ordered grades at export: the checkpoint's link rebuilt, and the grading rule earned by the graph.

The checkpoint's ``grading`` entry (plain data written by training) names the objective's link
(``softmax`` or ``corn``, looked up in :data:`defectscope.models.corn.LINKS`) and the grading rule.  A
``cuts`` rule's cut points are chosen again on the exported graph itself, on the checkpoint's labelled
validation images, as the threshold is: fp16, int8 and test-time views all move the expected grade a
little, and what ships must be what that graph grades best.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from defectscope.checkpoint import recorded_grading
from defectscope.evaluation.labelled import Labelled
from defectscope.evaluation.scoring import score_paths
from defectscope.plain import PlainDataError
from defectscope.runtime.grading import (
    CHOSEN_ON_GRAPH,
    CUTS_FOR,
    KEPT_FROM_TRAINING,
    Grading,
    GradingError,
    checked_cuts_for,
    choose_cuts,
    expected_grade,
)
from defectscope.runtime.metadata import ModelMetadata

from .errors import ExportError
from .threshold import ort_predict

#: fewer labelled images than this: keep the cut points chosen in training
MIN_CUT_IMAGES = 20


class GradingExportError(ExportError):
    """The checkpoint's grading entry cannot be used (unknown link, bad rule or cut points)."""


def checkpoint_grading(info: dict[str, Any], cuts_for: str | None = None) -> tuple[str, dict[str, Any]]:
    """The link to rebuild the class model with, and the metadata's ``grading`` ({} = unordered).

    ``cuts_for`` (``export --cuts-for``) replaces what the cut points are chosen for on the graph; only a
    model graded by cut points has any.
    """
    try:
        link, grading = recorded_grading(info.get("grading"), len(info["class_names"]), "checkpoint grading")
    except PlainDataError as exc:
        raise GradingExportError(str(exc)) from None
    if grading is None:
        if cuts_for is not None:
            raise GradingExportError(
                "--cuts-for applies to ordered grades; this checkpoint's classes are unordered"
            )
        return link, {}
    if cuts_for is not None:
        if grading.rule != "cuts":
            raise GradingExportError(
                f"--cuts-for applies to models graded by cut points (ordinal.rule=cuts); this checkpoint's "
                f"rule is {grading.rule!r}"
            )
        try:
            grading = Grading("cuts", grading.cuts, checked_cuts_for(cuts_for, "--cuts-for"))
        except GradingError as exc:
            raise GradingExportError(str(exc)) from None
    return link, grading.to_doc()


def _check_enough_to_rechoose(cuts_for: str, n: int) -> None:
    if n < MIN_CUT_IMAGES:
        raise GradingExportError(
            f"--cuts-for {cuts_for} re-chooses the cut points on labelled images, but only {n} are here (the "
            f"threshold's: --images with labels, else the checkpoint's validation images; >= {MIN_CUT_IMAGES} "
            "needed); export where they are"
        )


def usable_images(images: Labelled | None, class_names: list[str]) -> Labelled | None:
    """The labelled images (the threshold's: a labelled ``--images`` or the checkpoint's validation
    images) that exist here and name one of the classes."""
    if images is None:
        return None
    kept = [(p, c) for p, c in zip(images.paths, images.labels) if c in class_names and os.path.isfile(p)]
    return Labelled([p for p, _ in kept], [c for _, c in kept], images.source)


def check_cut_images(grading: dict[str, Any], info: dict[str, Any], images: Labelled | None) -> None:
    """Before the export's work: cut points asked for anew (``--cuts-for`` other than training's) need
    at least :data:`MIN_CUT_IMAGES` labelled images to be chosen on."""
    if grading.get("rule") != "cuts":
        return
    trained = recorded_grading(info.get("grading"), len(info["class_names"]), "checkpoint grading")[1]
    cuts_for = str(grading.get("cuts_for", CUTS_FOR[0]))
    if trained is None or cuts_for != trained.cuts_for:
        usable = usable_images(images, list(info["class_names"]))
        _check_enough_to_rechoose(cuts_for, len(usable.paths) if usable else 0)


def earn_cuts(
    model_bytes: bytes,
    meta: ModelMetadata,
    info: dict[str, Any],
    images: Labelled | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The metadata fields ``grading`` (to ship) and ``grading_source`` (where it came from): for ``cuts``, the
    cut points chosen on the graph's own expected grades over ``images`` (the threshold's); no source for
    the other rules, which choose nothing. Fewer than :data:`MIN_CUT_IMAGES` readable images keep training's
    cut points, or refuse when ``--cuts-for`` asked for new ones."""
    if meta.grading.get("rule") != "cuts":
        return {"grading": dict(meta.grading), "grading_source": {}}
    cuts_for = str(meta.grading.get("cuts_for", CUTS_FOR[0]))
    usable = usable_images(images, list(meta.class_names))
    where = usable.source if usable is not None else "no labelled images"
    n = len(usable.paths) if usable is not None else 0
    scored = None
    if usable is not None and n >= MIN_CUT_IMAGES:
        scored = score_paths(ort_predict(model_bytes), usable.paths, meta.loader, meta.mean, meta.std)
        if problem := scored.not_finite(usable.paths, f"the {meta.variant} graph"):
            raise GradingExportError(problem)
    count = len(scored.index) if scored is not None else n  # readable when scored; else those at hand
    figures = {"cuts_for": cuts_for, "count": count, "images": where, "unreadable_images": n - count}
    if scored is None or usable is None or count < MIN_CUT_IMAGES:
        trained = recorded_grading(info.get("grading"), len(meta.class_names), "checkpoint grading")[1]
        if trained is None or cuts_for != trained.cuts_for:  # new cut points asked for: too few images
            _check_enough_to_rechoose(cuts_for, count)
        log(f"grading: {count} readable labelled images (< {MIN_CUT_IMAGES}); keeping training's cut points")
        return {"grading": dict(meta.grading), "grading_source": {"method": KEPT_FROM_TRAINING, **figures}}
    truth = np.array([meta.class_names.index(c) for c in usable.labels], dtype=np.int64)[scored.index]
    cuts = choose_cuts(expected_grade(scored.probs), truth, len(meta.class_names), cuts_for)
    log(f"grading: cut points {', '.join(f'{c:.3f}' for c in cuts)} chosen for {cuts_for} on the {meta.variant} "
        f"graph, {count} images of {where}")  # fmt: skip
    chosen = {"method": CHOSEN_ON_GRAPH, "variant": meta.variant, **figures}
    return {"grading": Grading("cuts", cuts, cuts_for).to_doc(), "grading_source": chosen}
