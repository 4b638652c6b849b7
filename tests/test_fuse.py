"""BatchNorm folding: exact in eval mode, generic over the data-flow graph, never in-place."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from defectscope.export.fuse import (
    ChannelAffine,
    fold_bn_into_conv,
    fuse_conv_bn,
    fuse_conv_bn_report,
    replace_bn_with_affine,
)
from test_export_support import TinyNet, build_preset, model_presets, randomize

ATOL = 1e-5


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, atol: float = ATOL) -> None:
    """forward, forward_features and cam agree (tolerance scaled to the output's magnitude)."""
    with torch.inference_mode():
        for fn in ("forward", "forward_features", "cam"):
            want, got = getattr(a, fn)(x), getattr(b, fn)(x)
            scale = max(1.0, float(want.abs().max()))
            err = float((want - got).abs().max())
            assert err <= atol * scale, f"{fn}: max |Δ| = {err:.3e} (scale {scale:.2f})"


def test_fold_formula_on_a_single_pair() -> None:
    """W' = γW/σ and b' = γ(b−μ)/σ + β, checked against the BN applied after the conv."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, eps=1e-3)
    randomize(nn.Sequential(conv, bn))
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        want = bn(conv(x))
        assert bn.running_var is not None and bn.running_mean is not None and conv.bias is not None
        sigma = torch.sqrt(bn.running_var + bn.eps)
        expect_w = conv.weight * (bn.weight / sigma).reshape(-1, 1, 1, 1)
        expect_b = bn.weight * (conv.bias - bn.running_mean) / sigma + bn.bias
        fold_bn_into_conv(conv, bn)
        assert torch.allclose(conv.weight, expect_w, atol=1e-6)
        assert conv.bias is not None and torch.allclose(conv.bias, expect_b, atol=1e-6)
        assert (conv(x) - want).abs().max() < ATOL


def test_fuses_residual_and_depthwise_blocks_and_keeps_the_api() -> None:
    model = randomize(TinyNet(in_chans=3, num_classes=4), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = fuse_conv_bn_report(model)

    assert type(fused) is TinyNet and fused is not model
    assert n_bn(fused) == 0 and not report.kept
    assert len(report.fused) == 5  # stem, 2 residual convs, depthwise, pointwise
    assert ("dw.0", "dw.1") in report.fused and ("res.b.0", "res.b.1") in report.fused
    assert report.method == "fx"
    assert isinstance(fused.dw[1], nn.Identity)
    assert fused.min_input_size == model.min_input_size and fused.total_stride == model.total_stride
    assert not fused.training
    # the original model is untouched: same modules, same weights, BN still there
    assert n_bn(model) == 5
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    for shape in [(1, 3, 32, 32), (4, 3, 45, 71)]:
        assert_same_outputs(model, fused, torch.randn(*shape))


def test_bn_not_after_a_conv_is_kept_and_reported() -> None:
    model = randomize(TinyNet(loose_bn=True, shared_conv=True), seed=2)
    with pytest.warns(UserWarning, match="kept loose"):
        fused = fuse_conv_bn(model)
    _, report = fuse_conv_bn_report(model)
    kept = dict(report.kept)
    assert set(kept) == {"loose", "tap_bn"}
    assert "not preceded" in kept["loose"]
    assert "other users" in kept["tap_bn"]  # conv output also feeds the skip connection
    assert n_bn(fused) == 2
    assert_same_outputs(model, fused, torch.randn(2, 1, 40, 56))

    # export turns the leftovers into per-channel affine ops; still exact
    frozen = replace_bn_with_affine(fused)
    assert sorted(frozen) == ["loose", "tap_bn"] and n_bn(fused) == 0
    assert isinstance(fused.loose, ChannelAffine)
    assert_same_outputs(model, fused, torch.randn(2, 1, 40, 56))


def test_untraceable_model_falls_back_to_running_it() -> None:
    """A shape check in forward_features defeats torch.fx; the data-flow is then observed on a run."""
    model = randomize(TinyNet(shape_check=True, loose_bn=True, shared_conv=True), seed=3)
    fused, report = fuse_conv_bn_report(model)
    assert report.method.startswith("run")
    assert len(report.fused) == 5
    assert dict(report.kept).keys() == {"loose", "tap_bn"}
    assert_same_outputs(model, fused, torch.randn(3, 1, 33, 50))


class _WSConv(nn.Conv2d):
    """Weight-standardised conv: recomputes its weight each call, so it must not absorb a BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _Odd(nn.Module):
    """Custom conv + BN, a conv module called twice, and a BN without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.ws, self.ws_bn = _WSConv(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.twice, self.twice_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.plain, self.batchstats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ws_bn(self.ws(x))
        x = self.twice_bn(self.twice(x)) + self.twice(x)
        return self.batchstats(self.plain(x))


def test_only_safe_pairs_are_folded() -> None:
    model = randomize(_Odd(), seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, report = fuse_conv_bn_report(model)
    kept = dict(report.kept)
    assert not report.fused
    assert set(kept) == {"ws_bn", "twice_bn", "batchstats"}
    assert "more than once" in kept["twice_bn"] or "other users" in kept["twice_bn"]
    assert "running statistics" in kept["batchstats"]
    x = torch.randn(2, 1, 12, 12)
    with torch.inference_mode():
        assert torch.allclose(model(x), fused(x), atol=ATOL)
    with pytest.raises(ValueError, match=r"batchstats.*running statistics"):
        replace_bn_with_affine(fused)


PRESETS = model_presets()


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_zoo_preset_fuses_exactly(preset: str) -> None:
    """All of conf/model (resnet, normalizer-free, EfficientNet-Lite, LeNet/AlexNet-style) and every
    registered name, with random BN statistics: no BN left, same outputs, same class."""
    model: Any = randomize(build_preset(PRESETS[preset]), seed=11)
    side = max(model.min_input_size, 32)
    n_before = n_bn(model)
    fused, report = fuse_conv_bn_report(model)
    assert not report.kept, report.summary()
    assert n_bn(fused) == 0 and len(report.fused) == n_before
    assert type(fused) is type(model) and n_bn(model) == n_before
    assert_same_outputs(model, fused, torch.randn(2, 1, side + 8, side + 24))


def test_presets_cover_the_registry() -> None:
    from defectscope.models import list_models

    names = {cfg["name"] for cfg in PRESETS.values()}
    assert names == set(list_models())
    assert {"resnet_small", "nf_resnet", "efficientnet_lite0"} <= PRESETS.keys()
    assert n_bn(build_preset(PRESETS["nf_resnet"])) == 0  # normalizer-free: nothing to fold, still exact
