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


def worker_gone(mark: Any) -> bool:
    """True only when certain: the mark names this host and PID namespace, and either the machine has
    rebooted since or no process holds that PID. Anything else (another host or container, no /proc, a PID
    now reused) is left to the heartbeat. POSIX only: on Windows ``os.kill`` would end the process."""
    here = process_mark()
    if os.name != "posix" or not isinstance(mark, dict) or "pid_ns" not in here:
        return False
    if mark.get("host") != here["host"] or mark.get("pid_ns") != here["pid_ns"]:
        return False
    if mark.get("boot") != here["boot"]:
        return True
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


def fail_orphans(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker on this machine is gone (killed, or the machine rebooted), and
    queue their parameters again as the heartbeat would: a rerun straight after ``kill -9`` retries the
    trial now instead of counting it as running. Returns their numbers."""
    storage = study._storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_gone(t.user_attrs.get(PROCESS_ATTR)):
            with suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t._trial_id)
    get_retry = getattr(storage, "get_heartbeat_stale_trial_callback", None)  # RDBStorage, under its cache
    retry = get_retry() if callable(get_retry) else None
    for trial_id in failed:
        if retry is not None:
            retry(study, storage.get_trial(trial_id))
    return [storage.get_trial(i).number for i in failed]


def fail_stale(study: optuna.Study) -> list[int]:
    """Mark trials whose worker is gone as failed: this machine's at once (:func:`fail_orphans`), the rest
    when they stop beating (Optuna's own heartbeat check). Returns the numbers failed here at once."""
    orphans = fail_orphans(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return orphans
