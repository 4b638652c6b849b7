"""What ``defectscope train`` checks before it imports torch and Lightning (seconds on a line PC): every
setting that needs no file read, each refusal one line naming its key.  ``train`` runs the same checks
first, so a library caller gets them too; the app runs them before the import, so a typo costs a
second, not the start-up of the whole stack.
"""

from __future__ import annotations

import os
from typing import Any

from ..data.settings import config_data_settings
from ..data.transforms import check_transform_spec
from ..plain import to_plain
from .config import TrainingConfigError, check_memory_format, check_model_settings, check_run_numbers
from .distill_settings import DistillSettings, distill_settings


def check_train_config(cfg: Any) -> DistillSettings:
    """Run numbers, launch, layout, distillation (the teacher file too), data and model settings; returns
    the checked ``distill.*``."""
    check_run_numbers(cfg)
    check_launch(cfg)
    check_memory_format(cfg.get("memory_format"))
    distill = distill_settings(to_plain(cfg.get("distill")))
    data = cfg.get("data")
    check_transform_spec(to_plain(data.get("train_transform") if data else None), "data.train_transform")
    settings = config_data_settings(to_plain(data) if data is not None else {})
    ordered = settings.ordered if settings is not None else bool(data.get("ordered", False))
    check_model_settings(cfg, ordered)
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
