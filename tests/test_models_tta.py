"""Test-time flips inside the model (FlipTTA): exact averages, the GAP/CAM contract, clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from defectscope.models import ModelConfigError, create_model
from defectscope.models.tta import TTA_VIEWS, FlipTTA
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.metadata import TTA_NAMES, MetadataError, ModelMetadata


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet", num_classes=3, in_chans=1, widths=[8, 16], depths=[1, 1]).eval()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not an identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize(
    ("views", "copies"),
    [
        ("hflip", [(), (3,)]),
        ("flips", [(), (3,), (2,), (2, 3)]),
    ],
)
@torch.inference_mode()
def test_logits_are_the_mean_over_flipped_copies(
    model: torch.nn.Module, views: str, copies: list[tuple[int, ...]]
) -> None:
    x = torch.randn(3, 1, 45, 61)  # odd sizes: the feature maps of flipped copies do not align exactly
    want = torch.stack([model(x.flip(d) if d else x) for d in copies]).mean(0)
    got = FlipTTA(model, views)(x)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert 1 + len(TTA_VIEWS[views]) == len(copies)
    assert not torch.allclose(got, model(x), atol=1e-3)  # the flips change the answer


@torch.inference_mode()
def test_cam_keeps_the_gap_contract_and_input_orientation(model: torch.nn.Module) -> None:
    tta = FlipTTA(model, "flips")
    x = torch.randn(2, 1, 64, 96)
    x[:, :, :16, :16] += 6.0  # a bright top-left corner: the map must stay top-left after averaging
    cam, logits = tta.cam(x), tta(x)
    assert cam.shape == model.cam(x).shape
    torch.testing.assert_close(cam.mean(dim=(2, 3)), logits - model.head.bias, rtol=0, atol=1e-5)
    copies = [(), (3,), (2,), (2, 3)]
    want = torch.stack([model.cam(x.flip(d)).flip(d) if d else model.cam(x) for d in copies]).mean(0)
    torch.testing.assert_close(cam, want, rtol=0, atol=1e-5)  # each copy's map flipped back
    plain = model.cam(x)
    k = int(plain[0].flatten(1).abs().amax(1).argmax())  # the class whose map reacts most
    corner = (plain[0, k] - plain[0, k].mean()).abs()
    tta_corner = (cam[0, k] - cam[0, k].mean()).abs()
    assert tta_corner[:2, :2].mean() > tta_corner[-2:, -2:].mean()
    assert corner[:2, :2].mean() > corner[-2:, -2:].mean()


def test_none_is_the_plain_model_and_geometry_is_kept(model: torch.nn.Module) -> None:
    tta = FlipTTA(model, "none")
    x = torch.randn(1, 1, 40, 40)
    with torch.inference_mode():
        torch.testing.assert_close(tta(x), model(x), rtol=0, atol=0)
    for name in ("num_classes", "in_chans", "min_input_size", "total_stride"):
        assert getattr(FlipTTA(model, "flips"), name) == getattr(model, name)
    assert FlipTTA(model).head is model.head


def test_fp16_export_wrapper_keeps_the_head_and_the_average_in_fp32(model: torch.nn.Module) -> None:
    import copy

    from defectscope.export.wrapper import ExportWrapper

    tta = FlipTTA(copy.deepcopy(model), "flips")
    w = ExportWrapper(tta, fp16=True).eval()
    assert w.model.head is tta.model.head and w.model.head.weight.dtype == torch.float32
    convs = [m for m in tta.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.dtype == torch.float16 for c in convs)
    x = torch.randn(2, 1, 48, 64)
    with torch.inference_mode():
        logits, probs, cam = w(x)
        want = FlipTTA(model, "flips")(x)
    assert logits.dtype == probs.dtype == cam.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=0, atol=5e-2)


def test_unknown_view_name_lists_the_valid_ones(model: torch.nn.Module) -> None:
    with pytest.raises(
        ModelConfigError, match="tta must be one of none, hflip, flips, dihedral, got 'rot90'"
    ):
        FlipTTA(model, "rot90")


def test_runtime_metadata_knows_the_same_views() -> None:
    """The torch-free runtime validates ``tta`` with its own list; both must agree."""
    assert tuple(TTA_VIEWS) == TTA_NAMES
    base: dict[str, Any] = {
        "class_names": ["good", "bad"],
        "good_class": "good",
        "threshold": 0.5,
        "loader": LoaderConfig(channels=1, min_size=8, max_pixels=10**7),
        "mean": [0.5],
        "std": [0.25],
        "model_name": "resnet",
        "package_version": "0",
    }
    assert ModelMetadata(**base).variant == "fp32"
    for name in TTA_NAMES:
        assert 1 + len(TTA_VIEWS[name]) == ModelMetadata(**base, tta=name).tta_views
    meta = ModelMetadata(**base, int8=True, tta="flips")
    assert meta.tta_views == 4 and meta.variant == "int8, test-time flips (4 views)"
    assert ModelMetadata.from_json(meta.to_json()).tta == "flips"
    # a model without views does not write the key (as one exported before ``tta`` existed): no flips
    doc = json.loads(ModelMetadata(**base).to_json())
    assert "tta" not in doc and "grading" not in doc and "quantization" not in doc
    old = ModelMetadata.from_json(json.dumps(doc))
    assert old.tta == "none" and old.variant == "fp32" and old.tta_views == 1
    # a key from a later version may change the verdicts (as ng_classes and grading did when they came):
    # this runner refuses the file rather than running it another way
    with pytest.raises(MetadataError) as exc:
        ModelMetadata.from_json(json.dumps({**doc, "added_later": 1, "package_version": "9.1"}), "m.onnx")
    assert str(exc.value) == (
        "m.onnx: metadata has key(s) this runner does not know: 'added_later' (written by defectscope 9.1); "
        "run it with that version or newer, or re-export the model with this one"
    )
    huge = {k: v for k, v in doc.items() if k != "package_version"} | {"k" * 200_000: 1}
    with pytest.raises(MetadataError) as exc:
        ModelMetadata.from_json(json.dumps(huge), "m.onnx")
    assert len(str(exc.value)) < 300 and "written by an unknown defectscope version" in str(exc.value)
    with pytest.raises(ValueError, match="tta must be one of none, hflip, flips, dihedral, got 'all'"):
        ModelMetadata(**base, tta="all")
