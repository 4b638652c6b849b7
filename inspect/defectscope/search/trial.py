"""One trial: sample, train with the same ``train()`` as ``defectscope train``, export, measure, log.

Order: the architecture is built and (when the latency budget or early stopping needs it) exported
and timed *before* training, so an architecture over the budget never trains. After training the
best checkpoint is exported through ``defectscope export``'s own function, and the latency objective
is measured on that file through the runtime. The trial is a nested MLflow run under the study's
parent run (``mlflow.parentRunId``), holding the full config as params, the checkpoint, the ONNX file
and the objectives.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from .errors import SearchConfigError
from .measure import Latency, export_untrained, input_size, measure_latency, model_cost
from .preflight import DataFacts, build_model, loader_config, untrained_info
from .settings import LATENCY, SearchSettings
from .space import Param, apply_values, suggest
from .stopping import TrialMonitor
from .workers import PROCESS_ATTR, process_mark

log = logging.getLogger(__name__)
WORKER_ATTR = "worker"


@dataclass
class SearchContext:
    cfg: Any  # the composed config, search.* included
    settings: SearchSettings
    params: list[Param]
    facts: DataFacts
    run_dir: Path
    parent_run_id: str | None
    base_overrides: list[str]
    #: this command's mark on its trials: what it may re-queue or remove is its own, never another worker's
    worker: str = field(default_factory=lambda: uuid.uuid4().hex)


def trial_config(ctx: SearchContext, values: dict[str, Any], number: int) -> Any:
    """The training config of one trial: the composed config with the sampled values and its own folder."""
    from omegaconf import open_dict

    s = ctx.settings
    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        del cfg["search"]
        apply_values(cfg, values)
        cfg.paths.output_dir = str(ctx.run_dir / "trials" / f"{number:04d}")
        cfg.callbacks.model_checkpoint.monitor = s.metric  # best.ckpt = best by the objective
        cfg.callbacks.model_checkpoint.mode = "max" if s.direction == "maximize" else "min"
        cfg.test = s.test_trials
        if cfg.get("logger") and "_target_" in cfg.logger:
            tags = dict(cfg.logger.get("tags") or {})
            tags.update({"defectscope.study": s.study_name, "defectscope.trial": str(number)})
            if ctx.parent_run_id:
                tags["mlflow.parentRunId"] = ctx.parent_run_id  # makes it a nested run in MLflow
            cfg.logger.tags = tags
            cfg.logger.run_name = f"{s.study_name}-trial-{number}"
    return cfg


def peers_of(study: optuna.Study) -> Any:
    """Finished trials' (latency, curve) pairs, read fresh from the storage (other workers' included)."""

    def read() -> list[tuple[float, list[list[float]]]]:
        out = []
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            lat, curve = t.user_attrs.get(LATENCY), t.user_attrs.get("curve")
            if lat is not None and curve:
                out.append((float(lat), curve))
        return out

    return read


def needs_early_latency(s: SearchSettings, max_epochs: int) -> bool:
    """Latency before training is needed for the budget and for early stopping at a rung."""
    return s.max_latency_ms is not None or any(r < max_epochs for r in s.stopping.rungs)


def _measure_untrained(
    trial: optuna.Trial, ctx: SearchContext, out_dir: Path, values: dict[str, Any], model: Any
) -> float:
    """Latency of the architecture before training; over the budget, the trial ends here (pruned)."""
    s = ctx.settings
    loader = loader_config(ctx.cfg, values)
    h, w = input_size(ctx.facts.native, loader)
    path = export_untrained(
        model, untrained_info(ctx.cfg, ctx.facts, loader, values), out_dir / "untrained.onnx"
    )
    lat = measure_latency(path, h, w, s.latency)
    trial.set_user_attr("latency_ms_untrained", lat.ms_per_image)
    if s.max_latency_ms is not None:
        trial.set_constraint(LATENCY, lat.ms_per_image - s.max_latency_ms)
        if lat.ms_per_image > s.max_latency_ms:
            raise optuna.TrialPruned(
                f"not trained: {lat.ms_per_image:.3f} ms per image is over search.max_latency_ms={s.max_latency_ms:g}"
            )
    return lat.ms_per_image


def _check_feasible(trial: optuna.Trial, ctx: SearchContext, values: dict[str, Any]) -> tuple[Any, int, int]:
    """Build the sampled architecture; a combination that cannot work is recorded as infeasible."""
    try:
        model = build_model(ctx.cfg, values, len(ctx.facts.class_names))
        h, w = input_size(ctx.facts.native, loader_config(ctx.cfg, values))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        trial.set_user_attr("infeasible", reason)
        trial.set_constraint("feasible", 1.0)  # teaches the sampler to avoid the region
        raise optuna.TrialPruned(f"infeasible: {reason}") from None
    return model, h, w


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> list[float]:
    """One trial; an error is recorded on the trial (``error``) before Optuna marks it failed."""
    trial.set_user_attr(WORKER_ATTR, ctx.worker)
    trial.set_user_attr(PROCESS_ATTR, process_mark())  # a rerun fails it at once if this process is killed
    try:
        return _run_trial(trial, ctx)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM: queued again by the search (requeue_interrupted)
        trial.set_user_attr("interrupted", True)
        raise
    except Exception as exc:
        if not isinstance(exc, optuna.TrialPruned):
            trial.set_user_attr(
                "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        if isinstance(exc, SearchConfigError):  # a setting no trial can meet: the search stops here
            trial.set_user_attr("config_error", str(exc))
        raise


def _run_trial(trial: optuna.Trial, ctx: SearchContext) -> list[float]:
    from defectscope.training.callbacks import UnloggedMetricError
    from defectscope.training.train import train

    s = ctx.settings
    values = suggest(trial, ctx.params)
    trial.set_user_attr("base_overrides", ctx.base_overrides)
    cfg = trial_config(ctx, values, trial.number)
    trial.set_user_attr("run_dir", str(cfg.paths.output_dir))
    model, h, w = _check_feasible(trial, ctx, values)
    cost = model_cost(model, ctx.facts.channels, h, w)
    for key, value in cost.items():
        trial.set_user_attr(key, value)
    early = None
    if needs_early_latency(s, int(cfg.trainer.max_epochs)):
        early = _measure_untrained(trial, ctx, Path(cfg.paths.output_dir), values, model)
    monitor = TrialMonitor(
        s.metric,
        maximize=s.direction == "maximize",
        latency_ms=early,
        rungs=s.stopping.rungs,
        min_delta=s.stopping.min_delta,
        peers=peers_of(trial.study),
    )
    try:
        train(
            cfg, extra_callbacks=[monitor], announce_stop=False
        )  # the search says what becomes of the trial
    except SystemExit:
        if monitor.interrupted:  # Lightning turns Ctrl-C into sys.exit(1): let Optuna mark the trial failed
            raise KeyboardInterrupt from None
        raise
    except UnloggedMetricError as exc:  # told before the first epoch; no trial could score: the search stops
        if exc.name != s.metric:
            raise
        raise SearchConfigError(monitor.unlogged(exc.logged)) from None
    for key, value in monitor.record().items():
        trial.set_user_attr(key, value)
    if monitor.best_score is None or not monitor.best_path:
        raise RuntimeError(
            f"trial {trial.number}: training logged no {s.metric}, so there is no best checkpoint"
        )
    lat, onnx_bytes, run_id = _export_and_measure(trial, ctx, monitor.best_path, h, w)
    values_out = {s.metric: monitor.best_score, LATENCY: lat.ms_per_image, "onnx_bytes": onnx_bytes, **cost}
    _log_to_mlflow(cfg, run_id, trial.number, values_out, lat, monitor)
    return [float(values_out[name]) for name in s.objectives]


def _export_and_measure(
    trial: optuna.Trial, ctx: SearchContext, best: str, h: int, w: int
) -> tuple[Latency, int, str | None]:
    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.onnx_export import export_model
    from defectscope.runtime.files import file_sha256

    out = Path(best).parent.parent / "model.onnx"
    model, info = load_checkpoint(best)  # exactly what `defectscope export` does with a checkpoint
    result = export_model(
        model,
        info,
        out,
        checkpoint_sha256=file_sha256(best),
        parity_images=ctx.settings.parity_images,
        log=log.info,
    )
    lat = measure_latency(out, h, w, ctx.settings.latency)
    trial.set_user_attr(LATENCY, lat.ms_per_image)
    trial.set_user_attr("latency", lat.to_dict())
    trial.set_user_attr("onnx_bytes", result.size_bytes)
    trial.set_user_attr("checkpoint", str(Path(best).resolve()))
    trial.set_user_attr("onnx", str(out.resolve()))
    run_id = result.metadata.mlflow_run_id
    if run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
    return lat, result.size_bytes, run_id


def _log_to_mlflow(
    cfg: Any, run_id: str | None, number: int, values: dict[str, float], lat: Latency, monitor: TrialMonitor
) -> None:
    """Objectives as metrics of the trial's own (finished) run, and its ONNX file; never fails the trial."""
    if not run_id or not cfg.get("logger") or "_target_" not in cfg.logger:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=str(cfg.logger.tracking_uri))
        for key, value in values.items():
            client.log_metric(run_id, f"search/{key}", float(value))
        client.log_metric(run_id, "search/images_per_s", lat.images_per_s)
        client.set_tag(
            run_id,
            "defectscope.search.latency",
            f"batch {lat.batch}, {lat.height}x{lat.width}, {lat.provider}",
        )
        if monitor.stop_reason:
            client.set_tag(run_id, "defectscope.search.stopped", monitor.stop_reason)
        client.log_artifact(run_id, str(Path(cfg.paths.output_dir) / "model.onnx"))
    except Exception as exc:
        log.warning("trial %d: could not log the objectives to MLflow run %s: %s", number, run_id, exc)
