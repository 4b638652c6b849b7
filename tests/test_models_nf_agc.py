"""Normalizer-free ResNet and adaptive gradient clipping."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models import LayerNorm2d, create_model
from defectscope.models.agc import adaptive_grad_clip, agc_parameters, unitwise_norm
from defectscope.models.nf_resnet import NFBasicBlock, ScaledStdConv2d, activation_gamma

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LayerNorm2d)


def small_nf(**kw: Any) -> Any:
    torch.manual_seed(0)
    return create_model(
        "nf_resnet", num_classes=2, in_chans=1, widths=[8, 16], depths=[1, 2], stem_width=8, **kw
    )


def test_nf_resnet_has_no_norm_layers() -> None:
    model = create_model("nf_resnet", num_classes=2, in_chans=3)
    assert not [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(c, ScaledStdConv2d) for c in convs)


def test_scaled_std_conv_weight_is_standardised() -> None:
    conv = ScaledStdConv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)
        conv.gain.fill_(2.0)
        w = conv.standardized_weight()
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-5)
    fan_in = 4 * 9
    # W_hat = gain (W - mean) / (std sqrt(fan_in))  =>  Var(W_hat) * fan_in = gain²
    assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False) * fan_in, torch.full((6,), 4.0), rtol=1e-3)


def test_activation_gamma_matches_closed_form_for_relu() -> None:
    assert activation_gamma(nn.ReLU()) == pytest.approx(math.sqrt(2.0 / (1.0 - 1.0 / math.pi)), rel=1e-4)
    assert activation_gamma(nn.Identity()) == pytest.approx(1.0, rel=1e-4)


def test_nf_blocks_track_expected_variance_and_start_as_identity() -> None:
    model = small_nf(alpha=0.2)
    blocks = [m for m in model.modules() if isinstance(m, NFBasicBlock)]
    # stage0 block0 (8->8, no transition): beta 1; stage1 block0 transition: beta sqrt(1 + .04);
    # stage1 block1: after the transition the variance resets to 1 + alpha²
    betas = [1.0 / b.inv_beta for b in blocks]
    assert betas == pytest.approx([1.0, math.sqrt(1.04), math.sqrt(1.04)])
    assert all(float(b.skip_gain.detach()) == 0.0 for b in blocks)
    block = blocks[0].eval()
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(block(x), x)  # skip gain 0: x + alpha * 0 * f(x / beta)


def test_nf_signal_stays_unit_scale_at_init() -> None:
    model = small_nf(skipinit=1.0).eval()
    with torch.no_grad():
        f = model.features[:-1](torch.randn(4, 1, 64, 64))  # before the final activation
    assert 0.3 < float(f.var()) < 3.0


def test_nf_resnet_sgd_with_agc_reduces_loss() -> None:
    model = small_nf(skipinit=0.0)
    torch.manual_seed(1)
    x = torch.randn(8, 1, 32, 32)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        adaptive_grad_clip(agc_parameters(model), clipping=0.16)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    moved = [b.skip_gain for b in model.modules() if isinstance(b, NFBasicBlock)]
    assert any(float(g.detach()) != 0.0 for g in moved)  # residual branches start learning


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def test_agc_clips_unitwise_and_leaves_small_units_alone() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    lin = nn.Linear(5, 4)
    params: list[torch.Tensor] = [p for m in (conv, lin) for p in m.parameters()]  # w, b, w, b
    with torch.no_grad():
        conv.weight[0].zero_()  # a dead unit: eps takes over from its zero norm
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    with torch.no_grad():
        _grad(conv.weight)[[0, 2]] *= 1000.0  # two huge units
        _grad(lin.weight)[1] *= 1000.0
    before = [_grad(p).clone() for p in params]
    clipping, eps = 0.05, 1e-3
    ratio_before = [unitwise_norm(_grad(p)) / unitwise_norm(p).clamp(min=eps) for p in params]
    fraction = adaptive_grad_clip(params, clipping, eps=eps)

    n_units = 6 + 1 + 4 + 1  # conv rows, conv bias, linear rows, linear bias
    n_clipped = sum(int((r > clipping).sum()) for r in ratio_before)
    assert n_clipped >= 3
    assert fraction == pytest.approx(n_clipped / n_units)
    for p, g0, r0 in zip(params, before, ratio_before):
        ratio = unitwise_norm(_grad(p)) / unitwise_norm(p).clamp(min=eps)
        assert (ratio <= clipping * (1 + 1e-5)).all()
        keep = (r0 <= clipping).reshape(-1)
        rows_now = _grad(p).reshape(keep.numel(), -1)
        rows_before = g0.reshape(keep.numel(), -1)
        assert torch.equal(rows_now[keep], rows_before[keep])  # unclipped units untouched
        clip = ~keep
        if clip.any():  # clipped units keep their direction
            cos = F.cosine_similarity(rows_now[clip], rows_before[clip], dim=1)
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    dead = _grad(conv.weight)[0].norm()
    assert float(dead) == pytest.approx(clipping * eps, rel=1e-4)


def test_agc_parameters_exclude_head() -> None:
    model = small_nf()
    params = agc_parameters(model)
    head_ids = {id(p) for p in model.head.parameters()}
    assert not head_ids & {id(p) for p in params}
    assert len(params) == len(list(model.parameters())) - 2
