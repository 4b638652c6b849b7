"""Activation factory: one place that turns a config string into an ``nn.Module``.

Activations are never in-place: the export engineer's FX passes and ONNX export must not see
mutation of graph values, and the memory saved is negligible for line-PC sized models.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import ModelConfigError

ActSpec = str | type[nn.Module] | Callable[[], nn.Module] | None

_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

ACT_NAMES: tuple[str, ...] = tuple(_ACTS)


def get_act(act: ActSpec) -> nn.Module:
    """Return a fresh activation module for a name (see ``ACT_NAMES``), class or factory.

    ``None`` means identity.  Names are case-insensitive; ``swish`` is accepted for ``silu``.
    """
    if act is None:
        return nn.Identity()
    if isinstance(act, str):
        key = act.strip().lower().replace("-", "_")
        key = {"swish": "silu", "none": "identity", "linear": "identity"}.get(key, key)
        if key not in _ACTS:
            raise ModelConfigError(
                f"act={act!r} is not a known activation; valid names: {', '.join(ACT_NAMES)}"
            )
        return _ACTS[key]()
    if isinstance(act, nn.Module):
        raise ModelConfigError(
            "act must be a name, an nn.Module class or a factory, not a module instance "
            "(one instance would be shared between layers)"
        )
    module = act()
    if not isinstance(module, nn.Module):
        raise ModelConfigError(f"act factory {act!r} returned {type(module).__name__}, expected an nn.Module")
    return module
