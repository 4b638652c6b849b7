"""Labelled images for export (``--images``) and ``defectscope evaluate MODEL.onnx DATA``.

Labels come with the images in one of two ways (docs/training.md, "labelled images"):

* a folder of class folders named like the model's classes (``DATA/good/*.png``, ``DATA/crack/*.png``;
  ``DATA/<split>/<class>/`` is read too, all splits together);
* a CSV file with a header ``path,label`` (relative paths resolve against the CSV's folder).

Anything else (a flat folder, a text list of paths) carries no labels.  Listing goes through the
training data sources, which are torch-free, so the rules for folders and manifests exist once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.errors import SourceError
from ..data.records import SPLITS
from ..data.sources import csv_source, folder_source
from ..runtime.decision import is_defect_label

#: where evaluate's classes come from, for the data source's messages
MODEL_CLASSES = "the model's classes"


@dataclass(frozen=True)
class Labelled:
    """Image paths with the class name of each, and where they came from (for messages and metadata)."""

    paths: list[str]
    labels: list[str]
    source: str

    def is_defect(self, class_names: Sequence[str], ng_indices: Sequence[int]) -> np.ndarray:
        """Ground truth for recall and false-reject rates, by the verdict module's rule (:func:`is_defect_label`)."""
        truth = np.array([list(class_names).index(label) for label in self.labels], dtype=np.int64)
        return np.asarray(is_defect_label(truth, ng_indices), dtype=bool)


def is_manifest(path: Path) -> bool:
    """A CSV manifest (header ``path,label``) rather than a plain list of paths."""
    return path.is_file() and path.suffix.lower() == ".csv"


def has_labels(path: Path, class_names: Sequence[str]) -> bool:
    """A CSV, or a folder whose sub-folders are all class (or split) names; none of them such a name: a folder of
    unlabelled images. Some but not all is a labelled set with a misnamed folder, refused naming it (read as
    unlabelled, export chose its threshold elsewhere, saying so in one easily missed line)."""
    if path.is_file():
        return is_manifest(path)
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in subdirs if name not in set(class_names) | set(SPLITS)]
    named = sorted(set(subdirs) & set(class_names))  # split names alone (cam1/, test/) say nothing of labels
    if unknown and named:
        raise SourceError(
            f"{path}: sub-folder(s) {unknown} are not among the model's classes {list(class_names)} while "
            f"{named} are; rename them or move them out (unlabelled images: give a text file listing them)"
        )
    return bool(subdirs) and not unknown


def read_labelled(path: Path, class_names: Sequence[str], good_class: str) -> Labelled | None:
    """The labelled images at ``path`` in the model's class order, or None when ``path`` has no labels.

    Raises :class:`defectscope.data.sources.SourceError` for a labelled source that is wrong
    (a class folder or CSV label the model does not know, a CSV without ``path,label``).
    """
    if not has_labels(path, class_names):
        return None
    if path.is_file():
        data = csv_source(path, list(class_names), good_class, missing="keep", classes_key=MODEL_CLASSES)
    else:
        data = folder_source(path, list(class_names), good_class, classes_key=MODEL_CLASSES)
    names = data.class_names
    return Labelled([s.path for s in data.samples], [names[s.label] for s in data.samples], str(path))
