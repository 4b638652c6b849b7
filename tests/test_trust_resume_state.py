"""A checkpoint is data, on resume: optimizer settings and states a file cannot make torch fail on inside the
first step (split from test_trust_checkpoints.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trust_files import cli, error_line, variant


def test_resume_refuses_optimizer_settings_that_are_not_numbers() -> None:
    """A word where torch multiplies (the learning rate, a beta) was a TypeError inside the first step."""
    from defectscope.checkpoint import CheckpointError
    from defectscope.training.resume import check_resume_state

    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)  # adds max_lr, initial_lr
    state = optimizer.state_dict()
    check_resume_state({"optimizer_states": [state]}, "r.ckpt")  # the genuine settings pass
    for key, value in (("lr", "abc"), ("betas", ("0.9", 0.999)), ("max_lr", float("nan")), ("eps", [])):
        group = dict(state["param_groups"][0], **{key: value})
        with pytest.raises(CheckpointError) as exc:
            check_resume_state({"optimizer_states": [dict(state, param_groups=[group])]}, "r.ckpt")
        assert (
            str(exc.value)
            == f"r.ckpt: optimizer_states[0].param_groups[0].{key}: expected a number, got {value!r}"
        )
    with pytest.raises(
        CheckpointError, match=r"^r\.ckpt: optimizer_states\[0\] needs a list of param_groups$"
    ):
        check_resume_state({"optimizer_states": [{"param_groups": "x"}]}, "r.ckpt")
    with pytest.raises(
        CheckpointError, match=r"param_groups\[0\]\.params: expected a list of parameter numbers$"
    ):
        check_resume_state({"optimizer_states": [{"param_groups": [{"params": ["a"]}]}]}, "r.ckpt")
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\]\.state must map parameter numbers"):
        check_resume_state({"optimizer_states": [{"param_groups": [], "state": {"0": {}}}]}, "r.ckpt")


def _shrink_first_group(opt: dict[str, Any]) -> None:
    opt["param_groups"][0]["params"].pop()


# (attack on a genuine mid-run optimizer state, what the one error line must say)
OPTIMIZER_STATE_ATTACKS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (lambda opt: opt["state"][0].update(exp_avg=torch.zeros(3)), r"\.state\[0\]\.exp_avg is shaped \[3\], but its parameter is \["),
    (lambda opt: opt["state"][0].update(step=torch.tensor([1.0, 2.0])), r"\.state\[0\]\.step holds 2 numbers, expected one"),
    (_shrink_first_group, r"holds parameter groups of sizes \[\d+\], but this run's optimizer has \[\d+\]"),
    (lambda opt: opt["state"].update({999: {}}), r"\.state\[999\] names no parameter of its groups"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.NAdam(p, lr=1e-3),  # keeps a 0-dim mu_product per parameter
        lambda p: torch.optim.ASGD(p, lr=1e-3),  # 0-dim eta and mu
        lambda p: torch.optim.SGD(p, lr=1e-3),  # no state without momentum
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    ],
)
def test_genuine_optimizer_states_pass_the_resume_check(make: Callable[[Any], torch.optim.Optimizer]) -> None:
    from defectscope.training.optimization import check_resumed_optimizer

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    optimizer = make(net.parameters())
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    check_resumed_optimizer([optimizer.state_dict()], make(net.parameters()), "r.ckpt")


@pytest.mark.slow
def test_resume_refuses_an_optimizer_state_that_does_not_fit(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """torch loads an optimizer state by position: a wrong shape or step count failed inside the first
    step, a wrong group size was a bare ValueError; each is one line now, before any step."""
    common = ["train", "experiment=smoke", "logger=none", "threads=1", "scheduler=constant", "test=false",
              f"paths.data_dir={tmp_path / 'data'}"]  # fmt: skip
    first = cli([*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path, cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    genuine = torch.load(tmp_path / "r1" / "checkpoints" / "last.ckpt", weights_only=True)
    for n, (attack, message) in enumerate(OPTIMIZER_STATE_ATTACKS):
        evil = variant(genuine, tmp_path / f"evil{n}.ckpt", lambda c, a=attack: a(c["optimizer_states"][0]))
        out = tmp_path / f"resumed{n}"
        proc = cli(
            [*common, "trainer.max_epochs=2", f"ckpt_path={evil}", f"hydra.run.dir={out}"], tmp_path, cli_env
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(message, error_line(proc)), error_line(proc)
        assert not (out / "checkpoints" / "last.ckpt").exists()  # refused before an epoch ended
    last = tmp_path / "r1" / "checkpoints" / "last.ckpt"
    other = cli([*common, "optim=sgd", "trainer.max_epochs=2", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'o'}"],
                tmp_path, cli_env)  # fmt: skip
    assert other.returncode == 2, other.stderr[
        -3000:
    ]  # SGD would load AdamW's state and fail in its first step
    assert error_line(other).endswith(
        f"optim.optimizer is torch.optim.SGD but {last} was trained with torch.optim.AdamW: a resumed run "
        "restores its optimizer's state; resume with that optimizer or start a new run"
    )
    again = cli([*common, "trainer.max_epochs=2", f"ckpt_path={last}",
                 f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path, cli_env)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]  # the control: the genuine state resumes
