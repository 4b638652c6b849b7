"""DDP with two CPU processes (gloo) end to end: disjoint shards, one MLflow run, metrics logged once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.mark.slow
def test_ddp_two_cpu_processes(
    defectscope_cmd: list[str],
    cli_env: dict[str, str],
    smoke_data_dir: Path,
    tmp_path: Path,
    compose_train: Callable[..., Any],
) -> None:
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*defectscope_cmd, "train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
         f"paths.data_dir={smoke_data_dir}", "debug.dump_indices=true", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    epochs = 3

    # each rank saw its own part of the training split, together all of it, every epoch
    train_size = None
    for epoch in range(epochs):
        shards = [
            json.loads((run_dir / "debug" / f"train_indices_rank{r}_epoch{epoch}.json").read_text())
            for r in (0, 1)
        ]
        assert [s["world_size"] for s in shards] == [2, 2]
        a, b = (s["indices"] for s in shards)
        assert a and b and not set(a) & set(b)
        assert len(a) + len(b) == len(set(a) | set(b))  # no duplicates within a rank either
        train_size = train_size or len(set(a) | set(b))
        assert len(set(a) | set(b)) == train_size
    cfg = compose_train(
        ["experiment=smoke", f"paths.data_dir={smoke_data_dir}", f"paths.output_dir={tmp_path}"]
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert train_size == len(dm.dataset("train"))  # the whole training split: nothing dropped or padded

    # rank 0 alone talked to MLflow: one run, one value per epoch for epoch-level metrics
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("defectscope-smoke")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    for key in ("val/bal_acc", "val/threshold", "train/loss", "train/images_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == epochs and len({m.step for m in history}) == epochs, key
    assert len(client.get_metric_history(run.info.run_id, "test/acc")) == 1
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["defectscope"]["mlflow_run_id"] == run.info.run_id
    assert log.count("== defectscope train finished") == 1  # one summary, from rank 0


@pytest.mark.slow
def test_sigterm_stops_both_ranks_with_one_line(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """A scheduler's SIGTERM to a DDP run: exit 130, the one line naming the checkpoint to resume from (from
    rank 0 only), the MLflow run KILLED, and no rank left running."""
    from mlflow.tracking import MlflowClient

    from signal_runs import signal_when

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*defectscope_cmd, "train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
            f"paths.data_dir={smoke_data_dir}", f"hydra.run.dir={run_dir}", "model=lenet", "trainer.max_epochs=500",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = signal_when(proc, last.exists, "checkpoint", 240)
    assert out is not None and err is not None
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("defectscope train: stopped by SIGTERM in epoch ")
    assert err.count("stopped by SIGTERM") == 1 and err.strip().endswith(f"ckpt_path={last}")
    ranks = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert ranks.stdout == "", ranks.stdout  # rank 1 went with rank 0
    run_id = torch.load(last, map_location="cpu", weights_only=True)["defectscope"]["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"
