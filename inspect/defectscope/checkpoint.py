"""Read a training checkpoint back into an eval-mode model plus its ``defectscope`` info dict.

Checkpoints are plain data (contract #3), so they load with ``weights_only=True``: opening a file
from elsewhere never executes pickled code.  The network is rebuilt from the registry name and
kwargs recorded at training time, then its ``model.*`` weights are loaded strictly, so a checkpoint
from an incompatible model version fails loudly instead of exporting half-initialised weights.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

INFO_KEY = "defectscope"
STATE_PREFIX = "model."
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_INFO_KEYS = (
    "format_version",
    "model_name",
    "model_kwargs",
    "class_names",
    "good_class",
    "threshold",
    "loader",
    "mean",
    "std",
)


class CheckpointError(ValueError):
    """The file is missing, unreadable, not a defectscope checkpoint, or does not fit its model."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file and what was expected."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint file does not exist")
    if not p.is_file():
        raise CheckpointError(f"{p}: is not a file (expected a .ckpt written by `defectscope train`)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refuses to load with weights_only=True (it contains non-plain objects; "
            f"defectscope checkpoints hold plain data only): {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{p}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ckpt, dict) or INFO_KEY not in ckpt:
        raise CheckpointError(
            f"{p}: not a defectscope checkpoint (no {INFO_KEY!r} entry; expected a checkpoint written "
            "by `defectscope train`)"
        )
    return ckpt


def validate_info(info: Any, source: str) -> dict[str, Any]:
    """Check the ``defectscope`` entry has every key export relies on."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{source}: {INFO_KEY!r} entry is a {type(info).__name__}, expected a dict")
    missing = [k for k in REQUIRED_INFO_KEYS if k not in info]
    if missing:
        raise CheckpointError(f"{source}: {INFO_KEY!r} entry lacks key(s): {', '.join(missing)}")
    version = info["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{source}: checkpoint format_version {version!r} is not supported "
            f"(this version reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})"
        )
    if not isinstance(info["model_kwargs"], dict):
        raise CheckpointError(
            f"{source}: model_kwargs must be a dict, got {type(info['model_kwargs']).__name__}"
        )
    return info


def model_state(ckpt: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The network's weights: ``state_dict`` entries under ``model.``, prefix stripped."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: has no 'state_dict' (expected a Lightning checkpoint)")
    own = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    if not own:
        raise CheckpointError(f"{source}: 'state_dict' has no {STATE_PREFIX}* keys (the network's weights)")
    return own


def build_model(info: dict[str, Any], source: str) -> nn.Module:
    """``create_model(model_name, **model_kwargs)``; unknown names list the valid ones."""
    from defectscope.models import create_model, list_models

    name = info["model_name"]
    if name not in list_models():
        raise CheckpointError(
            f"{source}: unknown model {name!r} (this defectscope knows: {', '.join(list_models())})"
        )
    try:
        model: nn.Module = create_model(name, **info["model_kwargs"])
    except Exception as exc:
        raise CheckpointError(
            f"{source}: cannot build model {name!r} from model_kwargs {info['model_kwargs']!r}: {exc}"
        ) from exc
    return model


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained network in eval mode; returns ``(model, checkpoint["defectscope"])``."""
    source = str(path)
    ckpt = read_checkpoint(path)
    info = validate_info(ckpt[INFO_KEY], source)
    model = build_model(info, source)
    try:
        model.load_state_dict(model_state(ckpt, source), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source}: weights do not fit model {info['model_name']!r} with {info['model_kwargs']!r}: {exc}"
        ) from None
    return model.eval(), info
