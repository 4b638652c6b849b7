"""A training killed with SIGKILL resumes with ckpt_path=last: the epoch count continues, same MLflow run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from signal_runs import signal_when

EPOCHS = 4


@pytest.mark.slow
def test_resume_after_kill(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "r1"  # a stable run directory: what makes ckpt_path=last resumable
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [
        *defectscope_cmd,
        "train",
        "experiment=smoke",
        f"paths.data_dir={smoke_data_dir}",
        f"hydra.run.dir={run_dir}",
        "model=lenet",  # about a second per epoch here: room to kill between checkpoints
        f"trainer.max_epochs={EPOCHS}",
        "trainer.enable_progress_bar=false",
        "ckpt_path=last",  # nothing to resume yet: starts fresh (with a warning)
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not last.exists():
                assert proc.poll() is None, f"ended before its first checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    killed = torch.load(last, map_location="cpu", weights_only=True)
    done_epochs = killed["epoch"] + 1  # epochs completed when last.ckpt was written
    run_id = killed["defectscope"]["mlflow_run_id"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # a SIGKILL leaves the run open
    assert done_epochs < EPOCHS

    # the checkpoint restores the optimizer's LR groups: a changed finetune plan is refused up front
    from defectscope.training.config import TrainingConfigError
    from defectscope.training.train import read_resume

    assert read_resume(str(last), killed["hyper_parameters"]["finetune"])["mlflow_run_id"] == run_id
    with pytest.raises(
        TrainingConfigError, match=r"finetune\.backbone_lr_scale, finetune\.layer_decay are 1, 0\.5"
    ):
        read_resume(str(last), {**killed["hyper_parameters"]["finetune"], "layer_decay": 0.5})

    resumed = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS - 1 and final["defectscope"]["mlflow_run_id"] == run_id

    # the same MLflow run continued: one run, every epoch's metrics once, steps increasing
    exp = client.get_experiment_by_name("defectscope-smoke")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    epochs = [m.value for m in client.get_metric_history(run_id, "epoch")]
    history = client.get_metric_history(run_id, "val/bal_acc")
    steps = [m.step for m in history]
    assert len(history) == EPOCHS and steps == sorted(set(steps)), (steps, epochs)
    assert client.get_run(run_id).data.tags["defectscope.resumed_from"] == str(last)
    assert "test/acc" in client.get_run(run_id).data.metrics


@pytest.mark.parametrize(("extra", "best_epoch"), [([], 0), (["trainer.check_val_every_n_epoch=2"], 1)])
def test_last_checkpoint_follows_every_epoch(
    defectscope_cmd: list[str],
    cli_env: dict[str, str],
    smoke_data_dir: Path,
    tmp_path: Path,
    extra: list[str],
    best_epoch: int,
) -> None:
    """last.ckpt is what a resume starts from, so it must be the latest epoch even when the monitored
    metric stopped improving (Lightning alone writes it only with a new best), also in an epoch
    without validation."""
    run_dir = tmp_path / "run"
    args = [
        *defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}", "logger=none",
        f"hydra.run.dir={run_dir}", "model=lenet", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
        "callbacks=minimal", "callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min", *extra,
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch  # "epoch", minimised: the first validated epoch stays the best
    assert last["epoch"] == 2
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert Path(state["best_model_path"]).name == "best.ckpt"


@pytest.mark.slow
def test_resuming_with_a_longer_schedule_is_one_line_before_any_work(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """The checkpoint's scheduler state (its horizon too) replaces the new one on resume: with more epochs
    one-cycle would fail past its last step mid-epoch, so a changed horizon is refused before the MLflow
    run is reopened or any data is read."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    common = [
        *defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}", "model=lenet",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    first = [*common, f"hydra.run.dir={run_dir}", "trainer.max_epochs=1"]
    proc = subprocess.run(first, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    run_id = torch.load(last, map_location="cpu", weights_only=True)["defectscope"]["mlflow_run_id"]
    longer = [*common, f"hydra.run.dir={tmp_path / 'again'}", "trainer.max_epochs=2", f"ckpt_path={last}"]
    for extra, change in [
        ([], "trainer.max_epochs 1 -> 2"),
        (
            ["scheduler=cosine"],
            "scheduler torch.optim.lr_scheduler.OneCycleLR -> torch.optim.lr_scheduler.CosineAnnealingLR",
        ),
        (["data.batch_size=4"], "data.batch_size 16 -> 4"),
    ]:
        proc = subprocess.run(
            [*longer, *extra], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
        assert line.startswith(
            f"defectscope train: error: ckpt_path: {last} was trained on a schedule that this run changes ("
        )
        assert change in line and "Traceback" not in proc.stderr
    # another network or other classes: a size-mismatch traceback after the scan, with the finished run
    # reopened and marked FAILED (helper report, 2026-12-07); a renamed class folder resumed without a word
    renamed = tmp_path / "renamed"
    shutil.copytree(
        smoke_data_dir / "synthetic-smoke", renamed, ignore=shutil.ignore_patterns("manifest.csv")
    )
    (renamed / "spot").rename(renamed / "dot")
    same_length = [
        *common,
        f"hydra.run.dir={tmp_path / 'again'}",
        "trainer.max_epochs=1",
        f"ckpt_path={last}",
    ]
    as_folder = ["data=folder", "~data.source.n", "~data.source.min_size", "~data.source.max_size"]
    for extra, start, words in [
        (
            ["model=tiny"],
            f"ckpt_path: {last} was trained with another network (",
            ["weight(s) differ, e.g. ", "the settings that differ: model.norm_groups, model.stages"],
        ),
        (["data.loader.channels=3"], "data.loader.channels is 3 but", ["trained on 1-channel images"]),
        (
            [*as_folder, f"data.source.root={renamed}"],
            f"ckpt_path: {last} was trained on classes ['good', 'scratch', 'spot', 'crack']",
            ["the data give ['crack', 'dot', 'good', 'scratch']", "resume on data with those class folders"],
        ),
        (  # the same folders listed in another order (a folder source sorts them): the output units would swap
            [*as_folder, f"data.source.root={smoke_data_dir / 'synthetic-smoke'}"],
            f"ckpt_path: {last} was trained on classes ['good', 'scratch', 'spot', 'crack']",
            ["set data.source.classes=[good,scratch,spot,crack] for the checkpoint's order"],
        ),
    ]:
        proc = subprocess.run(
            [*same_length, *extra], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
        assert line.startswith(f"defectscope train: error: {start}"), line
        assert all(w in line for w in words) and "Traceback" not in proc.stderr, line
        assert "scan" not in proc.stdout.lower(), proc.stdout[-2000:]  # refused before the images are decoded
    assert last.read_bytes() == before and not (tmp_path / "again" / "checkpoints").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "defectscope.resumed_from" not in run.data.tags
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no empty FAILED run either


def test_the_schedule_horizon_is_checked_again_when_the_optimizers_are_built() -> None:
    """The backstop for what the config does not show (e.g. more images, so more batches per epoch)."""
    from defectscope.training.config import TrainingConfigError
    from defectscope.training.optimization import check_resumed_horizon

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    four = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4)
    check_resumed_horizon([four.state_dict()], four, "a.ckpt")  # the same horizon
    check_resumed_horizon(None, four, "a.ckpt")  # nothing resumed
    saved = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=2).state_dict()
    with pytest.raises(
        TrainingConfigError,
        match=r"^ckpt_path: a\.ckpt holds a OneCycleLR schedule of total_steps=2 but this run's is total_steps=4 ",
    ):
        check_resumed_horizon([saved], four, "a.ckpt")


@pytest.mark.slow
def test_a_sigterm_stops_training_with_one_line_naming_the_checkpoint(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """A scheduler's SIGTERM: Lightning ended the fit with exit status 0 and no word (the run looked finished,
    its MLflow run FAILED); now exit 130, the run KILLED, one line with the checkpoint to resume from."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}",
            f"hydra.run.dir={run_dir}", "model=lenet", "trainer.max_epochs=500", "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, err = signal_when(proc, last.exists, "checkpoint", 120)
    assert err is not None and proc.returncode == 130 and "Traceback" not in err, (err or "")[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("defectscope train: stopped by SIGTERM in epoch ") and line.endswith(
        f"ckpt_path={last}"
    )
    run_id = torch.load(last, map_location="cpu", weights_only=True)["defectscope"]["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"


def test_a_resume_may_change_what_no_weight_depends_on() -> None:
    """The network check compares the weights' names and shapes: it first compared the raw ``model.*`` settings,
    which refused a dropout change, ``model.weights=null`` (the only way on a PC without the pretrained package)
    and every checkpoint recorded before a setting existed (review, 2026-12-07)."""
    from defectscope.training.config import TrainingConfigError
    from defectscope.training.model_probe import check_model_builds
    from defectscope.training.resume import check_same_network

    spec = {"name": "gapcnn", "stages": [{"channels": 4, "kernel": 3, "stride": 2}], "drop_rate": 0.0}
    built = check_model_builds(spec, 1, 3)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in built.state_dict().items()},
        "hyper_parameters": {"run_config": {"model": {k: v for k, v in spec.items() if k != "drop_rate"}}},
    }
    info = {"loader": {"channels": 1}, "model_kwargs": {"num_classes": 3}, "class_names": ["a", "b", "c"]}
    check_same_network(
        ckpt, info, {**spec, "drop_rate": 0.3}, 1, "x.ckpt"
    )  # recorded without it, changed: fine
    wider = {**spec, "stages": [{"channels": 8, "kernel": 3, "stride": 2}]}
    with pytest.raises(
        TrainingConfigError, match=r"another network \(\d+ weight\(s\) differ, e.g. .*model.stages"
    ):
        check_same_network(ckpt, info, wider, 1, "x.ckpt")
    with pytest.raises(
        TrainingConfigError, match=r"data\.loader\.channels is 3 but x\.ckpt was trained on 1-channel"
    ):
        check_same_network(ckpt, info, spec, 3, "x.ckpt")
