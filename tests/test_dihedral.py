"""90° rotations and transposes: training views that keep one size per batch, and the 8-view test-time
option (``--tta dihedral``) built into the graph, parity-gated and identical to the 8 views by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope.data.dihedral import D4_VIEWS, apply_view, view_size
from defectscope.data.sampler import BucketBatchSampler
from defectscope.models import create_model
from defectscope.models.tta import FlipTTA
from defectscope.models.tta import apply_view as apply_view_nchw
from defectscope.runtime.metadata import TTA_VIEWS


def test_training_views_are_the_eight_symmetries_and_the_runtime_table() -> None:
    square = np.arange(9, dtype=np.uint8).reshape(3, 3, 1)
    seen = {apply_view(square, e).tobytes() for e in range(8)}
    assert len(seen) == 8 and len(D4_VIEWS) == 8  # all distinct: the whole group
    assert D4_VIEWS[1:] == TTA_VIEWS["dihedral"]
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 2), dtype=np.uint8)
    for e in range(8):  # numpy (training) and torch (test-time graph) views agree
        want = apply_view_nchw(torch.from_numpy(image).permute(2, 0, 1)[None], D4_VIEWS[e])
        got = apply_view(image, e)
        assert got.shape[:2] == view_size((5, 7), e)
        np.testing.assert_array_equal(got, want[0].permute(1, 2, 0).numpy())


def _sizes() -> list[tuple[int, int]]:
    return [(64, 64)] * 30 + [(64, 96)] * 25 + [(96, 64)] * 7 + [(32, 32)] * 3


def test_dihedral_batches_keep_one_size_and_the_same_members() -> None:
    sizes = _sizes()
    plain = BucketBatchSampler(sizes, 8, seed=5)
    turned = BucketBatchSampler(sizes, 8, seed=5, dihedral=True)
    seen: dict[int, set[int]] = {i: set() for i in range(len(sizes))}
    for epoch in range(80):
        plain.set_epoch(epoch)
        turned.set_epoch(epoch)
        batches = list(turned)
        assert [[i for i, _ in b] for b in batches] == list(plain)  # same batches, views added
        for b in batches:
            assert len({view_size(sizes[i], e) for i, e in b}) == 1  # one size after the views
            if sizes[b[0][0]][0] != sizes[b[0][0]][1]:
                assert len({D4_VIEWS[e][0] for _, e in b}) == 1  # a non-square batch shares its transpose
            for i, e in b:
                seen[i].add(e)
    assert all(len(v) == 8 for v in seen.values())  # over the epochs every image meets all 8 views
    turned.set_epoch(3)
    again = BucketBatchSampler(sizes, 8, seed=5, dihedral=True)
    again.set_epoch(3)
    assert list(turned) == list(again)  # reproducible from (seed, epoch)


def test_the_dataset_applies_the_view_it_is_given(tmp_path: Path) -> None:
    from PIL import Image

    from defectscope.data.dataset import DefectDataset
    from defectscope.data.records import Sample
    from defectscope.runtime.image import LoaderConfig

    arr = np.random.default_rng(1).integers(0, 255, (40, 56), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    loader = LoaderConfig(channels=1, max_side=None, min_size=8, size_multiple=1, max_pixels=10**6)
    ds = DefectDataset([Sample(str(tmp_path / "a.png"), 0)], [(40, 56)], loader, [0.0], [1.0 / 255])
    for e in range(8):
        item = ds[(0, e)]
        np.testing.assert_allclose(
            item["image"][0].numpy(), apply_view(arr[:, :, None], e)[:, :, 0], atol=1e-3
        )
        assert item["index"] == 0


@torch.inference_mode()
def test_eight_view_tta_is_the_mean_over_the_views_on_any_shape() -> None:
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=3, in_chans=1, widths=[8, 16], depths=[1, 1]).eval()
    tta = FlipTTA(model, "dihedral")
    for shape in [(2, 1, 48, 48), (3, 1, 45, 61)]:  # square and not: transposed copies run apart
        x = torch.randn(*shape)
        want = torch.stack([model(apply_view_nchw(x, v)) for v in D4_VIEWS]).mean(0)
        torch.testing.assert_close(tta(x), want, rtol=0, atol=1e-5)
        cam = tta.cam(x)
        assert cam.shape == model.cam(x).shape
        torch.testing.assert_close(cam.mean(dim=(2, 3)), tta(x) - model.head.bias, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dihedral_export_is_parity_gated_and_runs_in_the_runtime(tmp_path: Path) -> None:
    from defectscope.export.onnx_export import export_model
    from defectscope.runtime.inspector import Inspector
    from test_export_support import checkpoint_info

    torch.manual_seed(0)
    model = create_model("resnet", num_classes=3, in_chans=1, widths=[8, 16], depths=[1, 1]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    info = checkpoint_info("resnet", {"num_classes": 3, "in_chans": 1, "widths": [8, 16], "depths": [1, 1]})
    result = export_model(
        model, info, tmp_path / "d4.onnx", tta="dihedral", parity_images=0, threshold=0.5, log=lambda _: None
    )
    assert result.metadata.tta == "dihedral" and result.metadata.tta_views == 8
    assert result.parity["max_abs_prob_fused"] <= 1e-4  # random shapes include non-square ones
    insp = Inspector(result.path, provider="cpu", threads=1)
    x = np.random.default_rng(2).standard_normal((2, 1, 40, 72)).astype(np.float32)
    with torch.inference_mode():
        t = torch.from_numpy(x)
        want = torch.stack([model(apply_view_nchw(t, v)) for v in D4_VIEWS]).mean(0).softmax(1).numpy()
    np.testing.assert_allclose(insp.predict(x, cam=False)["probs"], want, atol=1e-4)
