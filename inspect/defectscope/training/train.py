"""``train(cfg)``: a plain function over a composed config, returning metrics (``evaluate``: :mod:`.evaluate`).

The Hydra entry points (:mod:`defectscope.training.app`) are thin wrappers, so tests and notebooks
can call these with a config from Hydra's compose API.  Order in ``train`` is chosen so that every
cheap check (tracking server, checkpoint to resume, model vs. data geometry) fails before the
first training step, and so that the best checkpoint is on disk before anything optional
(tests, plots, uploads) can go wrong.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..data.transforms import check_transform_spec
from ..plain import to_plain
from .artifacts import log_test_artifacts, report_threshold, summary_lines, write_test_plots
from .callbacks import FiniteWeights, Throughput, build_callbacks, checkpoint_callback
from .classes import check_class_settings, weights_per_class
from .config import (
    TrainingConfigError,
    find_keys,
    is_global_zero,
    peer_left,
    resolve_ckpt_path,
    scalar_metrics,
    shift_protocol,
    stop_cause,
    torch_threads,
    use_memory_format,
)
from .distill import add_teacher
from .model_probe import check_model_builds
from .module import DefectClassifier
from .optimization import HORIZON_SETTINGS, check_optimization
from .preflight import check_train_config
from .resume import check_same_classes, read_resume
from .targets import check_component_targets
from .tracking import MLflowTracker
from .trainer_check import check_trainer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- building blocks


def hydra_choice(group: str, default: str) -> str:
    """The option chosen for a config group (``model=...``), for messages and run names."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get(group)
            return str(choice) if choice is not None else default
    except Exception:  # compose API without hydra config
        pass
    return default


def resolve_class_weights(spec: Any, dm: Any) -> list[float] | None:
    """``loss.class_weights``: null, ``balanced`` (the DataModule's inverse frequencies) or one number per class."""
    weights = weights_per_class(spec, dm.class_names)
    if isinstance(weights, str):  # "balanced"
        return [float(w) for w in dm.class_weights.tolist()]
    return weights


def check_geometry(model: torch.nn.Module, dm: Any, data_cfg: Any) -> None:
    """Every image the loader accepts must be large enough for the model (no empty feature maps)."""
    need = int(getattr(model, "min_input_size", 1))
    have = int(dm.loader_config.min_size)
    if need > have:
        keys = find_keys(data_cfg, "min_size", "data")
        key = next((k for k in keys if k.startswith("data.loader")), "data.loader.min_size")
        why = (
            "; its InstanceNorm layers need a feature map of at least 2×2"
            if int(getattr(model, "min_feature_size", 1)) > 1
            else ""
        )
        raise TrainingConfigError(
            f"model={hydra_choice('model', str(getattr(model, 'model_name', '?')))} needs input sides of at least "
            f"{need} px (model.min_input_size{why}) but {key} is {have}: raise {key} to >= {need} "
            "(smaller images are then rejected by the scan) or choose a smaller model"
            + (" or another norm" if why else "")
        )


def build_module(cfg: DictConfig, dm: Any) -> DefectClassifier:
    info = dm.export_info() if hasattr(dm, "export_info") else {}
    module = DefectClassifier(
        model=to_plain(cfg.model),
        num_classes=len(dm.class_names),
        in_chans=int(dm.channels),
        class_names=list(dm.class_names),
        good_class=str(dm.good_class),
        optim=to_plain(cfg.optim),
        scheduler=to_plain(cfg.get("scheduler")) or None,
        loss={
            "class_weights": resolve_class_weights(cfg.loss.get("class_weights"), dm),
            "label_smoothing": cfg.loss.get("label_smoothing"),  # checked by the module
            "mixup": cfg.loss.get("mixup"),
            "ng_weight": cfg.loss.get("ng_weight"),
        },
        finetune=to_plain(cfg.get("finetune")) or {},
        threshold=to_plain(cfg.get("threshold")) or {},
        data_info={
            "loader": info.get("loader", dm.loader_config.to_dict()),
            "mean": list(dm.mean),
            "std": list(dm.std),
            "val_paths": list(dm.val_paths),
            "val_labels": list(getattr(dm, "val_labels", [])),
        },
        run_config=to_plain(cfg),
        ordinal=to_plain(cfg.get("ordinal")) or {},
        ordered=bool(getattr(dm, "ordered", False)),
    )
    check_geometry(module.model, dm, cfg.data)
    return module


def build_tracker(cfg: DictConfig) -> MLflowTracker | None:
    spec = cfg.get("logger")
    if not spec or "_target_" not in spec:  # logger=none (experiments may still set a few keys)
        return None
    tracker = instantiate(spec)
    if not isinstance(tracker, MLflowTracker):
        raise TrainingConfigError(
            f"logger: expected defectscope.training.tracking.MLflowTracker, got {type(tracker)}"
        )
    if tracker.run_name is None:
        tracker.run_name = (
            f"{hydra_choice('model', str(cfg.model.get('name')))}-{hydra_choice('data', 'data')}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}"
        )
    return tracker


def ddp_overrides(cfg: DictConfig) -> dict[str, Any]:
    """A frozen backbone leaves parameters without gradients, which plain DDP refuses."""
    if int(cfg.finetune.get("freeze_epochs", 0)) > 0 and str(cfg.trainer.get("strategy")) == "ddp":
        log.info("finetune.freeze_epochs > 0: using strategy ddp_find_unused_parameters_true")
        return {"strategy": "ddp_find_unused_parameters_true"}
    return {}


# ---------------------------------------------------------------------------- train


def build_datamodule(cfg: DictConfig) -> Any:
    """The run's data module from ``cfg.data``, every setting checked; the transform against the allow-list
    first (Hydra would build any ``_target_``; a checkpoint's data config is rebuilt from the allow-list)."""
    check_transform_spec(to_plain(OmegaConf.select(cfg, "data.train_transform")), "data.train_transform")
    check_component_targets(cfg, ("data",))
    return instantiate(cfg.data)


def ready_datamodule(
    dm: Any,
    needs_test: bool,
    cfg: DictConfig | None = None,
    resumed: tuple[str, dict[str, Any]] | None = None,
) -> None:
    """List, split and scan; refuse an empty split the run will need before anything trains.  With ``cfg``
    its class settings are checked as soon as the classes are listed, before the scan decodes the images, and
    so are the classes of the checkpoint ``resumed`` (its path and entry)."""
    if cfg is not None:
        settings = partial(check_class_settings, cfg.get("threshold") or {}, cfg.loss.get("class_weights"))

        def check(class_names: list[str], good_class: str, ordered: bool) -> None:
            settings(class_names, good_class, ordered)
            if resumed is not None:
                check_same_classes(resumed[1], class_names, good_class, resumed[0])

        dm.class_check = check
    dm.prepare_data()
    dm.setup("fit")
    dm.require_splits("val", *(["test"] if needs_test else []))


def train(
    cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = (), *, announce_stop: bool = True
) -> dict[str, float]:
    """Fit, test the best checkpoint, log everything; returns the final val and test metrics.

    ``extra_callbacks``: Lightning callbacks a caller adds from code (``defectscope search`` watches
    and stops its trials with one), after those of ``cfg.callbacks``. ``announce_stop``: say in one line where
    to resume after Ctrl+C or SIGTERM (exit 130); a search says instead what becomes of its trial.
    """
    with torch_threads(cfg.get("threads")):
        return _train(cfg, extra_callbacks, announce_stop)


def _start_tracker(
    cfg: DictConfig,
    tracker: MLflowTracker | None,
    out_dir: Path,
    ckpt_path: str | None,
    resume: dict[str, Any],
) -> MLflowTracker | None:
    """Open the MLflow run (the resumed one when the checkpoint names it) once the data are listed and scanned."""
    if tracker is not None:
        tags = {
            "defectscope.version": __version__,
            "defectscope.output_dir": str(out_dir),
            "defectscope.model": hydra_choice("model", str(cfg.model.get("name"))),
            "defectscope.data": hydra_choice("data", "?"),
            "mlflow.source.name": "defectscope train",
        }
        if ckpt_path:
            tags["defectscope.resumed_from"] = ckpt_path
        tracker.start(run_id=resume.get("mlflow_run_id"), extra_tags=tags)
    return tracker


def _build_trainer(
    cfg: DictConfig,
    out_dir: Path,
    tracker: MLflowTracker | None,
    extra_callbacks: Sequence[pl.Callback],
) -> pl.Trainer:
    """The Trainer with FiniteWeights, the configured callbacks, Throughput, then the caller's."""
    callbacks = build_callbacks(
        to_plain(cfg.get("callbacks")),
        freeze_epochs=int(cfg.finetune.get("freeze_epochs", 0)),
        bn_eval=bool(cfg.finetune.get("bn_eval", True)),
        dump_dir=str(out_dir / "debug") if cfg.get("debug", {}).get("dump_indices") else None,
        has_logger=tracker is not None,
        validation=cfg.trainer.get("limit_val_batches", 1.0) != 0,
        optimized_metric=cfg.get("optimized_metric"),
    )
    callbacks[:0] = [FiniteWeights()]  # first: before a checkpoint or the average sees the weights
    callbacks.append(Throughput())
    callbacks.extend(extra_callbacks)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=[tracker] if tracker is not None else False,
        **ddp_overrides(cfg),
    )
    return trainer


def _write_run_files(cfg: DictConfig, dm: Any, out_dir: Path, tracker: MLflowTracker | None) -> Path:
    """The resolved config and the data report, on disk (rank 0) and in the MLflow run."""
    resolved = out_dir / "config_resolved.yaml"
    if is_global_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        (out_dir / "data_report.txt").write_text(getattr(dm, "report", "") + "\n", encoding="utf-8")
    if tracker is not None:
        tracker.log_config(to_plain(cfg))
        tracker.log_artifact(resolved)
        tracker.log_artifact(out_dir / "data_report.txt")
    return resolved


def _test_best(
    cfg: DictConfig,
    out_dir: Path,
    trainer: pl.Trainer,
    module: DefectClassifier,
    dm: Any,
    best: str | None,
    tracker: MLflowTracker | None,
) -> dict[str, float]:
    """Test the best checkpoint (unless ``test=false`` or the fit was interrupted); plots on rank 0."""
    if not cfg.get("test", True) or trainer.interrupted:
        return {}
    results = trainer.test(module, datamodule=dm, ckpt_path=best or "last", verbose=False, weights_only=True)
    if trainer.is_global_zero:
        plots = write_test_plots(module.test_outputs, dm, out_dir / "plots")
        if tracker is not None:
            log_test_artifacts(tracker, plots)
    return scalar_metrics(results[0] if results else {})


def _log_outputs(best: str | None, dm: Any, tracker: MLflowTracker | None) -> None:
    """The best checkpoint (when configured) and the list of skipped bad files go to MLflow."""
    if tracker is not None and tracker.log_checkpoint and best:
        tracker.log_artifact(best, "checkpoints")
    rejects = getattr(dm, "rejects_path", None)
    if tracker is not None and getattr(dm, "rejected", None) and rejects and Path(rejects).is_file():
        tracker.log_artifact(rejects)  # data.on_bad_file=skip: which files were left out, and why


def _stopped(trainer: pl.Trainer, exc: BaseException) -> bool:
    """Whether ``exc`` ends a fit or test that Ctrl+C or SIGTERM stopped (rather than a failure)."""
    if isinstance(exc, SystemExit):
        return bool(trainer.interrupted)
    return peer_left(exc) and (trainer.received_sigterm or not trainer.is_global_zero)


def _say_stopped(trainer: pl.Trainer, best: str | None) -> None:
    """One line for a run stopped by Ctrl+C or SIGTERM (a SIGTERM was exit status 0 and no word: a scheduler
    took the run for finished), with the checkpoint to resume from, or to evaluate when only the test was left."""
    if not trainer.is_global_zero:
        return
    if best is not None:  # the fit had finished
        where = f"while testing; training had finished: defectscope evaluate ckpt_path={best}"
    else:
        cb = checkpoint_callback(trainer)
        last = cb.last_model_path or cb.best_model_path
        how = (
            f"resume with ckpt_path={last}"
            if last
            else "no epoch finished, so there is no checkpoint to resume from"
        )
        where = f"in epoch {trainer.current_epoch}; {how}"
    print(f"defectscope train: stopped by {stop_cause(trainer)} {where}", file=sys.stderr, flush=True)


def _train(
    cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = (), announce_stop: bool = True
) -> dict[str, float]:
    t0 = time.perf_counter()
    distill = check_train_config(cfg)  # every setting that needs no file, before any data is read
    check_component_targets(cfg, ("logger", "trainer"))  # classes of their kind, before Hydra builds them
    check_trainer(cfg.get("trainer"), ddp_overrides(cfg))
    check_optimization(to_plain(cfg.get("optim")) or {}, to_plain(cfg.get("scheduler")))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.ckpt_dir)
    horizon = {key: to_plain(OmegaConf.select(cfg, key)) for key in HORIZON_SETTINGS}
    optimizer = OmegaConf.select(cfg, "optim.optimizer._target_")
    network = (to_plain(cfg.get("model")), OmegaConf.select(cfg, "data.loader.channels"))
    resume = (
        read_resume(ckpt_path, cfg.get("finetune"), distill, horizon, optimizer, network) if ckpt_path else {}
    )
    if not ckpt_path:  # a resume built this network already, to compare its weights with the checkpoint's
        check_model_builds(cfg.get("model"), network[1])
    tracker = build_tracker(cfg)
    if tracker is not None:
        tracker.check()  # a server that does not answer is told before the scan, not after it
    dm = build_datamodule(cfg)
    # the data are ready before the MLflow run opens: a data mistake leaves no empty FAILED run behind, and
    # does not reopen a finished run to mark it FAILED
    ready_datamodule(dm, bool(cfg.get("test", True)), cfg, (str(ckpt_path), resume) if ckpt_path else None)
    tracker = _start_tracker(cfg, tracker, out_dir, ckpt_path, resume)

    status = "FAILED"
    best = last = None
    threshold_lines: list[str] = []
    ckpt_cb = None
    metrics: dict[str, float] = {}
    resolved = out_dir / "config_resolved.yaml"
    try:
        module = build_module(cfg, dm)
        use_memory_format(module.model, cfg.get("memory_format"))
        teacher_pass = add_teacher(dm, distill, cfg.get("threads"), tracker)
        module.misclassified_max = tracker.misclassified_max if tracker is not None else 16
        module.shift_protocol = shift_protocol(cfg.get("shift_consistency"), module.model.total_stride)
        trainer = _build_trainer(cfg, out_dir, tracker, [*teacher_pass, *extra_callbacks])
        resolved = _write_run_files(cfg, dm, out_dir, tracker)

        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
            metrics = scalar_metrics(dict(trainer.callback_metrics))
            ckpt_cb = checkpoint_callback(trainer)
            # read before the test: testing best.ckpt restores the callback's state as when best was written
            best, last = ckpt_cb.best_model_path or None, ckpt_cb.last_model_path or None
            metrics.update(_test_best(cfg, out_dir, trainer, module, dm, best, tracker))
        except (
            SystemExit,
            RuntimeError,
        ) as exc:  # Lightning ends an interrupted fit or test with sys.exit (0
            # after a SIGTERM); under DDP a rank whose peer left as the SIGTERM arrived gets gloo's "closed by peer"
            if not _stopped(trainer, exc):
                raise
            status = "KILLED"
            if announce_stop:
                _say_stopped(trainer, best)  # rank 0 only: the other ranks end without a word
            raise SystemExit(130) from None
        if trainer.is_global_zero and best:
            threshold_lines = report_threshold(best, out_dir, tracker)
        _log_outputs(best, dm, tracker)
        status = "KILLED" if trainer.interrupted else "FINISHED"
    finally:
        unsent = tracker.close(status) if tracker is not None else None

    if is_global_zero() and ckpt_cb is not None:
        lines = summary_lines(
            "train",
            seconds=time.perf_counter() - t0,
            best=best,
            last=last,
            monitor=(str(ckpt_cb.monitor), ckpt_cb.best_model_score),
            tracker=tracker,
            resolved=resolved,
            metrics=metrics,
            unsent=unsent,
        )
        print("\n".join(lines + threshold_lines), flush=True)
    return metrics
