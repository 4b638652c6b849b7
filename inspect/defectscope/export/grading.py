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
from defectscope.runtime.image import ImageLoadError, load_image, normalize_batch
from defectscope.runtime.metadata import INPUT_NAME, ModelMetadata

from .errors import ExportError

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
        recorded = grading.cuts_for
        try:
            grading = Grading("cuts", grading.cuts, checked_cuts_for(cuts_for, "--cuts-for"))
        except GradingError as exc:
            raise GradingExportError(str(exc)) from None
        if grading.cuts_for != recorded:  # refused before any export work
            _check_enough_to_rechoose(grading.cuts_for, len(labelled_paths(info, info["class_names"])))
    return link, grading.to_doc()


def _check_enough_to_rechoose(cuts_for: str, n: int) -> None:
    if n < MIN_CUT_IMAGES:
        raise GradingExportError(
            f"--cuts-for {cuts_for} re-chooses the cut points on the checkpoint's validation images, but "
            f"only {n} of them are here (>= {MIN_CUT_IMAGES} needed); export where they are"
        )


def labelled_paths(info: dict[str, Any], class_names: list[str]) -> list[tuple[str, int]]:
    """The checkpoint's validation images that exist here, with their class indices."""
    paths, labels = info.get("val_paths") or [], info.get("val_labels") or []
    return [
        (path, class_names.index(label))
        for path, label in zip(paths, labels)
        if label in class_names and os.path.isfile(path)
    ]


def labelled_batches(
    info: dict[str, Any], meta: ModelMetadata
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The checkpoint's validation images (that exist here) as normalised batches by shape, with labels."""
    groups: dict[tuple[int, ...], tuple[list[np.ndarray], list[int]]] = {}
    for path, label in labelled_paths(info, list(meta.class_names)):
        try:
            arr = load_image(path, meta.loader)
        except ImageLoadError:
            continue
        images, classes = groups.setdefault(arr.shape, ([], []))
        images.append(arr)
        classes.append(label)
    batches = [normalize_batch(imgs, meta.mean, meta.std) for imgs, _ in groups.values()]
    targets = [np.asarray(cls, dtype=np.int64) for _, cls in groups.values()]
    return batches, targets, sum(len(t) for t in targets)


def earn_cuts(
    model_bytes: bytes, meta: ModelMetadata, info: dict[str, Any], log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``grading`` to ship and where it came from (metadata ``grading_source``): for ``cuts``, the
    cut points chosen on the graph's own expected grades; {} for the other rules, which choose nothing."""
    if meta.grading.get("rule") != "cuts":
        return dict(meta.grading), {}
    cuts_for = str(meta.grading.get("cuts_for", CUTS_FOR[0]))
    batches, targets, n = labelled_batches(info, meta)
    if n < MIN_CUT_IMAGES:
        trained = recorded_grading(info.get("grading"), len(meta.class_names), "checkpoint grading")[1]
        if trained is None or cuts_for != trained.cuts_for:  # new cut points asked for: too few images
            _check_enough_to_rechoose(cuts_for, n)
        log(
            f"grading: {n} labelled validation images here (< {MIN_CUT_IMAGES}); keeping training's cut points"
        )
        return dict(meta.grading), {"method": KEPT_FROM_TRAINING, "cuts_for": cuts_for, "images": n}
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected = [
        expected_grade(session.run(["probs"], {INPUT_NAME: x[i : i + 16]})[0])
        for x in batches
        for i in range(0, len(x), 16)
    ]
    cuts = choose_cuts(np.concatenate(expected), np.concatenate(targets), len(meta.class_names), cuts_for)
    log(
        f"grading: cut points {', '.join(f'{c:.3f}' for c in cuts)} chosen for {cuts_for} on {n} validation "
        "images (this graph)"
    )
    source = {"method": CHOSEN_ON_GRAPH, "variant": meta.variant, "cuts_for": cuts_for, "images": n}
    return Grading("cuts", cuts, cuts_for).to_doc(), source
