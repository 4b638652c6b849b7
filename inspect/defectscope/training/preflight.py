"""What ``defectscope train`` and ``evaluate`` check before they import torch and Lightning (seconds on a
line PC): every setting that needs no file read (evaluate: and the checkpoint's path and first bytes), each
refusal one line naming its key.  ``train``/``evaluate`` run the same checks first, so a library caller gets
them too; the app runs them before the import, so a typo costs a second, not the start-up of the stack.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..data.rebuild import datamodule_kwargs
from ..data.settings import EVALUATE_ON, check_evaluate_on, config_data_settings
from ..data.sources import input_paths
from ..data.transforms import check_transform_spec
from ..plain import to_plain
from ..runtime.decision import THRESHOLD_EXPECTED, is_threshold
from ..runtime.files import checkpoint_file_problem
from ..runtime.outputs import OutputError, check_not_input, check_output_file, check_output_folder
from .config import (
    TrainingConfigError,
    check_memory_format,
    check_model_settings,
    check_seed,
    config_number,
    resolve_ckpt_path,
    shift_protocol,
)
from .distill_settings import DistillSettings, distill_settings
from .trainer_check import check_run_numbers

CKPT_HELP = (
    "ckpt_path is required: defectscope evaluate ckpt_path=CHECKPOINT [data=folder data.source.root=LOT] "
    "(an exported model: defectscope evaluate MODEL.onnx DATA)"
)


def check_train_config(cfg: Any) -> DistillSettings:
    """Run numbers, launch, layout, distillation (the teacher file too), data and model settings; returns
    the checked ``distill.*``."""
    check_run_numbers(cfg)
    check_launch(cfg)
    check_paths(cfg)
    if cfg.get("ckpt_path") not in (None, "", "last"):  # a missing or wrong file, before the data and torch
        resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.ckpt_dir)
    check_memory_format(cfg.get("memory_format"))
    distill = distill_settings(to_plain(cfg.get("distill")))
    data = cfg.get("data")
    # the allow-list; the arguments are albumentations' to check (it imports torch): the DataModule builds the
    # transform when it is made, before any data is read
    check_transform_spec(to_plain(data.get("train_transform") if data else None), "data.train_transform")
    settings = config_data_settings(to_plain(data) if data is not None else {})
    ordered = settings.ordered if settings is not None else bool(data.get("ordered", False))
    check_model_settings(cfg, ordered)
    shift_protocol(cfg.get("shift_consistency"))
    return distill


def check_launch(cfg: Any) -> None:
    """Lightning's own multi-process launcher re-runs the command line; that cannot work in a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        multirun = False
    devices = cfg.trainer.get("devices", 1)
    many = devices == -1 or (isinstance(devices, int) and devices > 1) or isinstance(devices, list | str)
    external = any(v in os.environ for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))
    if multirun and many and not external and str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        raise TrainingConfigError(
            "trainer=ddp with several devices cannot run inside --multirun (Lightning re-launches the "
            "command line per device); run the sweep's jobs one by one, or start them with torchrun/SLURM"
        )


def check_paths(cfg: Any) -> None:
    """``paths.*`` name folders: null would become a folder named ``None`` through the interpolations that
    use them, and the run's own folders must be creatable before the data scan, not after it."""
    paths = cfg.get("paths")
    if paths is None:
        return
    for key in ("launch_dir", "data_dir", "output_dir", "ckpt_dir"):
        if key not in paths:
            continue
        value = paths.get(key)
        if not (isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip())):
            raise TrainingConfigError(f"paths.{key} must be a folder path, got {value!r}")
        if key in ("output_dir", "ckpt_dir"):
            _writable(check_output_folder, value, f"paths.{key}")


def check_evaluate_config(cfg: Any) -> tuple[float | None, str]:
    """``evaluate``'s hand-set threshold (None: the checkpoint's) and checkpoint file, checked in that order,
    with ``memory_format``: the threshold is named before the file is looked at."""
    by_hand = cfg.get("threshold")
    if by_hand is not None:
        by_hand = config_number(
            by_hand, "threshold", f"{THRESHOLD_EXPECTED}, or null for the checkpoint's own", is_threshold
        )
    check_memory_format(cfg.get("memory_format"))
    check_seed(cfg)
    check_paths(cfg)
    shift_protocol(cfg.get("shift_consistency"))
    try:
        check_evaluate_on(cfg.get("evaluate_on"))
    except ValueError as exc:
        raise TrainingConfigError(str(exc)) from None
    check_evaluate_data(cfg.get("data"))
    if cfg.get("metrics_file"):  # written after the test loop: a bad path is told before it
        _writable(check_output_file, cfg.metrics_file, "metrics_file")
    ckpt_file = checkpoint_file(cfg)
    problem = checkpoint_file_problem(ckpt_file)
    if problem:
        raise TrainingConfigError(problem)
    if cfg.get("metrics_file"):
        source = (cfg.get("data") or {}).get("source")
        inputs = {"ckpt_path": ckpt_file, **input_paths(to_plain(source) if source is not None else None)}
        _writable(lambda path, key: check_not_input(path, key, inputs), cfg.metrics_file, "metrics_file")
    return by_hand, ckpt_file


def _writable(check: Callable[[Any, str], None], path: Any, key: str) -> None:
    """An output check of :mod:`~defectscope.runtime.outputs`, its refusal as this config's error."""
    try:
        check(path, key)
    except OutputError as exc:
        raise TrainingConfigError(str(exc)) from None


def check_evaluate_data(data: Any) -> None:
    """A data config given to ``evaluate`` (a new lot), checked by the rules evaluation rebuilds it by, before
    torch is imported; ``data.*`` keys given without a data config (``+data.evaluate_on=all``) are told how to
    name a lot."""
    if not data:
        return
    try:
        datamodule_kwargs(to_plain(data), "data", from_file=False)
    except ValueError as exc:
        if "source" in data:
            raise TrainingConfigError(str(exc)) from None
        raise TrainingConfigError(
            f"{', '.join(f'data.{k}' for k in data)} given without a data config to score; a new lot: "
            "data=folder data.source.root=LOT (or data=csv data.source.path=LIST.csv); the checkpoint's own "
            f"test split needs no data= (what is scored is the top-level key evaluate_on={'|'.join(EVALUATE_ON)})"
        ) from None


def checkpoint_file(cfg: Any) -> str:
    """``ckpt_path`` (the app refuses a missing ``???`` value before this runs; this covers null/empty)."""
    value = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    if value is None or not str(value).strip():
        raise TrainingConfigError(CKPT_HELP)
    return str(Path(str(value)).expanduser())
