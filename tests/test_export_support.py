"""Shared helpers for the fuse/export/checkpoint tests (no tests here).

Small but real CNNs that follow the model contract (forward_features, forward_head, cam,
min_input_size, total_stride, head), with the awkward cases BN folding must get right:
residual blocks, depthwise convs, a BN not fed by a conv, a conv whose output feeds a BN *and*
a skip connection, and a shape check in ``forward`` that defeats torch.fx.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from defectscope import __version__


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(F.relu(self.a(x))))


class TinyNet(nn.Module):
    """stem (stride 2) -> residual -> depthwise-separable (stride 2) -> [loose BN] -> features."""

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        width: int = 8,
        *,
        loose_bn: bool = False,
        shared_conv: bool = False,
        shape_check: bool = False,
    ) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.stem = conv_bn(in_chans, width, stride=2)
        self.stem[0].bias = nn.Parameter(torch.randn(width) * 0.1)  # a conv that already has a bias
        self.res = Residual(width)
        self.dw = conv_bn(width, width, stride=2, groups=width)
        self.pw = conv_bn(width, 2 * width, k=1)
        self.loose = nn.BatchNorm2d(2 * width) if loose_bn else None
        self.shared_conv = shared_conv
        if shared_conv:
            self.tap = nn.Conv2d(2 * width, 2 * width, 1)
            self.tap_bn = nn.BatchNorm2d(2 * width)
        self.shape_check = shape_check
        self.head = nn.Linear(2 * width, num_classes)
        self.total_stride = 4
        self.min_input_size = 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape_check and min(x.shape[-2:]) < self.min_input_size:  # defeats torch.fx
            raise ValueError(f"input smaller than {self.min_input_size}")
        x = F.relu(self.stem(x))
        x = self.res(x)
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        if self.loose is not None:
            x = self.loose(x)  # BN fed by a ReLU: cannot be folded into a conv
        if self.shared_conv:
            t = self.tap(x)
            x = F.relu(self.tap_bn(t)) + t  # the pre-BN tensor has a second user
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nkhw,ck->nchw", self.forward_features(x), self.head.weight)


ModelT = TypeVar("ModelT", bound=nn.Module)


@torch.no_grad()
def randomize(model: ModelT, seed: int = 0) -> ModelT:
    """Random BN affine parameters and running statistics, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            assert m.running_var is not None
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def checkpoint_info(
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    class_names: list[str] | None = None,
    channels: int = 1,
    val_paths: list[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``checkpoint["defectscope"]`` dict per contract #3."""
    names = class_names or ["good", "crack", "scratch", "spot", "dent"][: model_kwargs.get("num_classes", 3)]
    info: dict[str, Any] = {
        "format_version": 1,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "class_names": names,
        "good_class": names[0],
        "threshold": 0.5,
        "loader": {
            "channels": channels,
            "max_side": 256,
            "min_size": 32,
            "size_multiple": 8,
            "max_pixels": 4_000_000,
        },
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "mlflow_run_id": None,
        "mlflow_tracking_uri": None,
        "val_paths": list(val_paths or []),
        # the class of each val image: its folder when that is a class name (synthetic data), else the last
        "val_labels": [
            Path(p).parent.name if Path(p).parent.name in names else names[-1] for p in val_paths or []
        ],
        "package_version": __version__,
    }
    info.update(overrides)
    return info


def write_checkpoint(path: Path, model: nn.Module, info: dict[str, Any]) -> Path:
    """Save a Lightning-shaped checkpoint (plain data; net under ``model.*``) like training does."""
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "defectscope": info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


REPO = Path(__file__).resolve().parents[1]


def model_presets() -> dict[str, dict[str, Any]]:
    """``conf/model/*.yaml`` presets (random init: ``weights`` dropped), plus every registered model
    name no preset uses, built with its defaults, so all of ``list_models()`` is covered."""
    from omegaconf import OmegaConf

    from defectscope.models import list_models

    presets: dict[str, dict[str, Any]] = {}
    for f in sorted((REPO / "conf" / "model").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
        assert isinstance(cfg, dict)
        cfg.pop("weights", None)
        presets[f.stem] = {str(k): v for k, v in cfg.items()}
    used = {c["name"] for c in presets.values()}
    for name in list_models():
        if name not in used:
            presets[f"registry:{name}"] = {"name": name}
    return presets


def build_preset(cfg: dict[str, Any], num_classes: int = 3, in_chans: int = 1) -> Any:
    from defectscope.models import model_from_config

    return model_from_config(cfg, num_classes=num_classes, in_chans=in_chans)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
