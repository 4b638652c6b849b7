"""Training against a real `mlflow server` on 127.0.0.1: the run reads back complete; an unreachable
server stops training before the first step; a server lost mid-run costs no checkpoint, and the
buffered metrics can be sent once it is back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_server(
    root: Path, env: dict[str, str], port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real tracking server with its own SQLite store and proxied artifact folder under ``root``."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [str(mlflow_exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not come up in 90 s"
                time.sleep(0.3)
            yield uri, proc
        finally:
            stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server's own process group (uvicorn worker and job runner included)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _train(cmd: list[str], cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _artifacts(client: object, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for a in client.list_artifacts(run_id, path):  # type: ignore[attr-defined]
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_train_against_real_server(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path / "server", cli_env) as (uri, _):
        proc = _train(defectscope_cmd, tmp_path, cli_env, "experiment=smoke", f"paths.data_dir={smoke_data_dir}",
                      f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("defectscope-smoke")
        assert exp is not None
        (run,) = client.search_runs([exp.experiment_id])
        run_id = run.info.run_id
        assert f"MLflow run:      {run_id} in experiment 'defectscope-smoke'" in proc.stdout
        assert run.info.status == "FINISHED"

        params = run.data.params
        assert params["model.name"] == "gapcnn" and params["seed"] == "0"
        assert params["data.source.n"] == "240" and params["logger.tracking_uri"] == uri
        assert params["threshold.target_recall"] == "0.95"
        for key in ("val/bal_acc", "val/acc", "val/f1_macro", "val/auroc", "val/threshold", "train/loss",
                    "val/precision/scratch", "val/recall/good"):  # fmt: skip
            history = client.get_metric_history(run_id, key)
            assert len(history) == 3, key  # once per epoch
        for key in ("test/acc", "test/bal_acc", "test/auroc", "test/escape_rate", "test/false_reject_rate"):
            assert len(client.get_metric_history(run_id, key)) == 1, key
        assert 0.0 <= run.data.metrics["test/escape_rate"] <= 1.0

        files = set(_artifacts(client, run_id))
        assert {"plots/confusion.png", "plots/roc_pr.png", "plots/misclassified.png", "checkpoints/best.ckpt",
                "config_resolved.yaml", "data_report.txt"} <= files  # fmt: skip
        local = Path(client.download_artifacts(run_id, "checkpoints/best.ckpt", str(tmp_path / "dl")))
        info = torch.load(local, map_location="cpu", weights_only=True)["defectscope"]
        assert info["mlflow_run_id"] == run_id and info["mlflow_tracking_uri"] == uri
        png = Path(client.download_artifacts(run_id, "plots/roc_pr.png", str(tmp_path / "dl")))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "server" / "artifacts").is_dir()  # proxied to the server's artifact folder


def test_unreachable_server_fails_before_the_first_step(
    defectscope_cmd: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**cli_env, "MLFLOW_TRACKING_URI": uri}
    t0 = time.perf_counter()
    proc = _train(defectscope_cmd, tmp_path, env, "experiment=smoke", f"paths.data_dir={tmp_path / 'data'}")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    assert f"MLflow tracking server {uri} cannot be reached" in proc.stderr
    assert "logger=none" in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 45  # interpreter start-up and imports; no retries with back-off
    assert not (tmp_path / "data").exists()  # stopped before even generating the data
    assert not list(tmp_path.rglob("*.ckpt")) and "Epoch" not in proc.stdout + proc.stderr


def test_server_lost_mid_run_keeps_training_and_checkpoints(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from defectscope.training.tracking import UNSENT_FILE, replay_unsent

    run_dir = tmp_path / "run"
    port = free_port()
    with (
        mlflow_server(tmp_path / "server", cli_env, port) as (uri, server),
        open(tmp_path / "train.out", "w") as fo,
        open(tmp_path / "train.err", "w") as fe,
    ):
        train = subprocess.Popen(
            [*defectscope_cmd, "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}", "model=lenet",
             "trainer.max_epochs=4", "trainer.enable_progress_bar=false", f"logger.tracking_uri={uri}",
             f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=cli_env, stdout=fo, stderr=fe,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not (run_dir / "checkpoints" / "last.ckpt").exists():
                assert train.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            stop_server(server)  # the server dies after the first epoch
            train.wait(timeout=240)
        finally:
            if train.poll() is None:
                train.kill()
                train.wait()
    out, err = (tmp_path / "train.out").read_text(), (tmp_path / "train.err").read_text()
    assert train.returncode == 0, err[-3000:]
    assert (out + err).count("training continues, metrics are buffered") == 1  # warned once
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3
    run_id = ckpt["defectscope"]["mlflow_run_id"]
    spool = run_dir / UNSENT_FILE
    assert spool.is_file() and f"MLflow unsent:   {spool}" in out

    # the server comes back (same store, same port): the buffered metrics and artifacts are sent
    with mlflow_server(tmp_path / "server", cli_env, port) as (uri, _):
        client = MlflowClient(uri)
        before = len(client.get_metric_history(run_id, "val/bal_acc"))
        assert 1 <= before < 4
        n_metrics, n_artifacts = replay_unsent(spool)
        assert n_metrics > 0 and n_artifacts >= 1
        assert len(client.get_metric_history(run_id, "val/bal_acc")) == 4
        assert "checkpoints/best.ckpt" in _artifacts(client, run_id)
        assert client.get_run(run_id).info.status == "FINISHED"


def test_a_store_mlflow_cannot_open_is_named_before_the_run(tmp_path: Path) -> None:
    """An unknown scheme was MLflow's model-registry paragraph; a store folder that cannot be made was a bare
    OS error without the setting (attack)."""
    from defectscope.training.reachability import TRAINING_ADVICE, TrackingUnavailableError, check_reachable

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {
        "ftp://host/x": "MLflow has no tracking store for ftp://host/x (scheme 'ftp'); expected sqlite:///PATH.db",
        f"sqlite:///{blocker}/x.db": f"MLflow store sqlite:///{blocker}/x.db: its folder {blocker} cannot be made (",
        f"file://{blocker}/runs": f"MLflow store file://{blocker}/runs: its folder {blocker}/runs cannot be made (",
    }
    for uri, expected in cases.items():
        with pytest.raises(TrackingUnavailableError) as caught:
            check_reachable(uri, 1.0)
        message = str(caught.value)
        assert message.startswith(expected) and message.endswith(TRAINING_ADVICE), message
    check_reachable(f"sqlite:///{tmp_path}/store/mlflow.db", 1.0)  # a store that can be made is made
    assert (tmp_path / "store").is_dir()
    check_reachable(f"postgresql+psycopg2://user@127.0.0.1:{free_port()}/db", 1.0)  # MLflow's client opens it
