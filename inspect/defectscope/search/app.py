"""``defectscope search [overrides]``: the Hydra app (conf/search.yaml = conf/train.yaml + ``search``).

    defectscope search experiment=synthetic search.n_trials=40 search.timeout=1800 \\
        search.study_name=line3 search.storage=sqlite:///search.db

Order: every check that can fail (space, storage, model registry, data, budgets) runs before the
first trial; the same command continues the same study after a crash or Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import optuna  # noqa: F401 - imported here so that a missing install gets the CLI's one-line hint

log = logging.getLogger(__name__)


def base_overrides() -> list[str]:
    """The command line's overrides that are not about the search itself (for retrain commands)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # compose API (tests, notebooks): no command line
        return []
    skip = ("search.", "search=", "+search.", "~search.", "hydra.", "++search.")
    return [o for o in task if not o.startswith(skip)]


def preflight(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """Settings, parameters, storage and data facts, or a one-line error before any trial."""
    from defectscope.plain import to_plain
    from defectscope.training.preflight import check_train_config

    from .preflight import check_choices, check_latency_budget, check_time_budget, data_facts, lightest
    from .settings import SearchSettings
    from .space import check_keys, parse_space
    from .storage import open_storage
    from .study import run_dir_of

    s = SearchSettings.from_config({k: v for k, v in to_plain(cfg.search).items()})
    params = parse_space(to_plain(cfg.search.get("space")))
    check_keys(params, cfg)
    check_train_config(cfg)  # the trials' training settings, before the study or the data are touched
    storage = open_storage(s)
    check_choices(cfg, params)
    facts = data_facts(cfg, s.latency.image_size, s.test_trials)
    if s.timeout is not None or s.max_latency_ms is not None:
        light = lightest(cfg, params, facts)
        if s.timeout is not None:
            check_time_budget(s.timeout, cfg, light, facts)
        if s.max_latency_ms is not None:
            check_latency_budget(
                s.max_latency_ms, cfg, light, facts, s.latency, run_dir_of(cfg) / "preflight"
            )
    return s, params, storage, facts


def run_search(cfg: Any) -> dict[str, float]:
    """The whole search in this process (one worker); returns a few figures for Hydra."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    from .errors import SearchConfigError
    from .report import summary_lines, write_report
    from .study import (
        SearchFailedError,
        StudyRemovedError,
        check_stored_space,
        discard_if_empty,
        enqueue_seeds,
        open_study,
        parent_run,
        run_dir_of,
    )

    s, params, storage, facts = preflight(cfg)
    from .trial import SearchContext  # Lightning: after the checks, so a typo is told at once

    study, created = open_study(storage, s)
    check_stored_space(study, params, s.study_name)
    if created or not study.get_trials(deepcopy=False):
        for note in enqueue_seeds(study, cfg, params, s.presets):
            log.info("%s", note)
    tracker = parent_run(cfg, study, created, s)
    ctx = SearchContext(
        cfg, s, params, facts, run_dir_of(cfg), getattr(tracker, "run_id", None), base_overrides()
    )
    status, error = _optimize(study, storage, ctx, s)
    if isinstance(error, StudyRemovedError):  # nothing of it is left to report
        if tracker is not None:
            tracker.close("FAILED")
        raise error
    summary = write_report(study, cfg, params, s, ctx.run_dir)
    if tracker is not None:
        for path in summary["files"].values():
            tracker.log_artifact(path)
        tracker.close(status)
    if error is not None:
        if (
            created
            and isinstance(error, SearchConfigError | SearchFailedError)
            and discard_if_empty(study, storage, ctx.worker)
        ):
            raise type(error)(
                f"{error} (study {s.study_name!r} finished no trial and was removed: the next command starts it "
                "afresh)"
            ) from None
        raise error
    print("\n".join(summary_lines(summary, s)), flush=True)
    if status == "KILLED":
        raise SystemExit(130)
    return {"complete": float(summary["trials"]["complete"]), "front": float(len(summary["front"]))}


def _optimize(study: Any, storage: Any, ctx: Any, s: Any) -> tuple[str, Exception | None]:
    """Run the trials; SIGTERM stops them as Ctrl+C does. Returns the MLflow status and a stopping error."""
    from defectscope.runtime.interrupts import terminate_as_interrupt

    from .study import optimize, requeue_interrupted
    from .trial import run_trial
    from .workers import fail_stale

    failed, queued = fail_stale(study, storage)
    for number in failed:
        log.warning(
            "trial %d: its worker on this machine is gone (killed); marked failed%s",
            number,
            " and queued again"
            if number in queued
            else f" (not queued again: search.retry_interrupted={s.retry_interrupted} retries used)",
        )
    try:
        with terminate_as_interrupt(deferred=True):  # at the next training batch, or after the trial
            optimize(study, lambda trial: run_trial(trial, ctx), s)
        return "FINISHED", None
    except KeyboardInterrupt:
        queued = requeue_interrupted(study, ctx.worker)
        again = (
            f"; trial {', '.join(map(str, queued))} stopped, marked failed and queued again" if queued else ""
        )
        print(
            f"defectscope search: interrupted{again}. Run the same command to continue study {s.study_name!r}",
            file=sys.stderr,
        )
        return "KILLED", None
    except Exception as exc:  # reported with the trials so far, then raised (one line for the search's own)
        return "FAILED", exc
    finally:
        fail_stale(study, storage)


def _search(cfg: Any) -> dict[str, float]:
    return run_search(cfg)


def search_main(argv: Sequence[str]) -> int:
    """``defectscope search``: every argument is a Hydra argument (overrides, --cfg, -cn, --help)."""
    from defectscope.training.app import _run

    return _run("search", "search", argv, _search)
