"""The ``defectscope`` entry a training checkpoint carries: what export, evaluate and a resume read back
through the one checkpoint reader (:mod:`defectscope.checkpoint`), as plain data only."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..data.datamodule import MAX_EXPORT_VAL_PATHS
from ..plain import to_plain

#: the entry's layout; the reader's SUPPORTED_FORMAT_VERSIONS must list it
FORMAT_VERSION = 1


def tracking_ids(trainer: Any) -> tuple[str | None, str | None]:
    """The MLflow run id and tracking URI of the first logger that has a run, else (None, None)."""
    for lg in trainer.loggers if trainer is not None else []:
        run_id = getattr(lg, "run_id", None)
        if run_id:
            return str(run_id), str(getattr(lg, "tracking_uri", None) or "") or None
    return None, None


def checkpoint_entry(module: Any) -> dict[str, Any]:
    """``checkpoint["defectscope"]`` of a :class:`~.module.DefectClassifier`, as contract #3 defines it."""
    run_id, uri = tracking_ids(module._trainer)
    kwargs = getattr(module.model, "model_kwargs", None)
    if kwargs is None:
        kwargs = {k: v for k, v in dict(module.hparams["model"]).items() if k != "name"}
        kwargs.update(num_classes=len(module.class_names), in_chans=int(module.hparams["in_chans"]))
    info = module.data_info
    return {
        "format_version": FORMAT_VERSION,
        "model_name": module.model_name,
        "model_kwargs": to_plain(dict(kwargs)),
        "class_names": list(module.class_names),
        "good_class": module.good_class,
        "ng_classes": list(module.ng_classes),
        "grading": module.grading_info(),
        "threshold": float(module.threshold),
        "target_recall": float(module.target_recall),
        "loader": to_plain(dict(info.get("loader") or {})),
        "mean": [float(v) for v in info.get("mean") or []],
        "std": [float(v) for v in info.get("std") or []],
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": uri,
        "val_paths": [str(p) for p in (info.get("val_paths") or [])][:MAX_EXPORT_VAL_PATHS],
        "val_labels": [str(c) for c in (info.get("val_labels") or [])][:MAX_EXPORT_VAL_PATHS],
        "warn_false_reject_rate": module.warn_false_reject_rate,
        "threshold_report": module.threshold_report,
        "package_version": __version__,
        "teacher_sha256": module.teacher_sha256,
    }
