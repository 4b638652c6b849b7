"""Convolution building blocks: conv -> norm -> act, pooling, padding rules.

Padding rule (static and symmetric, so ONNX export with dynamic H/W needs no shape logic):

* ``"valid"``: p = 0.
* ``"same"``: p = d(f−1)/2 on every side.  With stride 1 the output size equals the input
  size.  With stride s > 1 the output is ⌈x/s⌉ (the TensorFlow 'SAME' size), but the padding
  stays symmetric, unlike TensorFlow which pads one extra pixel bottom/right when needed.
  'same' therefore requires d(f−1) to be even (odd kernels); even kernels raise an error.
* an int: that many pixels on every side.

Every conv is an ``nn.Conv2d`` module immediately followed by its norm module, so an FX
conv+BatchNorm fusion pass sees ``conv -> bn -> act`` in the dataflow.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .act import ActSpec, get_act
from .errors import ModelConfigError
from .norm import NormSpec, get_norm, is_no_norm

POOL_NAMES: tuple[str, ...] = ("max", "avg", "none")


def resolve_padding(padding: str | int, kernel: int, dilation: int = 1, *, key: str = "padding") -> int:
    """Turn 'same' / 'valid' / int into the symmetric pixel count (see module docstring)."""
    if isinstance(padding, bool):
        raise ModelConfigError(f"{key} must be 'same', 'valid' or a non-negative int, got {padding!r}")
    if isinstance(padding, int):
        if padding < 0:
            raise ModelConfigError(f"{key} must be >= 0, got {padding}")
        return padding
    if not isinstance(padding, str):
        raise ModelConfigError(f"{key} must be 'same', 'valid' or a non-negative int, got {padding!r}")
    mode = padding.strip().lower()
    if mode == "valid":
        return 0
    if mode == "same":
        span = dilation * (kernel - 1)
        if span % 2:
            raise ModelConfigError(
                f"{key}='same' needs an odd effective kernel for symmetric padding; "
                f"kernel={kernel}, dilation={dilation} gives d(f-1)={span}. Use an odd kernel or an int padding"
            )
        return span // 2
    raise ModelConfigError(f"{key} must be 'same', 'valid' or a non-negative int, got {padding!r}")


class ConvNormAct(nn.Sequential):
    """``conv`` (nn.Conv2d) -> ``norm`` -> ``act``; the conv has a bias only when there is no norm."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel: int = 3,
        stride: int = 1,
        padding: str | int = "same",
        dilation: int = 1,
        groups: int = 1,
        norm: NormSpec = "batch",
        act: ActSpec = "relu",
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        pad = resolve_padding(padding, kernel, dilation)
        conv = nn.Conv2d(
            in_chans,
            out_chans,
            kernel,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=is_no_norm(norm),
        )
        super().__init__()
        self.conv = conv
        self.norm = get_norm(norm, out_chans, **(norm_kwargs or {}))
        self.act = get_act(act)


def make_pool(
    kind: str, kernel: int, stride: int | None, padding: int, *, key: str = "pool"
) -> nn.Module | None:
    """``max``/``avg`` pooling module, or None for ``none``; validates PyTorch's padding limit."""
    mode = str(kind).strip().lower()
    if mode in ("none", "null", ""):
        return None
    if mode not in POOL_NAMES:
        raise ModelConfigError(f"{key}={kind!r} is not a known pooling; valid: {', '.join(POOL_NAMES)}")
    if kernel < 1 or (stride is not None and stride < 1):
        raise ModelConfigError(f"{key}: pool_kernel and pool_stride must be >= 1")
    if padding < 0 or padding > kernel // 2:
        raise ModelConfigError(
            f"{key}: pool_padding={padding} must be between 0 and pool_kernel//2={kernel // 2}"
        )
    step = kernel if stride is None else stride
    if mode == "max":
        return nn.MaxPool2d(kernel, step, padding)
    return nn.AvgPool2d(kernel, step, padding)
