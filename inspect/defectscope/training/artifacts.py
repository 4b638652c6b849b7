"""Test-time plots and the threshold report on disk and in MLflow, and the summary printed when a command ends."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SUMMARY_KEYS = (
    "acc", "bal_acc", "f1_macro", "mae", "qwk", "auroc", "threshold", "escape_rate", "false_reject_rate",
)  # fmt: skip


def write_test_plots(outputs: Mapping[str, Any], dm: Any, plots_dir: Path) -> dict[str, str]:
    """confusion.png, roc_pr.png and misclassified.png from ``DefectClassifier.test_outputs``."""
    if not outputs:
        return {}
    from . import plots

    plots_dir.mkdir(parents=True, exist_ok=True)
    names = list(outputs["class_names"])
    thr = float(outputs["threshold"])
    written: dict[str, str] = {}
    try:
        written["confusion"] = plots.confusion_png(
            outputs["confmat"],
            names,
            outputs["scores"],
            outputs["is_defect"],
            thr,
            plots_dir / "confusion.png",
        )
        written["roc_pr"] = plots.roc_pr_png(
            outputs["scores"], outputs["is_defect"], thr, plots_dir / "roc_pr.png"
        )
        written["misclassified"] = plots.misclassified_png(
            outputs["misclassified"], names, list(dm.mean), list(dm.std), plots_dir / "misclassified.png"
        )
    except Exception as exc:  # a plot must never cost the run
        log.warning("could not draw the test plots: %s: %s", type(exc).__name__, exc)
    return written


def log_test_artifacts(tracker: Any, plots: Mapping[str, str]) -> None:
    for path in plots.values():
        tracker.log_artifact(path, "plots")


def summary_lines(
    command: str,
    *,
    seconds: float,
    metrics: Mapping[str, float],
    best: str | None = None,
    last: str | None = None,
    monitor: tuple[str, Any] | None = None,
    tracker: Any = None,
    resolved: Path | None = None,
    unsent: Path | None = None,
    checkpoint: str | None = None,
) -> list[str]:
    """Where everything is, in the words a user needs to find it again."""
    lines = ["", f"== defectscope {command} finished in {seconds:.1f} s"]
    if checkpoint:
        lines.append(f"checkpoint:      {checkpoint}")
    if best:
        score = ""
        if monitor is not None and monitor[1] is not None:
            score = f" ({monitor[0]} = {float(monitor[1]):.4f})"
        lines.append(f"best checkpoint: {Path(best).resolve()}{score}")
    if last:
        lines.append(f"last checkpoint: {Path(last).resolve()}")
    if tracker is not None and tracker.run_id:
        lines.append(
            f"MLflow run:      {tracker.run_id} in experiment '{tracker.experiment_name}' "
            f"(id {tracker.experiment_id}) at {tracker.tracking_uri}"
        )
        uri = str(tracker.tracking_uri)
        if uri.startswith(("http://", "https://")):
            view = f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        else:
            view = f"mlflow ui --backend-store-uri {uri}"
        lines.append(f"                 view it: {view}")
    elif command == "train":
        lines.append("MLflow run:      none (logger=none)")
    if unsent is not None:
        lines.append(f"MLflow unsent:   {unsent} (server unreachable; see docs/training.md)")
    if resolved is not None:
        lines.append(f"resolved config: {resolved.resolve()}")
    train = [
        f"{k}={metrics[f'train/{k}']:.4g}" for k in ("loss", "acc", "images_per_s") if f"train/{k}" in metrics
    ]
    if train:
        lines.append(f"{'train (last):':<17}{' '.join(train)}")
    # train: validation is the last epoch's, the test the best checkpoint's (whose threshold is reported below)
    labels = {"val": "val (last):", "test": "test (best):"} if command == "train" else {}
    for stage in ("val", "test"):
        shown = [f"{k}={metrics[f'{stage}/{k}']:.4f}" for k in _SUMMARY_KEYS if f"{stage}/{k}" in metrics]
        if shown:
            lines.append(f"{labels.get(stage, stage + ' metrics:'):<17}{' '.join(shown)}")
    shift = [f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if k.startswith("test/shift/")]
    if shift:
        lines.append(f"{'shift (test):':<17}{' '.join(shift)}")
    return lines


def report_threshold(best: str, out_dir: Path, tracker: Any) -> list[str]:
    """What the best checkpoint's threshold costs: threshold_report.txt, the log, MLflow; loud when too costly."""
    from defectscope.checkpoint import read_info
    from defectscope.evaluation.threshold import threshold_lines, too_costly

    report = read_info(best)[1].get("threshold_report")
    if not isinstance(report, dict):
        return ["threshold:       not chosen (no defect images in validation; threshold.default is used)"]
    lines = threshold_lines(
        report,
        "validation images, PyTorch fp32",
        "lower threshold.target_recall, set the threshold by hand (defectscope export --threshold T), "
        "or improve the model",
    )
    path = out_dir / "threshold_report.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    costly = too_costly(report)
    for line in lines:
        (log.warning if costly else log.info)("%s", line)
    if tracker is not None:
        tracker.log_artifact(path)
        warning = next((ln for ln in lines if ln.startswith("WARNING")), "none")  # only when too costly
        tracker.set_tags({"defectscope.threshold_warning": warning})
    return [f"threshold:       {lines[0]}", *lines[1:], f"threshold report: {path}"]
