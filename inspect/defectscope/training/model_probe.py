"""The network built once from the run's settings before any data is read.

The real network needs the class count, which only the data listing gives; every other model setting can be
tried before that. A misspelt ``model.norm`` or a ``model.drop_rate`` of 1.5 was told after the decode scan
(minutes on a real lot) and without its key.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.base import GapClassifier
from ..models.errors import ModelConfigError
from ..models.registry import create_model
from ..plain import to_plain
from .config import TrainingConfigError

#: the smallest class count a run can have: the probe's head (the real one is built once the classes are listed)
PROBE_CLASSES = 2


def keyed(message: str, spec: dict[str, Any]) -> str:
    """``message`` under its config key: ``model.norm='x' is not ...`` when it starts with a setting's name."""
    first = message.split("=", 1)[0].split(" ", 1)[0]
    return f"model.{message}" if first in spec else f"model: {message}"


def check_model_builds(model: Any, channels: Any, outputs: int = PROBE_CLASSES) -> GapClassifier:
    """Build ``model`` (the ``model`` config: ``name`` plus the builder's settings) for ``channels`` input
    channels and ``outputs`` output units; a setting the builder refuses is one line naming ``model.<key>``.
    The global random state is left as it was, so a seeded run trains as it did without the probe."""
    spec = to_plain(model)
    if not isinstance(spec, dict) or "name" not in spec:
        raise TrainingConfigError(f"model must be a mapping with a 'name' key (model=NAME), got {spec!r:.80}")
    name = spec.pop("name")
    in_chans = (
        channels if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0 else 1
    )
    try:
        with torch.random.fork_rng(devices=[]):  # its initialisation must not move the run's seeded stream
            return create_model(str(name), num_classes=outputs, in_chans=in_chans, **spec)
    except ModelConfigError as exc:
        raise TrainingConfigError(keyed(str(exc), spec)) from None
