"""`defectscope train experiment=smoke` and `defectscope evaluate` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

SMOKE_LIMIT_S = 60.0


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(stdout: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:\s+(\S+)", stdout, re.M)
    assert m, f"no '{label}:' line in\n{stdout[-2000:]}"
    return m.group(1)


@pytest.mark.slow
def test_smoke_train_then_evaluate(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    t0 = time.perf_counter()
    proc = _run(
        [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}"], tmp_path, cli_env
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"`defectscope train experiment=smoke` wall time: {wall:.1f} s")
    assert wall < SMOKE_LIMIT_S
    both = proc.stdout + proc.stderr  # third-party lines that ask nothing of the user are gone
    assert "LeafSpec" not in both and "Tip: For seamless cloud logging" not in both

    # outputs/<date>/<time>/ under the launch directory; MLflow store in the launch directory
    best = Path(_summary(proc.stdout, "best checkpoint"))
    run_dir = best.parent.parent
    assert re.fullmatch(
        r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", str(run_dir.relative_to(tmp_path / "outputs"))
    )
    assert Path(_summary(proc.stdout, "last checkpoint")) == run_dir / "checkpoints" / "last.ckpt"
    assert Path(_summary(proc.stdout, "resolved config")) == run_dir / "config_resolved.yaml"
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    m = re.search(
        r"^MLflow run:\s+(\w+) in experiment 'defectscope-smoke' \(id \d+\) at (\S+)$", proc.stdout, re.M
    )
    assert m and m.group(2) == uri, proc.stdout[-2000:]
    run_id = m.group(1)

    for ckpt_file in (best, run_dir / "checkpoints" / "last.ckpt"):
        info = torch.load(ckpt_file, map_location="cpu", weights_only=True)["defectscope"]
        assert info["mlflow_run_id"] == run_id and info["mlflow_tracking_uri"] == uri
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "gapcnn" and run.data.params["trainer.max_epochs"] == "3"
    # what the threshold costs: in the summary, threshold_report.txt (an MLflow artifact) and a tag
    assert re.search(r"^threshold:\s+threshold \S+ for recall >= 95\.0 %: recall", proc.stdout, re.M)
    report = (run_dir / "threshold_report.txt").read_text()
    assert "false-reject rate" in report and "(validation images, PyTorch fp32)" in report
    warned = "WARNING: the recall target" in report
    assert (run.data.tags["defectscope.threshold_warning"] != "none") == warned
    history = MlflowClient(uri).get_metric_history(run_id, "val/bal_acc")
    assert len(history) == 3  # one value per epoch
    test_acc = run.data.metrics["test/acc"]

    # evaluate: the checkpoint's own data config and preprocessing reproduce the training's test metrics
    ev = _run([*defectscope_cmd, "evaluate", f"ckpt_path={best}", "threads=1"], tmp_path, cli_env)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads(Path(_summary(ev.stdout, "metrics file")).read_text())["metrics"]
    assert metrics["test/acc"] == pytest.approx(test_acc, abs=1e-6)
    assert metrics["test/threshold"] == pytest.approx(run.data.metrics["test/threshold"], abs=1e-6)
    assert {"test/escape_rate", "test/false_reject_rate", "test/auroc"} <= set(metrics)

    missing = _run([*defectscope_cmd, "evaluate", f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path, cli_env)
    assert missing.returncode == 2 and "nope.ckpt" in missing.stderr and "does not exist" in missing.stderr

    # the Trainer's settings are refused before a new lot is read (its broken image would be told first)
    lot = tmp_path / "lot" / "good"
    lot.mkdir(parents=True)
    (lot / "broken.png").write_bytes(b"not a png")
    bad = _run(
        [*defectscope_cmd, "evaluate", f"ckpt_path={best}", "data=folder", f"data.source.root={lot.parent}",
         "trainer.devices=0"],
        tmp_path, cli_env,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith("defectscope evaluate: error: trainer: `Trainer(devices=0)`")
    )


@pytest.mark.slow
def test_multirun_sweep(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    proc = _run(
        [
            *defectscope_cmd,
            "train",
            "--multirun",
            "experiment=smoke",
            f"paths.data_dir={smoke_data_dir}",
            "seed=1,2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "test=false",
            "logger=none",
        ],
        tmp_path,
        cli_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "best.ckpt").is_file()
    seeds = [
        torch.load(j / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]["run_config"][
            "seed"
        ]
        for j in jobs
    ]
    assert seeds == [1, 2]


@pytest.mark.slow
def test_bad_config_fails_before_training(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    proc = _run(
        [
            *defectscope_cmd,
            "train",
            "experiment=smoke",
            f"paths.data_dir={smoke_data_dir}",
            "model=alexnet",
            "data.loader.min_size=32",
            "logger=none",
        ],
        tmp_path,
        cli_env,
    )
    assert proc.returncode == 2
    assert "data.loader.min_size" in proc.stderr and "model.min_input_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_trainer_settings_lightning_refuses_are_told_before_the_data(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Accelerator, devices, precision and unknown Trainer keys: one line from Lightning's own rules, before
    the synthetic set is generated and before the MLflow run opens (they were told after the data scan; an
    accelerator whose package is missing was a traceback)."""
    cases = {
        "trainer.accelerator=tpu": "trainer: Requirement 'torch_xla",
        "trainer.accelerator=mps": "trainer: `MPSAccelerator` can not run on your system",
        "trainer.devices=0": "trainer: `Trainer(devices=0)` value is not a valid input",
        "trainer.precision=banana": "trainer: Precision 'banana' is invalid.",
        "+trainer.max_epoch=3": "trainer.max_epoch: not an argument of Lightning's Trainer; did you mean "
        "trainer.max_epochs",
    }
    for override, message in cases.items():
        data = tmp_path / "data"
        proc = _run(
            [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={data}", override],
            tmp_path,
            cli_env,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope train: error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert not data.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_data_typo_opens_no_mlflow_run(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """data.* keys are checked before the MLflow run opens: a typo leaves no FAILED run and no store."""
    args = [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}"]
    proc = _run([*args, "+data.source.colour=red"], tmp_path, cli_env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "defectscope train: error: data.source: unknown key(s) ['colour'] for kind=synthetic"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_run_whose_weights_turn_nan_stops_with_one_line(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """A SAM radius of 1e308 sends every weight to NaN in the first steps; the run trained all its epochs
    before and ended on "threshold: nan is not a finite number", with NaN weights in last.ckpt."""
    args = [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}", "logger=none"]
    proc = _run([*args, "optim.sam_rho=1e308", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("defectscope train: error: training diverged in epoch 0: ")
    ), proc.stderr[-2000:]
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # nothing NaN was saved


LITE = "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
MODELS = f"alexnet, {LITE}, lenet, nf_resnet, resnet_small, tiny"


@pytest.mark.parametrize(
    ("command", "overrides", "expected"),
    [
        ("train", ["data=nosuch"], "data=nosuch: no such option in config group 'data'; valid: csv, elpv, folder, synthetic"),
        ("train", ["data=folder/x"], "data=folder/x: no such option in config group 'data'; valid: csv, elpv, folder, synthetic"),
        ("train", ["experiment=nosuch"], "config group 'experiment'; valid: demo, elpv, elpv_scratch, smoke, synthetic"),
        ("train", ["--multirun", "model=tiny,nosuch"], f"model=nosuch: no such option in config group 'model'; valid: {MODELS}"),
        ("search", ["search=nosuch"], "search=nosuch: no such option in config group 'search'; valid: default, elpv_proxy, smoke"),
        ("scan", ["data=nosuch"], "data=nosuch: no such option in config group 'data'; valid: csv, elpv, folder, synthetic"),
        ("train", ["trainer.nosuch=1"], "trainer.nosuch: no such setting (a new key is added with +trainer.nosuch=VALUE)"),
        # a newcomer was told to append the misspelt key (Hydra's "To append to your config use +...")
        ("train", ["data.source.rot=x"], "data.source.rot: no such setting; did you mean data.source.root? (a new"),
        ("train", ["data.sourc.root=x"], "data.sourc.root: no such setting: data has no 'sourc'; did you mean data.source?"),
        ("search", ["search.n_trial=3"], "search.n_trial: no such setting; did you mean search.n_trials, "),
        ("train", ["a=[1,"], "a=[1,: no viable alternative at input"),
        ("train", ["--config-name=nosuch"], "Cannot find primary config 'nosuch'"),
        ("train", ["--multirun", "--cfg", "job"], "Only one of --run, --multirun, --cfg"),
    ],
)  # fmt: skip
def test_composition_errors_are_one_line(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path, command: str, overrides: list[str],
    expected: str,
) -> None:  # fmt: skip
    """Hydra's own multi-line composition errors (search path, exit 1) become one line, exit 2, before any work."""
    proc = _run([*defectscope_cmd, command, *overrides], tmp_path, cli_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"defectscope {command}: error: ") and expected in lines[0], lines[0]
    assert "_base" not in lines[0] and "provider=" not in lines[0] and "defaults list" not in lines[0]
    assert not list(tmp_path.rglob("*.yaml")) or overrides[0] == "--multirun"  # no run folder: nothing ran
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_key_in_the_wrong_case_gets_the_key_not_advice_to_add_it(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    """``optim.optimizer.LR`` is ``lr``: adding ``+optim.optimizer.LR`` would only be refused later (review)."""
    proc = _run([*defectscope_cmd, "train", "optim.optimizer.LR=0.1"], tmp_path, cli_env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        "optim.optimizer.LR: no such setting; did you mean optim.optimizer.lr?"
    ), proc.stderr


def test_a_typed_recipe_that_does_not_exist_is_refused(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The recipe group is optional (it follows ``model``), so Hydra skipped a wrong name silently;
    refused before anything runs, in a sweep (its first job trained in full) and with --cfg too."""
    expected = f"model_recipe=nosuch: no such option in config group 'model_recipe'; valid: alexnet, {LITE}, nf_resnet"
    for overrides in (
        ["model_recipe=nosuch"],
        ["--multirun", "model_recipe=alexnet,nosuch"],
        ["--cfg", "job", "model_recipe=nosuch"],
    ):
        proc = _run([*defectscope_cmd, "train", *overrides], tmp_path, cli_env, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert expected in proc.stderr and "~model_recipe trains without it" in proc.stderr
        assert not any(tmp_path.iterdir())  # no run folder
    # a recipe of the user's own (--config-dir) is a recipe
    mine = tmp_path / "my_conf" / "model_recipe"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nseed: 123\n")
    args = ["train", "--config-dir", str(tmp_path / "my_conf"), "model_recipe=mine", "--cfg", "job"]
    proc = _run([*defectscope_cmd, *args], tmp_path, cli_env, timeout=120)
    assert proc.returncode == 0 and "seed: 123" in proc.stdout, proc.stderr


def test_an_option_a_config_file_chose_is_named_as_such(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: nosuch\n")
    args = [*defectscope_cmd, "train", "--config-dir", str(tmp_path / "my_conf"), "experiment=mine"]
    proc = _run(args, tmp_path, cli_env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
        f"model=nosuch: no such option in config group 'model' (chosen by a config's defaults list); valid: {MODELS}"
        in proc.stderr
    )


def test_full_error_asked_for_keeps_hydras_exception(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    proc = _run(
        [*defectscope_cmd, "train", "data=nosuch"], tmp_path, {**cli_env, "HYDRA_FULL_ERROR": "1"}, 120
    )
    assert proc.returncode == 1 and "MissingConfigException" in proc.stderr


@pytest.mark.parametrize("user", [None, "0", "1"])
def test_the_job_sees_the_users_hydra_full_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, user: str | None
) -> None:
    """Composition runs with HYDRA_FULL_ERROR=1; the job (and the DDP ranks it starts, which inherit the
    environment) runs with the user's own setting, so its errors print as Hydra prints them."""
    from defectscope.training.app import _run as run_app

    if user is None:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", user)
    monkeypatch.chdir(tmp_path)
    seen: list[str | None] = []

    def job(cfg: object) -> dict[str, float]:
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))
        return {}

    assert run_app("train", "train", ["experiment=smoke", "hydra.run.dir=run"], job) == 0
    assert seen == [user] and os.environ.get("HYDRA_FULL_ERROR") == user


def test_a_strategy_given_as_an_object_passes_the_trainer_check() -> None:
    """`+trainer.strategy={_target_: ...DDPStrategy, ...}` (how a DDP timeout or backend is set) is built before
    Lightning's check, as the real Trainer's instantiate builds it; refused as "an invalid strategy name" before."""
    from defectscope.training.trainer_check import check_trainer

    strategy = {"_target_": "pytorch_lightning.strategies.DDPStrategy", "find_unused_parameters": True}
    check_trainer(
        {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 2, "strategy": strategy}
    )
    with pytest.raises(ValueError, match=r"trainer: .*devices=0"):
        check_trainer(
            {
                "_target_": "pytorch_lightning.Trainer",
                "accelerator": "cpu",
                "devices": 0,
                "strategy": strategy,
            }
        )
