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

Translation options, applied by these factories to every model built from them:

* ``padding_mode``: what a conv's padding (and a blur's) fills in: ``zeros`` (PyTorch's default;
  a model can read the border from it and so learn where in the image a pattern sits),
  ``reflect`` or ``replicate``.
* ``blur``: anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant
  Again").  0 = off; n = a low-pass binomial n×n filter before every subsampling: a stride-s conv
  becomes conv (stride 1) -> norm -> act -> :class:`BlurPool` (stride s), a stride-s pool becomes
  pool (stride 1) -> BlurPool (stride s).  Output sizes stay exactly those of the strided layer,
  weights keep their shapes (pretrained weights load) and the filter is a fixed buffer, not a weight.
"""

from __future__ import annotations

from collections import OrderedDict
from math import comb
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from .act import ActSpec, get_act
from .errors import ModelConfigError
from .geometry import SizeOp, padding_min_input
from .norm import NormSpec, get_norm, is_no_norm

POOL_NAMES: tuple[str, ...] = ("max", "avg", "none")
PaddingMode = Literal["zeros", "reflect", "replicate"]
PADDING_MODES: tuple[PaddingMode, ...] = ("zeros", "reflect", "replicate")
#: 0 = no anti-aliasing; otherwise the side of the binomial filter (1 would be no filter at all)
BLUR_SIZES: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 7)


def check_padding_mode(mode: object, key: str = "padding_mode") -> PaddingMode:
    """``mode`` if it is one of :data:`PADDING_MODES`, else an error listing them."""
    if not isinstance(mode, str) or mode not in PADDING_MODES:
        raise ModelConfigError(f"{key}={mode!r} is not a padding mode; valid: {', '.join(PADDING_MODES)}")
    return cast(PaddingMode, mode)


def check_blur(size: object, key: str = "blur") -> int:
    """``size`` if it is one of :data:`BLUR_SIZES`, else an error listing them."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in BLUR_SIZES:
        raise ModelConfigError(
            f"{key}={size!r} is not a blur filter size; valid: {', '.join(map(str, BLUR_SIZES))} (0 = off)"
        )
    return size


class BlurPool(nn.Module):
    """Binomial low-pass filter, then keep every ``stride``-th pixel (one depthwise conv).

    The filter is the outer product of row n−1 of Pascal's triangle, normalised to sum 1; it is
    padded by (n−1)//2 before and n//2 after (``padding_mode``), so the output side is ⌈x/stride⌉
    like a 'same' strided layer.  Shifting the input by ``stride`` pixels shifts the output by
    exactly one, away from the borders.
    """

    filt: torch.Tensor

    def __init__(self, channels: int, size: int, stride: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        if check_blur(size) == 0:
            raise ModelConfigError("BlurPool needs a filter size >= 2 (blur=0 means no BlurPool)")
        self.channels, self.size, self.stride = channels, size, stride
        self.padding_mode = check_padding_mode(padding_mode)
        row = torch.tensor([comb(size - 1, k) for k in range(size)], dtype=torch.float32)
        kernel = torch.outer(row, row) / row.sum() ** 2
        # not persistent: a fixed filter, never in a state dict (checkpoints and pretrained files load as before)
        self.register_buffer("filt", kernel.expand(channels, 1, size, size).contiguous(), persistent=False)
        before, after = (size - 1) // 2, size // 2
        self.pads = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        x = F.pad(x, self.pads, mode=mode)
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=self.channels)

    def size_ops(self, prefix: str) -> list[SizeOp]:
        # Sizes as a 1×1 stride-s layer: ⌊(x + before + after − n)/s⌋ + 1 = ⌈x/s⌉.
        need = padding_min_input(max(self.pads), self.padding_mode)
        return [SizeOp(prefix or "blurpool", "blurpool", 1, self.stride, 0, min_input=need)]

    def extra_repr(self) -> str:
        return f"{self.channels}, size={self.size}, stride={self.stride}, padding_mode={self.padding_mode}"


def make_blur(channels: int, blur: int, stride: int, padding_mode: str = "zeros") -> BlurPool | None:
    """The anti-aliasing subsampler for a layer of ``stride`` (None when blur is 0 or nothing is subsampled)."""
    if check_blur(blur) == 0 or stride == 1:
        return None
    return BlurPool(channels, blur, stride, padding_mode)


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
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        pad = resolve_padding(padding, kernel, dilation)
        subsample = make_blur(out_chans, blur, stride, padding_mode)
        conv = nn.Conv2d(
            in_chans,
            out_chans,
            kernel,
            stride=1 if subsample is not None else stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=is_no_norm(norm),
            padding_mode=check_padding_mode(padding_mode),
        )
        super().__init__()
        self.conv = conv
        self.norm = get_norm(norm, out_chans, **(norm_kwargs or {}))
        self.act = get_act(act)
        if subsample is not None:
            self.blur = subsample


def make_pool(
    kind: str,
    kernel: int,
    stride: int | None,
    padding: int,
    *,
    key: str = "pool",
    channels: int = 0,
    blur: int = 0,
    padding_mode: str = "zeros",
) -> nn.Module | None:
    """``max``/``avg`` pooling module, or None for ``none``; validates PyTorch's padding limit.

    With ``blur`` (and ``channels``) a subsampling pool pools at stride 1, then :class:`BlurPool`
    subsamples (Zhang 2019's MaxBlurPool); ``padding_mode`` is the blur's.
    """
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
    subsample = make_blur(channels, blur, step, padding_mode) if blur else None
    pool_step = 1 if subsample is not None else step
    pool: nn.Module = (
        nn.MaxPool2d(kernel, pool_step, padding)
        if mode == "max"
        else nn.AvgPool2d(kernel, pool_step, padding)
    )
    return pool if subsample is None else nn.Sequential(OrderedDict(pool=pool, blur=subsample))
