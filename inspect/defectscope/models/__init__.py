"""defectscope model zoo: GAP classifiers with exact class activation maps.

``create_model(name, num_classes=..., in_chans=..., **kwargs)`` builds any registered model;
``list_models()`` names them.  Every model has ``forward_features``, ``forward_head``,
``forward``, ``cam``, ``head`` (nn.Linear), ``min_input_size`` and ``total_stride``.
Presets live in ``conf/model/*.yaml`` as ``{name: <registry name>, **kwargs}``.
No Lightning here: plain ``nn.Module``s.
"""

from __future__ import annotations

from . import efficientnet_lite, gapcnn, nf_resnet  # noqa: F401  (register the builders)
from .act import ACT_NAMES, get_act
from .base import GapClassifier
from .conv import ConvNormAct, resolve_padding
from .errors import ModelConfigError
from .gapcnn import GapCNN, StageSpec
from .geometry import check_input_size
from .norm import NORM_NAMES, LayerNorm2d, get_norm
from .registry import accepted_kwargs, create_model, list_models, model_from_config, register_model

__all__ = [
    "ACT_NAMES",
    "NORM_NAMES",
    "ConvNormAct",
    "GapCNN",
    "GapClassifier",
    "LayerNorm2d",
    "ModelConfigError",
    "StageSpec",
    "accepted_kwargs",
    "check_input_size",
    "create_model",
    "get_act",
    "get_norm",
    "list_models",
    "model_from_config",
    "register_model",
    "resolve_padding",
]
