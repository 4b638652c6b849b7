"""GapCNN: a plain CNN described by a list of stage specs (LeNet/AlexNet/ResNet-like in YAML).

A stage is ``repeat`` conv-norm-act layers (or ``repeat`` residual basic blocks when
``residual: true``) with the given kernel/stride/padding/dilation, followed by optional
pooling.  Only the first layer of a stage uses ``stride``; the others use stride 1.
The last stage's width is the number of features the GAP head sees.  ``blur`` and
``padding_mode`` apply to every conv and pool (see :mod:`defectscope.models.conv`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .act import ActSpec
from .base import GapClassifier, check_positive_int
from .blocks import BasicBlock
from .conv import ConvNormAct, check_blur, check_padding_mode, make_pool, resolve_padding
from .errors import ModelConfigError
from .norm import NormSpec
from .registry import register_model


@dataclass(frozen=True)
class StageSpec:
    """One stage.  ``padding``: 'same' | 'valid' | int (see ``conv.resolve_padding``).

    ``pool``: 'max' | 'avg' | 'none'; ``pool_stride`` defaults to ``pool_kernel``.
    ``residual``: stack ``repeat`` basic blocks (two k×k convs each, projection shortcut when
    the shape changes) instead of single conv layers; needs 'same' padding.
    """

    channels: int
    kernel: int = 3
    stride: int = 1
    padding: str | int = "same"
    dilation: int = 1
    pool: str = "none"
    pool_kernel: int = 2
    pool_stride: int | None = None
    pool_padding: int = 0
    repeat: int = 1
    residual: bool = False

    @classmethod
    def parse(cls, spec: Any, index: int) -> StageSpec:
        """Validate a dict (from YAML) or a StageSpec; errors name ``stages[index].key``."""
        if isinstance(spec, StageSpec):
            fields = dataclasses.asdict(spec)
        elif isinstance(spec, Mapping):
            fields = dict(spec)
        else:
            raise ModelConfigError(f"stages[{index}] must be a mapping of stage options, got {spec!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ModelConfigError(
                f"stages[{index}]: unknown key(s) {unknown}; valid keys: {', '.join(valid)}"
            )
        if "channels" not in fields:
            raise ModelConfigError(f"stages[{index}]: 'channels' is required")
        key = f"stages[{index}]"
        for name in ("channels", "kernel", "stride", "dilation", "pool_kernel", "repeat"):
            if name in fields:
                check_positive_int(fields[name], f"{key}.{name}")
        if fields.get("pool_stride") is not None:
            check_positive_int(fields["pool_stride"], f"{key}.pool_stride")
        stage = cls(**fields)
        resolve_padding(stage.padding, stage.kernel, stage.dilation, key=f"{key}.padding")
        make_pool(stage.pool, stage.pool_kernel, stage.pool_stride, stage.pool_padding, key=f"{key}.pool")
        if stage.residual and (not isinstance(stage.padding, str) or stage.padding.lower() != "same"):
            raise ModelConfigError(f"{key}.residual=true needs padding='same' (got {stage.padding!r})")
        return stage


class GapCNN(GapClassifier):
    """Configurable CNN with a GAP head; see module docstring for the stage semantics."""

    def __init__(
        self,
        stages: Sequence[StageSpec | Mapping[str, Any]],
        *,
        num_classes: int,
        in_chans: int,
        norm: NormSpec = "batch",
        norm_groups: int = 8,
        act: ActSpec = "relu",
        drop_rate: float = 0.0,
        zero_init_residual: bool = True,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(num_classes=num_classes, in_chans=in_chans)
        if isinstance(stages, str | bytes) or not isinstance(stages, Sequence) or not stages:
            raise ModelConfigError(f"stages must be a non-empty list of stage specs, got {stages!r}")
        self.stages = [StageSpec.parse(s, i) for i, s in enumerate(stages)]
        shift: dict[str, Any] = {"blur": check_blur(blur), "padding_mode": check_padding_mode(padding_mode)}
        norm_kwargs = {"norm_groups": norm_groups}
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        chans = self.in_chans
        for i, stage in enumerate(self.stages):
            body: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(stage.repeat):
                stride = stage.stride if j == 0 else 1
                if stage.residual:
                    body[f"block{j}"] = BasicBlock(
                        chans,
                        stage.channels,
                        stage.kernel,
                        stride,
                        stage.dilation,
                        norm=norm,
                        act=act,
                        norm_kwargs=norm_kwargs,
                        zero_init_last=zero_init_residual,
                        **shift,
                    )
                else:
                    body[f"conv{j}"] = ConvNormAct(
                        chans,
                        stage.channels,
                        stage.kernel,
                        stride,
                        stage.padding,
                        stage.dilation,
                        norm=norm,
                        act=act,
                        norm_kwargs=norm_kwargs,
                        **shift,
                    )
                chans = stage.channels
            pool = make_pool(
                stage.pool, stage.pool_kernel, stage.pool_stride, stage.pool_padding, channels=chans, **shift
            )
            if pool is not None:
                body["pool"] = pool
            layers[f"stage{i}"] = nn.Sequential(body)
        self.features = nn.Sequential(layers)
        _init_conv_weights(self.features)
        self.init_head(chans, drop_rate)


def _init_conv_weights(module: nn.Module) -> None:
    """He init for convs (fan_out, as torchvision ResNets); norms keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_model
def gapcnn(
    *,
    num_classes: int,
    in_chans: int,
    stages: Sequence[Mapping[str, Any]],
    norm: NormSpec = "batch",
    norm_groups: int = 8,
    act: ActSpec = "relu",
    drop_rate: float = 0.0,
    zero_init_residual: bool = True,
    blur: int = 0,
    padding_mode: str = "zeros",
) -> GapCNN:
    """Generic stage-list CNN (presets lenet, alexnet, tiny)."""
    return GapCNN(
        stages,
        num_classes=num_classes,
        in_chans=in_chans,
        norm=norm,
        norm_groups=norm_groups,
        act=act,
        drop_rate=drop_rate,
        zero_init_residual=zero_init_residual,
        blur=blur,
        padding_mode=padding_mode,
    )


@register_model
def resnet(
    *,
    num_classes: int,
    in_chans: int,
    widths: Sequence[int] = (16, 32, 64, 128),
    depths: Sequence[int] = (2, 2, 2, 2),
    kernels: Sequence[int] | None = None,
    stem_width: int = 16,
    stem_kernel: int = 3,
    stem_stride: int = 2,
    stem_pool: str = "max",
    norm: NormSpec = "batch",
    norm_groups: int = 8,
    act: ActSpec = "relu",
    drop_rate: float = 0.0,
    zero_init_residual: bool = True,
    blur: int = 0,
    padding_mode: str = "zeros",
) -> GapCNN:
    """Small ResNet: stem conv (stride 2) + 3×3/2 max pool, then basic-block stages.

    Stage i > 0 halves the resolution in its first block; total stride 32 with the defaults.
    ``kernels``: the blocks' kernel size per stage (None: 3 everywhere).
    """
    if len(widths) != len(depths) or not widths:
        raise ModelConfigError(
            f"widths {list(widths)} and depths {list(depths)} must be non-empty and equally long"
        )
    kernels = [3] * len(widths) if kernels is None else list(kernels)
    if len(kernels) != len(widths):
        raise ModelConfigError(
            f"kernels {kernels} must give one kernel size per stage ({len(widths)} stages)"
        )
    stages: list[dict[str, Any]] = [
        {
            "channels": stem_width,
            "kernel": stem_kernel,
            "stride": stem_stride,
            "pool": stem_pool,
            "pool_kernel": 3,
            "pool_stride": 2,
            "pool_padding": 1,
        },
    ]
    for i, (width, depth, kernel) in enumerate(zip(widths, depths, kernels)):
        stages.append(
            {
                "channels": width,
                "kernel": kernel,
                "stride": 1 if i == 0 else 2,
                "repeat": depth,
                "residual": True,
            }
        )
    return GapCNN(
        stages,
        num_classes=num_classes,
        in_chans=in_chans,
        norm=norm,
        norm_groups=norm_groups,
        act=act,
        drop_rate=drop_rate,
        zero_init_residual=zero_init_residual,
        blur=blur,
        padding_mode=padding_mode,
    )
