"""Layer factories (norm and activation by name, class or partial) and "same" padding, the pieces the
model zoo is built from."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from defectscope.models import ACT_NAMES, LayerNorm2d, ModelConfigError, get_act, get_norm, resolve_padding

# ---------------------------------------------------------------- layer factories


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("batch", nn.BatchNorm2d),
        ("group", nn.GroupNorm),
        ("layer", LayerNorm2d),
        ("instance", nn.InstanceNorm2d),
        ("none", nn.Identity),
    ],
)
def test_get_norm_names(name: str, cls: type) -> None:
    layer = get_norm(name, 8, norm_groups=4)
    assert type(layer) is cls
    if name == "group":
        assert layer.num_groups == 4
    if name == "instance":
        assert layer.affine


def test_get_norm_class_partial_and_errors() -> None:
    assert isinstance(get_norm(nn.BatchNorm2d, 4), nn.BatchNorm2d)
    gn = get_norm(partial(nn.GroupNorm, 2), 6)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2
    with pytest.raises(ModelConfigError, match=r"12 channels.*norm_groups=5"):
        get_norm("group", 12, norm_groups=5)
    with pytest.raises(ModelConfigError, match="batch, group, layer, instance, none"):
        get_norm("weird", 4)


def test_layernorm2d_normalises_over_channels_per_pixel() -> None:
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    y = get_norm("layer", 6)(x)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


def test_get_act_names_and_unknown() -> None:
    for name in ACT_NAMES:
        assert isinstance(get_act(name), nn.Module)
    assert isinstance(get_act("relu6"), nn.ReLU6)
    assert isinstance(get_act(None), nn.Identity)
    with pytest.raises(ModelConfigError) as err:
        get_act("mish2")
    for name in ACT_NAMES:
        assert name in str(err.value)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_sizes(kernel: int, stride: int) -> None:
    conv = nn.Conv2d(1, 1, kernel, stride, resolve_padding("same", kernel))
    for size in (1, 2, 7, 8, 13):
        out = conv(torch.zeros(1, 1, size, size + 1)).shape[-2:]
        assert tuple(out) == (-(-size // stride), -(-(size + 1) // stride))  # ceil(x / s)
