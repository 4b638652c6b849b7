"""`defectscope search` end to end: real SQLite Optuna storage, real MLflow store, real exports and
runtime sessions, subprocesses as a user starts them (one search, two workers, kill and resume)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import onnx
import optuna
import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

# the smoke data, a tiny resnet space (conf/search/smoke.yaml), one short epoch per trial
SMOKE = [
    "experiment=smoke",
    "model=resnet_small",
    "search=smoke",
    "model.depths=[1,1,1,1]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]


def _args(data_dir: Path, *extra: str) -> list[str]:
    return ["search", *SMOKE, f"paths.data_dir={data_dir}", *extra]


def _study(tmp_path: Path, name: str = "defectscope-smoke") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/search.db")


def _running_trial_has_run_dir(db: Path) -> bool:
    """Read-only look at the search's Optuna store: opening it with Optuna would create the schema too,
    racing the search process that is creating it ("table ... already exists")."""
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            row = con.execute(
                "SELECT 1 FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'run_dir' LIMIT 1"
            ).fetchone()
    except sqlite3.OperationalError:  # tables not created yet, or the store is locked for a write
        return False
    return row is not None


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_search_three_trials(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from defectscope.runtime.files import file_sha256
    from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata

    out = tmp_path / "run"
    proc = _run([*defectscope_cmd, *_args(smoke_data_dir, f"hydra.run.dir={out}")], tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the study is plain Optuna: read back with Optuna's own API
    study = _study(tmp_path)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3 and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in done:
        assert t.values[0] == pytest.approx(t.user_attrs["curve"][-1][1])  # best val/bal_acc = best.ckpt's
        assert t.values[1] == t.user_attrs["latency_ms"] > 0
        assert t.user_attrs["flops"] > 0 and t.user_attrs["params"] > 0
        # the latency was measured on this trial's own export of its own best checkpoint
        onnx_file, ckpt = Path(t.user_attrs["onnx"]), Path(t.user_attrs["checkpoint"])
        meta = ModelMetadata.from_json(
            {p.key: p.value for p in onnx.load(onnx_file).metadata_props}[METADATA_KEY]
        )
        assert meta.checkpoint_sha256 == file_sha256(ckpt)
        lat = t.user_attrs["latency"]
        assert lat["batch"] == 4 and len(lat["batch_ms"]) == 5  # search=smoke: batch 4, 5 repeats
        side = t.params["data.loader.max_side"]
        assert max(lat["height"], lat["width"]) <= (side or 96)

    # pareto.csv = Optuna's front; the plot and summary exist
    with open(out / "pareto.csv", newline="", encoding="utf-8") as fh:
        front = list(csv.DictReader(fh))
    assert sorted(int(r["trial"]) for r in front) == sorted(t.number for t in study.best_trials)
    assert {"val/bal_acc", "latency_ms", "flops", "checkpoint", "param:model.widths[0]", "retrain"} <= set(
        front[0]
    )
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["trials"]["complete"] == 3 and len(summary["all"]) == 3

    # search.max_latency_ms: the best metric among trials that measure under the budget
    budget = sorted(t.values[1] for t in done)[1]
    under = [t for t in done if t.values[1] <= budget]
    best = max(under, key=lambda t: (t.values[0], -t.values[1]))
    pick = _report_with_budget(study, smoke_data_dir, budget, tmp_path / "budget")
    assert pick["trial"] == best.number and pick["latency_ms"] <= budget

    # MLflow: one parent run; each trial a nested run with its params, objectives, checkpoint and ONNX file
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("defectscope-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("defectscope.search") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    parent = parents[0].info.run_id
    assert {a.path for a in client.list_artifacts(parent)} >= {
        "pareto.csv",
        "front.png",
        "search_summary.json",
    }
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert len(children) == 3
    for t in done:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.data.metrics["search/latency_ms"] == pytest.approx(t.values[1])
        assert run.data.metrics["search/val/bal_acc"] == pytest.approx(t.values[0])
        assert run.data.params["model.widths"] == str([t.params[f"model.widths[{i}]"] for i in range(4)])
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "model.onnx"} <= names

    # the printed one-line retrain command composes exactly the trial's configuration
    member, retrain = _first_front_command(proc.stdout)
    shown = _run(
        [*defectscope_cmd, *shlex.split(retrain)[1:], "--cfg", "job"], tmp_path, cli_env, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    composed = OmegaConf.create(shown.stdout)
    for name, value in study.trials[member].params.items():
        assert OmegaConf.select(composed, name) == value, name

    # optuna-dashboard reads the same storage: the study, its trials and its front
    body = _dashboard(Path(defectscope_cmd[0]).parent / "optuna-dashboard", tmp_path, cli_env)
    assert body["name"] == "defectscope-smoke" and body["directions"] == ["maximize", "minimize"]
    assert len(body["trials"]) == 3
    assert sorted(t["number"] for t in body["best_trials"]) == sorted(t.number for t in study.best_trials)


def _report_with_budget(study: optuna.Study, data_dir: Path, budget: float, out: Path) -> dict[str, Any]:
    """The report of a finished study, asked with a latency budget afterwards."""
    from hydra import compose, initialize_config_dir

    from defectscope.search.report import write_report
    from defectscope.search.settings import SearchSettings
    from defectscope.search.space import parse_space

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = [
        *SMOKE,
        f"paths.data_dir={data_dir}",
        "paths.launch_dir=.",
        f"search.max_latency_ms={budget}",
    ]
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    settings = SearchSettings.from_config(OmegaConf.to_container(cfg.search, resolve=True))
    params = parse_space(OmegaConf.to_container(cfg.search.space, resolve=True))
    summary = write_report(study, cfg, params, settings, out)
    assert summary["best_under_budget"] is not None
    pick: dict[str, Any] = summary["best_under_budget"]
    return pick


def _first_front_command(stdout: str) -> tuple[int, str]:
    """(trial number, retrain command) of the first front member the summary prints."""
    number = None
    for line in stdout.splitlines():
        m = re.match(r"^\s+trial (\d+): ", line)
        if m:
            number = int(m.group(1))
        elif line.strip().startswith("retrain: ") and number is not None:
            return number, line.split("retrain: ", 1)[1]
    raise AssertionError(f"no front member with a retrain command in\n{stdout[-3000:]}")


def _dashboard(exe: Path, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Start optuna-dashboard on the study's storage and read the first study through its JSON API."""
    port = _free_port()
    args = [str(exe), f"sqlite:///{tmp_path}/search.db", "--port", str(port), "--host", "127.0.0.1"]
    dash = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    studies = json.loads(resp.read())["study_summaries"]
                break
            except OSError:
                assert dash.poll() is None, "optuna-dashboard exited"
                time.sleep(0.5)
        else:
            raise AssertionError("optuna-dashboard did not answer")
        assert [s["study_name"] for s in studies] == ["defectscope-smoke"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=30
        ) as r:
            detail: dict[str, Any] = json.loads(r.read())
        return detail
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_a_misspelt_metric_stops_the_search_after_one_trial(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """Only training knows its metric names, so the first validation tells; the search then stops with
    one line instead of failing trial after trial (three trainings lost before)."""
    args = _args(smoke_data_dir, "search.metric=val/bal_accuracy", f"hydra.run.dir={tmp_path}/run")
    proc = _run([*defectscope_cmd, *args], tmp_path, cli_env)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope search: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "search.metric: training logs no 'val/bal_accuracy'; did you mean val/bal_acc" in errors[0]
    assert "; its validation metrics are " in errors[0] and "val/bal_acc," in errors[0]
    # the study it created finished nothing: removed, so the corrected command may use the name (it was
    # refused before: "optimises ['val/bal_accuracy', ...]; choose another study name")
    assert errors[0].endswith(
        "(study 'defectscope-smoke' finished no trial and was removed: the next command starts it afresh)"
    )
    assert optuna.study.get_all_study_names(f"sqlite:///{tmp_path}/search.db") == []


def test_a_study_keeps_its_space(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """A changed choice list failed every trial with Optuna's "dynamic value space" traceback (and a changed
    range mixed two spaces silently); it is told before any trial, naming the key."""
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(
        study_name="defectscope-smoke",
        storage=f"sqlite:///{tmp_path}/search.db",
        directions=["maximize", "minimize"],
    )
    study.set_user_attr("defectscope_objectives", ["val/bal_acc", "latency_ms"])
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.act": "relu"},
            distributions={"model.act": CategoricalDistribution(["relu", "relu6"])},
            values=[0.5, 1.0],
        )
    )
    proc = _run(
        [*defectscope_cmd, *_args(smoke_data_dir, f"hydra.run.dir={tmp_path}/run")], tmp_path, cli_env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "defectscope search: error: search.space.model.act: study 'defectscope-smoke' sampled it from choices "
        "['relu', 'relu6'], this command from choices ['relu', 'silu']; a study keeps its space: give the same, "
        "or another search.study_name"
    )
    assert len(_study(tmp_path).get_trials()) == 1  # no trial ran


def test_sigterm_stops_a_trial_as_ctrl_c_and_queues_it_again(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (a scheduler, `kill`) left the trial RUNNING for ever and the resumed run reported it as such;
    an interrupted trial (the composed config's seed here) was never trained again."""
    cmd = [
        *defectscope_cmd,
        *_args(smoke_data_dir, "search.n_trials=1", "trainer.max_epochs=40"),
    ]  # still training
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while not _running_trial_has_run_dir(tmp_path / "search.db"):
            assert proc.poll() is None and time.monotonic() < deadline, "the trial never started"
            time.sleep(0.5)
        time.sleep(2.0)  # inside the training loop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-4000:]
    assert "interrupted; trial 0 stopped, marked failed and queued again. Run the same command" in err
    trials = _study(tmp_path).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].user_attrs["interrupted"] is True
    queued = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(queued) == 1 and queued[0].state == optuna.trial.TrialState.WAITING
    assert queued[0].system_attrs["fixed_params"] == trials[0].params  # a waiting trial keeps them there


def test_two_workers_one_study(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cmds = [
        [*defectscope_cmd, *_args(smoke_data_dir, "search.n_trials=2", f"hydra.run.dir={tmp_path}/w{i}")]
        for i in (1, 2)
    ]
    procs = [
        subprocess.Popen(
            c, cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in cmds
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    study = _study(tmp_path)
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2 and optuna.trial.TrialState.FAIL not in states
    by_worker = {i: [t for t in study.trials if f"/w{i}/" in t.user_attrs.get("run_dir", "")] for i in (1, 2)}
    assert by_worker[1] and by_worker[2], "each worker ran trials of the one study"


def test_kill_and_resume(
    defectscope_cmd: list[str], cli_env: dict[str, str], smoke_data_dir: Path, tmp_path: Path
) -> None:
    cmd = [
        *defectscope_cmd,
        *_args(smoke_data_dir, "search.n_trials=2", "search.heartbeat_s=1", "search.grace_s=600"),
    ]  # a grace period no rerun waits out: this machine's killed worker is found by its process mark
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # kill -9 while the first trial trains or exports
            if _running_trial_has_run_dir(tmp_path / "search.db"):
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = _study(tmp_path).get_trials()[0]
    assert killed.state == optuna.trial.TrialState.RUNNING  # nobody could mark it: the process died

    again = _run(cmd, tmp_path, cli_env)  # the same command, at once, continues the same study
    assert again.returncode == 0, again.stderr[-4000:]
    told = "trial 0: its worker on this machine is gone (killed); marked failed and queued again"
    assert told in again.stdout + again.stderr  # Hydra's log goes to stdout
    assert "1 failed, 0 running" in again.stdout  # the summary: nothing left listed as running
    study = _study(tmp_path)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL  # marked failed, not left running
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == first.number]
    assert len(retried) == 1 and retried[0].params == first.params  # and its parameters ran again
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
