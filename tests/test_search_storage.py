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
    # elsewhere, or unsure: left to the heartbeat (two machines may share a hostname and the root PID
    # namespace's number; only the boot id tells them apart, so another boot is not proof of a reboot)
    assert not worker_gone({**here, "pid": os.getppid(), "boot": "another boot"})
    assert not worker_gone({**here, "pid": _dead_pid(), "host": "another-host"})
    assert not worker_gone({**here, "pid": _dead_pid(), "pid_ns": "pid:[1]"})  # another container
    for mark in (None, "text", {**here, "pid": "12"}, {**here, "pid": True}, {**here, "pid": -1}):
        assert not worker_gone(mark)


def _storage(db: Path, retries: int = 1) -> RDBStorage:
    return RDBStorage(
        f"sqlite:///{db}",
        heartbeat_interval=60,
        grace_period=3600,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries)
        if retries
        else None,
    )


def _running(study: optuna.Study, marks: list[dict[str, object]]) -> None:
    dist = {"model.act": CategoricalDistribution(["relu", "silu", "gelu"])}
    for i, mark in enumerate(marks):
        study.add_trial(
            optuna.trial.create_trial(
                params={"model.act": ["relu", "silu", "gelu"][i % 3]}, distributions=dist,
                state=TrialState.RUNNING, user_attrs={PROCESS_ATTR: mark},
            )
        )  # fmt: skip


@posix_proc
def test_a_killed_workers_trial_is_failed_and_queued_again(tmp_path: Path) -> None:
    storage = _storage(tmp_path / "s.db")
    study = optuna.create_study(study_name="s", storage=storage)
    _running(study, [{**process_mark(), "pid": _dead_pid()}, {**process_mark(), "host": "elsewhere"}])
    assert fail_orphans(study, storage) == ([0], [0]) and fail_orphans(study, storage) == ([], [])  # once
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.FAIL, 1: TrialState.RUNNING, 2: TrialState.WAITING}, states
    retry = study.get_trials()[2]
    assert retry.params == {"model.act": "relu"} and retry.system_attrs["failed_trial"] == 0
    assert study.get_trials()[0].datetime_complete is not None
    # no retries configured: failed, and said not to be queued
    plain = _storage(tmp_path / "p.db", retries=0)
    alone = optuna.create_study(study_name="p", storage=plain)
    _running(alone, [{**process_mark(), "pid": _dead_pid()}])
    assert fail_orphans(alone, plain) == ([0], []) and len(alone.get_trials()) == 1


RACE = """
import sys, time
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from defectscope.search.workers import fail_orphans
storage = RDBStorage(sys.argv[1], heartbeat_interval=60, grace_period=3600,
                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
study = optuna.load_study(study_name="s", storage=storage)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(fail_orphans(study, storage)[0])
"""


@posix_proc
def test_two_commands_starting_together_retry_an_orphan_once(tmp_path: Path) -> None:
    """Optuna's read-then-write let both commands fail the same trial and both queue it again (3 rounds in
    8 in a review): the conditional UPDATE lets one claim it."""
    import json
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "inspect"),
                                                                         os.environ.get("PYTHONPATH")]))}  # fmt: skip
    for round_ in range(3):
        db = tmp_path / f"r{round_}.db"
        study = optuna.create_study(study_name="s", storage=_storage(db))
        _running(study, [{**process_mark(), "pid": _dead_pid()} for _ in range(20)])
        start = str(time.time() + 4.0)
        procs = [
            subprocess.Popen([sys.executable, "-c", RACE, f"sqlite:///{db}", start], env=env, stdout=subprocess.PIPE,
                             text=True)
            for _ in range(2)
        ]  # fmt: skip
        claimed = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
        assert sorted(claimed[0] + claimed[1]) == list(range(20))  # each orphan failed by exactly one
        retries = [
            t.system_attrs["failed_trial"] for t in study.get_trials() if t.state == TrialState.WAITING
        ]
        assert sorted(retries) == list(range(20))  # and queued again exactly once


def test_which_sqlite_files_are_an_optuna_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared table name (``trials``) made another program's file look like Optuna's, and a ``file:`` URI
    was not looked at (a review wrote Optuna's tables into both); a file a worker is creating this instant
    holds only ``studies`` and is Optuna's."""
    import sqlite3
    from contextlib import closing

    from defectscope.search.errors import SearchConfigError
    from defectscope.search.storage import check_sqlite_owner

    monkeypatch.chdir(tmp_path)
    with closing(sqlite3.connect("clinic.db")) as db:
        db.executescript("CREATE TABLE trials (id INTEGER, drug TEXT); CREATE TABLE visits (id INTEGER);")
    with closing(sqlite3.connect("half.db")) as db:
        db.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY, study_name VARCHAR(512))")
    optuna.create_study(study_name="s", storage="sqlite:///full.db")
    (tmp_path / "empty.db").write_bytes(b"")
    for url in ("sqlite:///clinic.db", f"sqlite:///file:{tmp_path}/clinic.db?mode=rw&uri=true"):
        with pytest.raises(
            SearchConfigError, match=r"clinic\.db is another program's database \(tables trials, visits\)"
        ):
            check_sqlite_owner(url)
    for url in ("sqlite:///half.db", "sqlite:///full.db", "sqlite:///file:full.db?uri=true", "sqlite:///empty.db",
                "sqlite:///absent.db"):  # fmt: skip
        check_sqlite_owner(url)
