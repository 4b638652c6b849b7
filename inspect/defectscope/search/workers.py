"""Which trials' workers are gone: a trial carries its worker's process mark, so a command on the same
machine fails and re-queues a killed worker's trial at once; other machines' are left to Optuna's heartbeat."""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

#: a trial's worker process (:func:`process_mark`)
PROCESS_ATTR = "process"


def process_mark() -> dict[str, Any]:
    """Where this worker runs: host, boot, PID namespace and PID. A trial carries it, so a later command on
    the same machine can tell its worker is gone without waiting out the heartbeat's grace period."""
    mark: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    with suppress(OSError):
        mark["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        mark["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return mark


def worker_gone(mark: Any, here: dict[str, Any] | None = None) -> bool:
    """True only when certain: the mark names this host, boot and PID namespace, and no process holds that
    PID. Anything else (another host or container, another boot: two machines may share a hostname and the
    root PID namespace's number, no /proc, a PID now reused) is left to the heartbeat. POSIX only: on
    Windows ``os.kill`` would end the process."""
    here = here if here is not None else process_mark()  # read once per check of many trials
    if os.name != "posix" or not isinstance(mark, dict) or "pid_ns" not in here:
        return False
    if any(mark.get(k) != here[k] for k in ("host", "boot", "pid_ns")):
        return False
    pid = mark.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == here["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive under another user
        return False
    return False


def _claim_failed(storage: RDBStorage, trial_id: int) -> bool:
    """Mark one RUNNING trial FAIL in a single conditional UPDATE: of two commands starting together, only
    the one whose statement changed the row retries it (Optuna's read-then-write lets both, on SQLite)."""
    from datetime import datetime

    from sqlalchemy import text

    with storage.engine.begin() as conn:
        changed = conn.execute(
            text(
                "UPDATE trials SET state = 'FAIL', datetime_complete = :now "
                "WHERE trial_id = :id AND state = 'RUNNING'"
            ),
            {"now": datetime.now(), "id": trial_id},
        )
    return changed.rowcount == 1


def fail_orphans(study: optuna.Study, storage: RDBStorage) -> tuple[list[int], list[int]]:
    """Fail the RUNNING trials whose worker on this machine is gone (killed), and queue their parameters
    again as the heartbeat would (``search.retry_interrupted`` times): a rerun straight after ``kill -9``
    retries the trial now instead of counting it as running. Returns (failed, queued again) numbers."""
    retry = storage.get_heartbeat_stale_trial_callback()
    here = process_mark()
    failed: list[int] = []
    queued: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not worker_gone(t.user_attrs.get(PROCESS_ATTR), here) or not _claim_failed(storage, t._trial_id):
            continue
        failed.append(t.number)
        if retry is not None:
            retry(study, storage.get_trial(t._trial_id))
            if any(w.system_attrs.get("failed_trial") == t.number for w in study.get_trials(deepcopy=False)):
                queued.append(t.number)
    return failed, queued


def fail_stale(study: optuna.Study, storage: RDBStorage) -> tuple[list[int], list[int]]:
    """Mark trials whose worker is gone as failed: this machine's at once (:func:`fail_orphans`, whose
    numbers it returns), the rest when they stop beating (Optuna's own heartbeat check)."""
    orphans = fail_orphans(study, storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return orphans
