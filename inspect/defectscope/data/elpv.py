"""The ELPV solar-cell dataset, read from the installed ``elpv-dataset`` package (never downloaded here)."""

from __future__ import annotations

from pathlib import Path

from ..runtime.files import os_error_reason
from .errors import SourceError
from .records import Sample, SourceData

ELPV_TASKS: dict[str, tuple[list[str], str]] = {
    "binary": (["functional", "defective"], "functional"),
    "4class": (["p0", "p33", "p67", "p100"], "p0"),
}
_ELPV_GRADES = ("p0", "p33", "p67", "p100")


def elpv_data_dir() -> Path:
    """Folder holding ``labels.csv`` and ``images/`` inside the installed ``elpv_dataset`` package."""
    try:
        import elpv_dataset
    except ImportError:
        raise SourceError(
            "data.source.kind=elpv needs the ELPV solar-cell dataset package: pip install elpv-dataset "
            "(the 'elpv' extra)"
        ) from None
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def elpv_source(task: str = "binary") -> SourceData:
    """ELPV cells from the package's ``labels.csv`` (path, defect probability, module type).

    Only file paths are listed (the package's loader would read all 2,624 images into memory).
    ``binary``: defective when p >= 0.5.  ``4class``: p0/p33/p67/p100.  Splits are stratified on
    the 4-grade label either way; the module type (mono/poly) is kept as ``meta["module_type"]``.
    """
    if task not in ELPV_TASKS:
        raise SourceError(f"data.source.task must be one of {', '.join(ELPV_TASKS)}, got {task!r}")
    names, good = ELPV_TASKS[task]
    data_dir = elpv_data_dir()
    labels = data_dir / "labels.csv"
    samples: list[Sample] = []
    try:
        text = labels.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(f"cannot read the ELPV label file {labels}: {os_error_reason(exc)}") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            rel, prob_text, module_type = parts
            prob = float(prob_text)
        except ValueError:
            raise SourceError(
                f"{labels}: line {line_no} is not 'path probability type': {line.strip()!r}"
            ) from None
        grade = _ELPV_GRADES[min(3, max(0, round(prob * 3)))]
        label = (1 if prob >= 0.5 else 0) if task == "binary" else _ELPV_GRADES.index(grade)
        samples.append(Sample(str(data_dir / rel), label, None, grade, {"module_type": module_type}))
    return SourceData(
        f"elpv ({task}) {data_dir}", samples, names, good, split_defaults={"test_fraction": 0.25, "seed": 42}
    )
