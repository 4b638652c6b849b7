"""Sharpness-aware minimisation (optim.sam_rho): the step against a hand-computed SAM step, BatchNorm
statistics kept to the real weights, a real Lightning fit that checkpoints and resumes, and its config errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from defectscope.training.config import TrainingConfigError
from defectscope.training.sam import SharpnessAware
from defectscope.training.train import train
from test_train_fit import SHORT, smoke_cfg


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_sam_step_is_the_base_step_with_the_gradient_at_the_perturbed_weights() -> None:
    x, y = torch.randn(8, 1, 10, 10), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lr, rho = 0.1, 0.05
    net = _net()
    expected = copy.deepcopy(net)
    # by hand: g1 at w, then the gradient at w + rho g1 / ||g1|| (BatchNorm statistics of w only), SGD from w
    loss = nn.functional.cross_entropy(expected(x), y)
    grads = torch.autograd.grad(loss, list(expected.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    bn: Any = expected[1]
    stats = [bn.running_mean.clone(), bn.running_var.clone()]
    moved = copy.deepcopy(expected)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads, strict=True):
            p.add_(rho * g / norm)
    grads2 = torch.autograd.grad(nn.functional.cross_entropy(moved(x), y), list(moved.parameters()))
    with torch.no_grad():
        for p, g in zip(expected.parameters(), grads2, strict=True):
            p.sub_(lr * g)

    sam = SharpnessAware(torch.optim.SGD(net.parameters(), lr=lr), rho, net)
    passes: list[bool] = []

    def closure() -> torch.Tensor:
        passes.append(sam.perturbed)
        sam.zero_grad()
        out = nn.functional.cross_entropy(net(x), y)
        out.backward()
        return out

    first = sam.step(closure)
    assert passes == [False, True] and not sam.perturbed
    torch.testing.assert_close(first, loss)  # the loss reported is the one at the real weights
    for got, want in zip(net.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(net[1].running_mean, stats[0])
    torch.testing.assert_close(net[1].running_var, stats[1])
    assert net[1].momentum == pytest.approx(0.1)  # restored after the second pass
    with pytest.raises(RuntimeError, match="closure"):
        sam.step()


def test_sam_state_is_the_wrapped_optimizers() -> None:
    net = _net()
    base = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sam = SharpnessAware(base, 0.05, net)
    assert sam.param_groups is base.param_groups
    x = torch.randn(4, 1, 8, 8)

    def closure() -> torch.Tensor:
        sam.zero_grad()
        out = net(x).square().mean()
        out.backward()
        return out

    sam.step(closure)
    state = sam.state_dict()
    assert state == base.state_dict() and all("exp_avg" in s for s in state["state"].values())
    other = SharpnessAware(torch.optim.AdamW(_net().parameters(), lr=1e-3), 0.05, net)
    halving = torch.optim.lr_scheduler.StepLR(other, step_size=1, gamma=0.5)  # built first, as Lightning does
    other.load_state_dict(state)
    halving.step()  # the LR it sets is the one the base steps with, also after the load
    assert other.base.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert other.param_groups is other.base.param_groups and other.state is other.base.state
    assert torch.equal(
        other.base.state[next(iter(other.base.state))]["exp_avg"], state["state"][0]["exp_avg"]
    )
    with pytest.raises(ValueError, match="rho"):
        SharpnessAware(base, 0.0, net)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["onecycle", "constant"])
def test_a_sam_fit_checkpoints_the_base_state_and_resumes(
    scheduler: str, compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    extra = ("model=resnet_small", "optim.sam_rho=0.05", f"scheduler={scheduler}", "test=false")
    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, *extra, *SHORT)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    (opt,) = ckpt["optimizer_states"]
    assert opt["state"] and all("exp_avg" in s for s in opt["state"].values())  # AdamW's, restorable
    if scheduler == "onecycle":
        return  # its horizon is the first run's: resuming it for more epochs is not the same schedule
    again = smoke_cfg(
        compose_train,
        smoke_data_dir,
        tmp_path,
        *extra,
        *SHORT[1:],
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
    )
    resumed = train(again)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1
    assert torch.isfinite(torch.tensor(resumed["train/loss"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.sam_rho=-0.1", r"optim\.sam_rho must be a number >= 0"),
        ("optim.sam_rho=big", r"optim\.sam_rho must be a number >= 0"),
        ("trainer.accumulate_grad_batches=2", r"optim\.sam_rho needs trainer\.accumulate_grad_batches=1"),
        ("trainer.precision=16-mixed", r"optim\.sam_rho does not work with trainer\.precision=16-mixed"),
    ],
)
def test_sam_settings_are_checked_before_training(
    override: str, message: str, compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cfg = smoke_cfg(compose_train, smoke_data_dir, tmp_path, "optim.sam_rho=0.05", override, *SHORT)
    with pytest.raises(TrainingConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_both_sam_passes_train_on_the_same_mixup_draw() -> None:
    """SAM's uphill direction and its descent gradient belong to one batch: under mixup, one mix."""
    from defectscope.training.module import DefectClassifier

    module = DefectClassifier(
        model={"name": "gapcnn", "stages": [{"channels": 4, "kernel": 3, "stride": 2}]}, num_classes=3, in_chans=1,
        class_names=["good", "a", "b"], good_class="good", optim={"optimizer": {}}, loss={"mixup": 0.4},
    )  # fmt: skip
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer to log to
    sam = module._sam = SharpnessAware(torch.optim.SGD(module.parameters(), lr=0.1), 0.05, module.model)
    batch = {"image": torch.randn(6, 1, 24, 24), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    draws: list[tuple[float, torch.Tensor]] = []

    def closure() -> torch.Tensor:
        sam.zero_grad()
        loss = module.training_step(batch, 0)
        draws.append(module._mix)
        loss.backward()
        return loss

    torch.manual_seed(5)
    sam.step(closure)
    assert len(draws) == 2 and draws[0] is draws[1] and 0 < draws[0][0] < 1
    sam.step(closure)
    assert draws[2] is draws[3] and draws[2] is not draws[0]  # a new draw for the next batch
