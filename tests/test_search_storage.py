"""The search's database and its workers: another program's SQLite file and a read-only study store are
refused in one line through the real `defectscope search` entry point, and a trial whose worker process on
this machine is gone is failed and queued again at once (real Optuna storage, real processes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from defectscope.search.workers import PROCESS_ATTR, fail_orphans, process_mark, worker_gone

posix_proc = pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc"
)


def _search(tmp_path: Path, smoke_data_dir: Path, storage: str, capsys: pytest.CaptureFixture[str]) -> str:
    from defectscope.search.app import search_main

    args = ["experiment=smoke", "model=resnet_small", "search=smoke", f"paths.data_dir={smoke_data_dir}"]
    rc = search_main([*args, f"search.storage={storage}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("defectscope search: error:")]
    assert len(lines) == 1, err
    assert not list(tmp_path.rglob("trials"))  # no trial started
    return lines[0]


def test_another_programs_database_is_refused_untouched(
    smoke_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``search.storage=sqlite:///mlflow.db`` (the tracking store beside search.db) got Optuna's tables
    written into it, then a misleading schema-version error (a newcomer's trial)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()  # a real MLflow store
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    line = _search(tmp_path, smoke_data_dir, f"sqlite:///{store}", capsys)
    assert f"search.storage: {store} is another program's database (tables " in line
    assert "name a file of its own, e.g. sqlite:///search.db" in line
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_a_study_store_that_refuses_writes_is_one_line(
    smoke_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing study database on a read-only mount opened, then failed in create_study with three
    tracebacks; SQLite's read-only open mode gives the same refusal without a mount."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    optuna.create_study(study_name="earlier", storage=f"sqlite:///{tmp_path}/search.db")
    line = _search(
        tmp_path, smoke_data_dir, f"'sqlite:///file:{tmp_path}/search.db?mode=ro&uri=true'", capsys
    )
    assert "search.storage: cannot write study 'defectscope-smoke' to sqlite:///" in line
    assert line.endswith("attempt to write a readonly database")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@posix_proc
def test_only_a_certainly_gone_worker_counts_as_gone() -> None:
    here = process_mark()
    assert not worker_gone(here)  # this process
    assert not worker_gone({**here, "pid": os.getppid()})  # a live process
    assert worker_gone({**here, "pid": _dead_pid()})
    assert worker_gone({**here, "pid": os.getppid(), "boot": "an earlier boot"})  # rebooted since
    # elsewhere, or unsure: left to the heartbeat
    assert not worker_gone({**here, "pid": _dead_pid(), "host": "another-host"})
    assert not worker_gone({**here, "pid": _dead_pid(), "pid_ns": "pid:[1]"})  # another container
    for mark in (None, "text", {**here, "pid": "12"}, {**here, "pid": True}, {**here, "pid": -1}):
        assert not worker_gone(mark)


@posix_proc
def test_a_killed_workers_trial_is_failed_and_queued_again(tmp_path: Path) -> None:
    storage = RDBStorage(
        f"sqlite:///{tmp_path}/s.db",
        heartbeat_interval=60,
        grace_period=3600,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    study = optuna.create_study(study_name="s", storage=storage)
    dist = {"model.act": CategoricalDistribution(["relu", "silu"])}
    marks = {"relu": {**process_mark(), "pid": _dead_pid()}, "silu": {**process_mark(), "host": "elsewhere"}}
    for act, mark in marks.items():
        study.add_trial(
            optuna.trial.create_trial(
                params={"model.act": act}, distributions=dist, state=TrialState.RUNNING,
                user_attrs={PROCESS_ATTR: mark},
            )
        )  # fmt: skip
    assert fail_orphans(study) == [0] and fail_orphans(study) == []  # once
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.FAIL, 1: TrialState.RUNNING, 2: TrialState.WAITING}, states
    retry = study.get_trials()[2]
    assert retry.params == {"model.act": "relu"} and retry.system_attrs["failed_trial"] == 0
