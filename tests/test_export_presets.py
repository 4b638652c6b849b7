"""Every shipped model preset exports with dynamic batch/height/width and matches PyTorch in ORT.

Guards the zoo against layers that fuse fine but do not survive `torch.onnx.export(dynamo=True)`
with symbolic sizes (the full parity gate is exercised in test_export*.py; here one cheap check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from defectscope.export.fuse import fuse_conv_bn_report
from defectscope.export.graph import check_graph, to_onnx
from defectscope.export.wrapper import ExportWrapper
from test_export_support import build_preset, model_presets, randomize

PRESETS = {k: v for k, v in model_presets().items() if not k.startswith("registry:")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_exports_with_dynamic_shapes(preset: str) -> None:
    model: Any = randomize(build_preset(PRESETS[preset], num_classes=3, in_chans=1), seed=9)
    fused, report = fuse_conv_bn_report(model)
    assert not report.kept
    proto = to_onnx(ExportWrapper(fused), channels=1, min_side=model.min_input_size, opset=18)
    check_graph(proto, ["logits", "probs", "cam"], channels=1, opset=18)  # full checker, no BN node
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    side = max(model.min_input_size, 32)
    for shape in [(1, 1, side, side + 40), (3, 1, side + 27, side)]:
        x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
        logits, probs, cam = sess.run(None, {"input": x})
        with torch.inference_mode():
            t = torch.from_numpy(x)
            want_logits = model(t)
            want_cam = model.cam(t).numpy()
        assert float(np.abs(probs - want_logits.softmax(1).numpy()).max()) <= 1e-4, preset
        assert float(np.abs(logits - want_logits.numpy()).max()) <= 1e-4 * max(
            1.0, float(want_logits.abs().max())
        )
        assert cam.shape == want_cam.shape
        assert float(np.abs(cam - want_cam).max()) <= 1e-4 * max(1.0, float(np.abs(want_cam).max()))


@pytest.mark.slow
def test_instance_norm_model_passes_the_full_export_gate(tmp_path: Path) -> None:
    """Regression: the parity gate's smallest random input once left InstanceNorm a 1×1 map (a crash)."""
    from defectscope.export.onnx_export import export_model
    from test_export_support import checkpoint_info

    torch.manual_seed(4)
    cfg = {**PRESETS["resnet_small"], "norm": "instance", "widths": [8, 8, 16, 16]}
    model: Any = build_preset(cfg, num_classes=3, in_chans=1)  # total stride 32: 32 px gives a 1×1 map
    info = checkpoint_info("resnet", model.model_kwargs)
    info["loader"]["min_size"] = 33  # as training requires (check_geometry); export refuses less
    result = export_model(
        model.eval(), info, tmp_path / "in.onnx", parity_images=0, threshold=0.5, log=lambda _s: None
    )
    assert model.total_stride == 32 and model.min_input_size == 33
    assert result.parity["random_shapes"][0][2] == 33
    assert result.parity["max_abs_prob_fused"] <= 1e-4 and result.path.is_file()
