"""Model zoo: registry, padding/geometry rules, presets, GAP head and CAM (the layer factories:
test_layer_factories.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from defectscope.models import (
    LayerNorm2d,
    ModelConfigError,
    check_input_size,
    create_model,
    list_models,
    model_from_config,
    register_model,
    resolve_padding,
)
from defectscope.models.flops import count_flops

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
PRESETS = ["lenet", "alexnet", "resnet_small", "nf_resnet", "tiny", "efficientnet_lite0"]
SIZES = [(64, 96), (97, 70)]  # non-square, both above every preset's min_input_size


def preset(name: str) -> dict:
    return yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())


def build(name: str, in_chans: int = 1, num_classes: int = 3, **overrides: object) -> Any:
    torch.manual_seed(0)
    return model_from_config(preset(name), num_classes=num_classes, in_chans=in_chans, **overrides)


# ---------------------------------------------------------------- registry


def test_registry_lists_builders_and_unknown_name_lists_them() -> None:
    names = list_models()
    for expected in (
        "gapcnn",
        "resnet",
        "nf_resnet",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ):
        assert expected in names
    with pytest.raises(ValueError, match="unknown model name 'resnet_tiny'") as err:
        create_model("resnet_tiny", num_classes=2, in_chans=1)
    for name in names:
        assert name in str(err.value)


def test_unknown_kwarg_is_named() -> None:
    with pytest.raises(ModelConfigError, match="'widht'") as err:
        create_model("resnet", num_classes=2, in_chans=1, widht=3)
    assert "widths" in str(err.value)  # the accepted list is shown


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration made by a test stays in that test (the registry is process-wide, and under xdist
    another file's test in this process checks it against the presets)."""
    from defectscope.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.usefixtures("own_registry")
def test_register_model_and_duplicate_name() -> None:
    @register_model(name="_test_dummy")
    def dummy(*, num_classes: int, in_chans: int, width: int = 4) -> nn.Module:
        return create_model(
            "gapcnn", num_classes=num_classes, in_chans=in_chans, stages=[{"channels": width}]
        )

    model = create_model("_test_dummy", num_classes=2, in_chans=1, width=6)
    assert model.num_features == 6
    assert model.model_name == "_test_dummy"
    assert model.model_kwargs == {"num_classes": 2, "in_chans": 1, "width": 6}
    with pytest.raises(ModelConfigError, match="already registered"):
        register_model(name="_test_dummy")(lambda **kw: nn.Identity())


def test_a_tests_registration_does_not_outlive_it() -> None:
    from defectscope.models import list_models

    assert "_test_dummy" not in list_models()


def test_model_from_config_accepts_omegaconf() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(preset("tiny"))
    cfg.norm = "group"
    model = model_from_config(cfg, num_classes=2, in_chans=1)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert isinstance(model.model_kwargs["stages"], list) and isinstance(
        model.model_kwargs["stages"][0], dict
    )


# ---------------------------------------------------------------- padding and geometry


def test_padding_errors() -> None:
    assert resolve_padding("valid", 5) == 0
    assert resolve_padding("same", 3, dilation=2) == 2
    with pytest.raises(ModelConfigError, match="odd"):
        resolve_padding("same", 4)
    with pytest.raises(ModelConfigError, match=r"stages\[1\]\.padding"):
        create_model(
            "gapcnn", num_classes=2, in_chans=1, stages=[{"channels": 4}, {"channels": 4, "padding": "full"}]
        )
    with pytest.raises(ModelConfigError, match=r"unknown key.*'chanels'"):
        create_model("gapcnn", num_classes=2, in_chans=1, stages=[{"chanels": 4}])
    with pytest.raises(ModelConfigError, match="residual"):
        create_model(
            "gapcnn",
            num_classes=2,
            in_chans=1,
            stages=[{"channels": 4, "padding": "valid", "residual": True}],
        )


@torch.no_grad()
def _brute_force_min_size(model: Any, limit: int) -> int:
    for size in range(1, limit):
        try:
            model.forward_features(torch.zeros(1, model.in_chans, size, size))
        except RuntimeError:
            continue
        return size
    raise AssertionError("no size worked")


def test_min_input_size_matches_brute_force() -> None:
    stages = [
        {
            "channels": 2,
            "kernel": 5,
            "stride": 2,
            "padding": "valid",
            "pool": "max",
            "pool_kernel": 3,
            "pool_stride": 2,
        },
        {"channels": 2, "kernel": 3, "dilation": 2, "padding": 1, "pool": "avg", "pool_kernel": 2},
        {"channels": 4, "kernel": 3, "stride": 3, "padding": "valid"},
    ]
    model = create_model("gapcnn", num_classes=2, in_chans=1, stages=stages).eval()
    assert model.min_input_size == _brute_force_min_size(model, 200) == 37
    assert model.total_stride == 2 * 2 * 2 * 3
    for name in ("lenet", "alexnet"):
        m = build(name).eval()
        assert m.min_input_size == _brute_force_min_size(m, 200)


@pytest.mark.parametrize("name", PRESETS)
def test_min_input_size_and_total_stride_are_derived(name: str) -> None:
    model = build(name).eval()
    size = model.min_input_size
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
        assert out.shape == (1, 3) and torch.isfinite(out).all()
        if size > 1:
            with pytest.raises(RuntimeError):
                model(torch.randn(1, 1, size - 1, size - 1))
        for h, w in SIZES:
            f = model.forward_features(torch.randn(1, 1, h, w))
            assert tuple(f.shape[-2:]) == (model.feature_size(h), model.feature_size(w))
    expected_stride = {
        "lenet": 4,
        "alexnet": 32,
        "resnet_small": 32,
        "nf_resnet": 32,
        "tiny": 4,
        "efficientnet_lite0": 32,
    }
    assert model.total_stride == expected_stride[name]


def test_min_size_error_at_construction_shows_layer_sizes() -> None:
    cfg = preset("alexnet")
    model_from_config(cfg, num_classes=2, in_chans=1, min_size=63)  # exactly the minimum: fine
    with pytest.raises(ModelConfigError) as err:
        model_from_config(cfg, num_classes=2, in_chans=1, min_size=32)
    msg = str(err.value)
    assert "min_input_size is 63" in msg
    assert "⌊(x + 2p − f)/s⌋ + 1" in msg
    assert "32 -> 7" in msg  # conv 11x11/4 p2: floor((32 + 4 - 11)/4) + 1 = 7
    assert "7 -> 3" in msg and "3 -> 1" in msg and "EMPTY" in msg
    with pytest.raises(ModelConfigError, match="min_size=20"):
        check_input_size(build("lenet"), 20)
    check_input_size(build("lenet"), 32)


# ---------------------------------------------------------------- presets, head, CAM


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_presets_forward_head_and_cam(name: str, in_chans: int) -> None:
    model = build(name, in_chans=in_chans).eval()
    assert model.in_chans == in_chans and model.num_classes == 3
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 3
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(2, in_chans, h, w)
            logits = model(x)
            feats = model.forward_features(x)
            assert logits.shape == (2, 3)
            assert feats.shape[:2] == (2, model.num_features)
            assert torch.equal(logits, model.forward_head(feats))
            cam = model.cam(x)
            assert cam.shape == (2, 3, *feats.shape[-2:])
            torch.testing.assert_close(cam.mean(dim=(2, 3)), logits - model.head.bias, atol=1e-5, rtol=0)
            assert torch.equal(cam, model.cam_from_features(feats))
    both = model.forward_with_cam(x)
    assert torch.equal(both[0], logits) and torch.equal(both[1], cam)


def test_presets_accept_other_channel_counts_and_train_step() -> None:
    model = build("resnet_small", in_chans=5)
    out = model(torch.randn(2, 5, 40, 56))
    out.sum().backward()
    assert model.features.stage0.conv0.conv.weight.grad is not None


def test_resnet_small_is_line_pc_sized() -> None:
    fc = count_flops(build("resnet_small"), (1, 256, 256))
    assert 300_000 < fc.params < 1_000_000
    assert fc.macs < 300e6


def test_norm_override_from_command_line_style() -> None:
    model = build("resnet_small", norm="group", norm_groups=4)
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(g.num_groups == 4 for g in groups)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("norm", "cls"),
    [
        ("batch", nn.BatchNorm2d),
        ("group", nn.GroupNorm),
        ("layer", LayerNorm2d),
        ("instance", nn.InstanceNorm2d),
        ("none", None),
    ],
)
def test_gapcnn_with_each_norm(norm: str, cls: type | None) -> None:
    stages = [
        {"channels": 8, "kernel": 5, "stride": 2, "pool": "max"},
        {"channels": 8, "kernel": 1},  # pointwise
        {"channels": 16, "stride": 2, "repeat": 2, "residual": True, "pool": "avg", "pool_kernel": 2},
    ]
    torch.manual_seed(0)
    model = create_model(
        "gapcnn", num_classes=2, in_chans=1, stages=stages, norm=norm, norm_groups=4, act="silu"
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if cls is None:
        assert all(c.bias is not None for c in convs)
        assert not any(
            isinstance(m, nn.BatchNorm2d | nn.GroupNorm | LayerNorm2d | nn.InstanceNorm2d)
            for m in model.modules()
        )
    else:
        norms = [m for m in model.modules() if isinstance(m, cls)]
        assert len(norms) == len(convs)  # one norm per conv, shortcut projection included
        assert all(c.bias is None for c in convs)
    out = model(torch.randn(2, 1, 48, 40))  # train mode
    out.sum().backward()
    assert out.shape == (2, 2)
    assert model.total_stride == 2 * 2 * 2 * 2


def test_batchnorm_follows_its_conv_in_fx_graph() -> None:
    """The export fusion pass relies on conv -> bn adjacency, with modules (not functional calls)."""
    from torch.fx import symbolic_trace

    for name in ("resnet_small", "alexnet", "efficientnet_lite0"):
        model = build(name, weights=None) if name.startswith("efficientnet") else build(name)
        graph = symbolic_trace(model.eval())
        modules = dict(graph.named_modules())
        bns = [
            n
            for n in graph.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d)
        ]
        assert bns
        for node in bns:
            src = node.args[0]
            assert src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d), (name, node.target)
            assert len(src.users) == 1


def test_flop_counter_by_hand() -> None:
    model = create_model(
        "gapcnn",
        num_classes=2,
        in_chans=1,
        stages=[{"channels": 4, "kernel": 3, "stride": 2}, {"channels": 8, "kernel": 1}],
    )
    fc = count_flops(model, (1, 32, 16))
    conv1 = 16 * 8 * 4 * 1 * 9
    conv2 = 16 * 8 * 8 * 4
    assert fc.macs == conv1 + conv2 + 8 * 2
    assert fc.flops == 2 * fc.macs
    assert fc.params == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_default_model_exports_to_onnx_with_dynamic_height_and_width(tmp_path: Path) -> None:
    """Static symmetric padding and the GAP head keep the graph shape-agnostic (dynamo export)."""
    ort = pytest.importorskip("onnxruntime")

    class LogitsAndCam(nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.forward_with_cam(x)

    model = build("resnet_small", num_classes=2).eval()
    wrapper = LogitsAndCam(model).eval()
    dims = {
        0: torch.export.Dim("N", max=64),
        2: torch.export.Dim("H", max=4096),
        3: torch.export.Dim("W", max=4096),
    }
    program = torch.onnx.export(
        wrapper, (torch.randn(2, 1, 96, 128),), dynamo=True, dynamic_shapes={"x": dims}
    )
    assert program is not None
    path = tmp_path / "resnet_small.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 96, 128), (3, 1, 131, 77)]:
        x = torch.randn(*shape)
        logits, cam = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref_logits, ref_cam = wrapper(x)
        assert cam.shape == tuple(ref_cam.shape)
        torch.testing.assert_close(torch.from_numpy(logits), ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(cam), ref_cam, atol=1e-4, rtol=1e-4)


def test_instance_norm_needs_a_2x2_feature_map_and_min_input_size_says_so() -> None:
    """InstanceNorm of a 1×1 map has nothing to normalise over; the geometry must not offer that size."""
    kw: dict[str, Any] = {"widths": [8, 16, 16], "depths": [1, 1, 1]}
    bn = create_model("resnet", num_classes=2, in_chans=1, norm="batch", **kw)
    inn = create_model("resnet", num_classes=2, in_chans=1, norm="instance", **kw)
    assert (bn.min_feature_size, inn.min_feature_size) == (1, 2)
    need = inn.min_input_size
    assert need > bn.min_input_size
    assert inn.feature_size(need) == 2 and inn.feature_size(need - 1) == 1
    inn.train()
    assert torch.isfinite(inn(torch.randn(2, 1, need, need))).all()
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # PyTorch's own refusal below it
        inn(torch.randn(2, 1, need - 1, need - 1))
    with pytest.raises(
        ModelConfigError, match=rf"InstanceNorm layers need at least 2×2.*min_input_size is {need}"
    ):
        check_input_size(inn, need - 1)
    check_input_size(inn, need)
    check_input_size(bn, need - 1)


def test_resnet_kernels_per_stage() -> None:
    """``kernels``: the blocks' kernel size per stage (the search varies it); one per stage or an error."""
    from torch import nn

    from defectscope.models import create_model
    from defectscope.models.errors import ModelConfigError

    model = create_model("resnet", num_classes=2, in_chans=1, kernels=[5, 3, 3, 7])
    sizes = {
        name.split(".")[0]: m.kernel_size[0]
        for name, m in model.features.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1 and name.startswith(("stage1", "stage4"))
    }
    assert sizes == {"stage1": 5, "stage4": 7}
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 2)
    with pytest.raises(ModelConfigError, match="one kernel size per stage"):
        create_model("resnet", num_classes=2, in_chans=1, kernels=[3, 3])
