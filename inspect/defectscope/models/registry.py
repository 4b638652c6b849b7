"""Model registry: config name -> builder function, with strict kwarg checking.

Builders are keyword-only functions ``fn(*, num_classes, in_chans, **model_kwargs)``.
:func:`create_model` rejects unknown names and unknown kwargs with messages listing the
valid choices, converts OmegaConf containers to plain Python, and records the plain
rebuild kwargs on the model (``model.model_name``, ``model.model_kwargs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from torch import nn

from ..plain import to_plain
from .base import GapClassifier
from .errors import ModelConfigError
from .geometry import check_input_size

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


@overload
def register_model(fn: F, /) -> F: ...
@overload
def register_model(*, name: str | None = None) -> Callable[[F], F]: ...
def register_model(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Decorator registering a builder under ``name`` (default: the function name)."""

    def add(builder: F) -> F:
        key = name or builder.__name__
        if key in _REGISTRY and _REGISTRY[key] is not builder:
            raise ModelConfigError(f"model name {key!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def accepted_kwargs(name: str) -> list[str]:
    """Model kwargs a registered builder accepts (besides num_classes/in_chans)."""
    builder = _get(name)
    params = inspect.signature(builder).parameters
    return [p for p in params if p not in ("num_classes", "in_chans")]


def _get(name: str) -> Builder:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ModelConfigError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(
    name: str, *, num_classes: int, in_chans: int, min_size: int | None = None, **kwargs: Any
) -> GapClassifier:
    """Build registered model ``name``.

    ``min_size`` (optional) is the smallest input side the data loader can produce; the model
    is rejected at construction if such an input would leave an empty feature map.
    """
    builder = _get(name)
    valid = accepted_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ModelConfigError(
            f"model {name!r}: unknown kwarg(s) {', '.join(repr(k) for k in unknown)}; accepted: {', '.join(valid)}"
        )
    plain = {k: to_plain(v, strict=True) for k, v in kwargs.items()}
    model = builder(num_classes=num_classes, in_chans=in_chans, **plain)
    if not isinstance(model, GapClassifier):
        raise ModelConfigError(
            f"builder for {name!r} returned {type(model).__name__}; models must subclass GapClassifier "
            "(forward_features/forward_head/cam/head/min_input_size/total_stride)"
        )
    if min_size is not None:
        check_input_size(model, int(min_size))
    record = {"num_classes": num_classes, "in_chans": in_chans, **plain}
    if "weights" in record:
        record["weights"] = None  # a checkpoint carries the weights; rebuilding must not re-download
    model.model_name = name
    model.model_kwargs = record
    return model


def model_from_config(
    cfg: Mapping[str, Any], *, num_classes: int, in_chans: int, **overrides: Any
) -> GapClassifier:
    """Build from a preset dict (``conf/model/*.yaml``): ``{"name": ..., **kwargs}``."""
    plain = to_plain(cfg, strict=True)
    if not isinstance(plain, dict) or "name" not in plain:
        raise ModelConfigError(f"model config must be a mapping with a 'name' key, got {cfg!r}")
    name = plain.pop("name")
    plain.update(overrides)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **plain)
