"""The Optuna study: sampler, seeds from the presets, the MLflow parent run (the database: storage.py).

Scale-out is Optuna's own: every worker opens the same database URL and study name and asks the
study for its next trial. A worker that dies leaves its trial RUNNING; Optuna's heartbeat notices
(``search.grace_s`` after the last beat; at once for a worker on this machine, workers.py) and marks it FAIL, and ``RetryHeartbeatStaleTrialCallback`` queues the
same parameters again (``search.retry_interrupted`` times), so an interrupted trial is failed, not lost; a trial
stopped by Ctrl+C or SIGTERM is queued again by :func:`requeue_interrupted`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ..runtime.interrupts import check_interrupt
from .errors import SearchConfigError
from .settings import SearchSettings
from .space import Param, out_of_space, seed_values
from .storage import first_line, redact

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
SIGNATURE_ATTR = "defectscope_objectives"


def make_sampler(s: SearchSettings) -> optuna.samplers.BaseSampler:
    """TPE by default: it models good and bad regions from few trials (here each trial is a training
    run, so a study has tens of trials, not the thousands NSGA-II's generations need); constant liar
    keeps parallel workers from sampling the same point."""
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            n_startup_trials=s.startup_trials, multivariate=True, constant_liar=True, seed=s.sampler_seed
        )
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population, seed=s.sampler_seed)
    return optuna.samplers.RandomSampler(seed=s.sampler_seed)


def open_study(storage: RDBStorage, s: SearchSettings) -> tuple[optuna.Study, bool]:
    """Create the study, or load it (resume, another worker); returns (study, created here). A database
    that opens but refuses writes (a read-only file or mount) is one line naming search.storage."""
    try:
        return _open_study(storage, s)
    except SearchConfigError:
        raise
    except Exception as exc:  # Optuna's StorageInternalError over SQLAlchemy's, a lost server
        if not _is_storage_error(exc):
            raise
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise SearchConfigError(
            f"search.storage: cannot write study {s.study_name!r} to {redact(s.storage)}: {first_line(cause)}"
        ) from None


def _is_storage_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, optuna.exceptions.StorageInternalError | SQLAlchemyError)


def _open_study(storage: RDBStorage, s: SearchSettings) -> tuple[optuna.Study, bool]:
    try:
        study = optuna.create_study(
            storage=storage,
            sampler=make_sampler(s),
            study_name=s.study_name,
            directions=[optuna.study.StudyDirection[d.upper()] for d in s.directions],
        )
        study.set_user_attr(SIGNATURE_ATTR, s.objectives)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=s.study_name, storage=storage, sampler=make_sampler(s))
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:  # the creator has not written it yet
        time.sleep(1.0)
        stored = study.user_attrs.get(SIGNATURE_ATTR, s.objectives)
    directions = [d.name.lower() for d in study.directions]
    if list(stored) != s.objectives or directions != s.directions:
        raise SearchConfigError(
            f"search.study_name={s.study_name!r} in {redact(s.storage)} optimises {list(stored)} ({directions}), "
            f"not {s.objectives} ({s.directions}); choose another study name or the same objectives"
        )
    return study, False


def load_preset(name: str) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` as plain data (the same file ``model=<name>`` composes)."""
    from omegaconf import OmegaConf

    from defectscope.training.app import conf_dir

    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
        raise SearchConfigError(f"search.presets: no model preset {name!r}; presets: {', '.join(names)}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def enqueue_seeds(
    study: optuna.Study, cfg: Any, params: Sequence[Param], presets: Sequence[str]
) -> list[str]:
    """Queue the composed config's own values and each preset's first, so the front starts from them."""
    notes = []
    seeds: list[tuple[str, dict[str, Any]]] = [("the composed config", seed_values(cfg, params))]
    for name in presets:
        preset = load_preset(name)
        if preset.get("name") != cfg.model.name:
            notes.append(
                f"preset {name} not seeded: it is a {preset.get('name')!r} model, the space searches {cfg.model.name!r}"
            )
            continue
        seeds.append((f"preset {name}", seed_values(cfg, params, preset)))
    seen: set[str] = set()
    for label, values in seeds:
        bad = out_of_space(params, values)
        if bad:
            notes.append(f"{label} not seeded: outside the space: {', '.join(bad)}")
            continue
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        study.enqueue_trial(values, user_attrs={"seed": label}, skip_if_exists=True)
        notes.append(f"seeded with {label}")
    return notes


def parent_run(cfg: Any, study: optuna.Study, created: bool, s: SearchSettings) -> Any:
    """The study's MLflow parent run (one for all workers and resumes), or None without a logger."""
    from hydra.utils import instantiate

    from defectscope.plain import to_plain
    from defectscope.training.targets import check_component_targets

    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id is None and not created:
        for _ in range(60):  # the worker that created the study is creating the run
            time.sleep(0.5)
            run_id = optuna.load_study(study_name=s.study_name, storage=study._storage).user_attrs.get(
                PARENT_ATTR
            )
            if run_id:
                break
    check_component_targets(cfg, ("logger",))
    tracker = instantiate(cfg.logger)
    tracker.run_name = f"search-{s.study_name}"
    tags = {
        "defectscope.study": s.study_name,
        "defectscope.search": "parent",
        "defectscope.storage": redact(s.storage),
        "mlflow.source.name": "defectscope search",
    }
    tracker.start(run_id=run_id, extra_tags=tags)
    if run_id is None:
        study.set_user_attr(PARENT_ATTR, tracker.run_id)
    if not tracker.resumed:
        tracker.log_config({"search": to_plain(cfg.search)})
    return tracker


class FailureStreak:
    """Stops this worker after ``limit`` failed trials in a row: failures do not count towards
    ``n_trials``, so a cause that fails every trial would otherwise loop until the timeout."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.streak = 0
        self.last = ""
        self.config_error: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        check_interrupt()  # no next trial after a SIGTERM that came while this one finished
        if trial.state != optuna.trial.TrialState.FAIL:
            self.streak = 0
            return
        self.streak += 1
        self.last = str(trial.user_attrs.get("error", "see the log"))
        self.config_error = trial.user_attrs.get("config_error")
        if self.streak >= self.limit or self.config_error:
            study.stop()

    def check(self) -> None:
        if self.config_error:
            raise SearchConfigError(str(self.config_error))
        if self.streak >= self.limit:
            raise SearchFailedError(
                f"{self.streak} trials in a row failed, the last with: {self.last}; fix the cause (the log has "
                "the traceback) and run the same command to continue"
            )


class SearchFailedError(RuntimeError):
    """Trials keep failing; the message names the last error."""


class StudyRemovedError(SearchFailedError):
    """The study was removed under this command (another worker's :func:`discard_if_empty`)."""


def study_removed(study: optuna.Study) -> bool:
    """Whether ``study`` is no longer in its storage: Optuna then answers every call with a bare KeyError."""
    try:
        study.get_trials(deepcopy=False)
    except KeyError:
        return True
    return False


def optimize(study: optuna.Study, objective: Any, s: SearchSettings) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (all workers together) or the timeout.

    Another command on the same storage may remove the study before this one's first trial (all of its
    own trials failed: :func:`discard_if_empty`); that is one line, not Optuna's KeyError."""
    try:
        _optimize_trials(study, objective, s)
    except KeyError:
        if not study_removed(study):
            raise
        raise StudyRemovedError(
            f"study {s.study_name!r} was removed by another defectscope search on the same storage (its trials "
            "had all failed) before this one ran a trial; run the command again to start it afresh"
        ) from None


def _optimize_trials(study: optuna.Study, objective: Any, s: SearchSettings) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=done)) >= s.n_trials:
        log.info(
            "study %s already has %d finished trials (search.n_trials=%d)",
            s.study_name,
            s.n_trials,
            s.n_trials,
        )
        return
    streak = FailureStreak()
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    optuna_log.addFilter(_without_config_traceback)
    try:
        study.optimize(
            objective,
            n_trials=None,
            timeout=s.timeout,
            catch=(Exception,),
            callbacks=[MaxTrialsCallback(s.n_trials, states=done), streak],
            gc_after_trial=True,
        )
    finally:
        optuna_log.removeFilter(_without_config_traceback)
    streak.check()


def _without_config_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs every failed trial with its traceback; a setting no trial can meet ends the search with
    its one line (:meth:`FailureStreak.check`), and an interrupted one with its own, so those trials' records
    keep their message only."""
    if record.exc_info and isinstance(record.exc_info[1], SearchConfigError | KeyboardInterrupt):
        record.exc_info, record.exc_text = None, None
    return True


def _describe(d: BaseDistribution) -> str:
    if isinstance(d, CategoricalDistribution):
        return f"choices {list(d.choices)}"
    if isinstance(d, IntDistribution | FloatDistribution):
        extra = (" log" if d.log else "") + (f" step {d.step}" if d.step not in (None, 1) else "")
        return f"[{d.low}, {d.high}]{extra}"
    return repr(d)


def check_stored_space(study: optuna.Study, params: Sequence[Param], study_name: str) -> None:
    """A study keeps the space its trials were sampled from: a changed range or choice list made Optuna fail
    every trial (choices) or silently mix two spaces (ranges); told before the first trial, naming the key."""
    stored: dict[str, BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            stored.setdefault(name, dist)
    for p in params:
        old = stored.get(p.name)
        if old is not None and old != p.distribution:
            raise SearchConfigError(
                f"{p.key}: study {study_name!r} sampled it from {_describe(old)}, this command from "
                f"{_describe(p.distribution)}; a study keeps its space: give the same, or another search.study_name"
            )


def requeue_interrupted(study: optuna.Study, worker: str) -> list[int]:
    """This worker's trials stopped by Ctrl+C or SIGTERM are failed by Optuna; their parameters (a seed's
    included) are queued again, once, so the next run of the same command trains them first (two workers
    stopped together each queue their own). Returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    lost = [
        t for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.params
        and t.user_attrs.get("worker") == worker and t.number not in retried
    ]  # fmt: skip
    for t in lost:
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return [t.number for t in lost]


def discard_if_empty(study: optuna.Study, storage: RDBStorage, worker: str) -> bool:
    """Remove a study this command created when it holds only this worker's failed trials (and queued ones):
    a misspelt setting that failed its first trials must not keep the study name (a corrected command was
    refused: other objectives). A trial of another worker, or one that finished or runs, keeps it."""
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.WAITING and not (
            t.state == TrialState.FAIL and t.user_attrs.get("worker") == worker
        ):
            return False
    optuna.delete_study(study_name=study.study_name, storage=storage)
    return True


def run_dir_of(cfg: Any) -> Path:
    return Path(str(cfg.paths.output_dir))
