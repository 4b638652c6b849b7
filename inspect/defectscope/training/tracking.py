"""MLflow tracking for training: one run per training, written by rank 0 only.

Why a Lightning logger of our own instead of ``MLFlowLogger``: tracking must never cost a trained
model.  A server that cannot be reached when training starts stops the run before the first step
(the message names the URI); a server that goes away mid-run only produces one warning:

* metrics are kept in memory and re-sent, in order, at the next logging call after ``retry_after_s``
  (so a dead server costs at most one short HTTP attempt per ``retry_after_s``, not one per step);
* whatever is still unsent when training ends is written to ``<spool_dir>/mlflow_unsent.jsonl``
  (metrics and the artifacts that failed to upload), which :func:`replay_unsent` sends later;
* checkpoints are always written locally first, so they are never lost.

Resuming: ``start(run_id=...)`` reopens the run recorded in the checkpoint, so a resumed training
continues the same run (params are immutable in MLflow: changed values are recorded as a tag).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from .config import flatten, is_global_zero
from .reachability import TrackingUnavailableError, check_reachable, local_artifact_root

log = logging.getLogger(__name__)

UNSENT_FILE = "mlflow_unsent.jsonl"
_MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 5000
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MLflowTracker(Logger):
    """Lightning logger writing to MLflow through ``MlflowClient``; see the module docstring."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str = "defectscope",
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
        connect_timeout_s: float = 5.0,
        http_timeout_s: float = 10.0,
        http_max_retries: int = 1,
        retry_after_s: float = 60.0,
        spool_dir: str | None = None,
        log_checkpoint: bool = True,
        log_plots: bool = True,
        misclassified_max: int = 16,
    ) -> None:
        super().__init__()
        if not tracking_uri:
            raise TrackingUnavailableError("logger.tracking_uri is empty; give a URI or use logger=none")
        self.tracking_uri = str(tracking_uri)
        self.experiment_name = str(experiment_name)
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.artifact_location = artifact_location
        self.connect_timeout_s = float(connect_timeout_s)
        self.http_timeout_s = float(http_timeout_s)
        self.http_max_retries = int(http_max_retries)
        self.retry_after_s = float(retry_after_s)
        self.spool_dir = spool_dir
        self.log_checkpoint = bool(log_checkpoint)
        self.log_plots = bool(log_plots)
        self.misclassified_max = int(misclassified_max)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._client: Any = None
        self._pending: list[Any] = []
        self._failed_artifacts: list[tuple[str, str | None]] = []
        self._retry_at = 0.0
        self._warned = False
        self._closed = False

    # ------------------------------------------------------------------ Lightning Logger API

    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str:
        return self.run_id or ""

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None and not self._closed

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's hook; the training code logs the resolved config with :meth:`log_config`."""
        if isinstance(params, Mapping):
            self.log_config(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(key=key, value=float(value), timestamp=now, step=int(step or 0)))
        self._flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Called by Lightning after fit and after test: only flush; :meth:`close` ends the run."""
        if self.active:
            self._flush(force=True)

    # ------------------------------------------------------------------ run lifecycle

    def check(self) -> None:
        """The store answers (rank 0 only): asked before the data are read, since the run opens after them."""
        if is_global_zero():
            check_reachable(self.tracking_uri, self.connect_timeout_s)

    def start(self, *, run_id: str | None = None, extra_tags: Mapping[str, str] | None = None) -> None:
        """Open the run (rank 0 only): new, or ``run_id`` to continue a resumed training's run.

        Raises :class:`TrackingUnavailableError` naming the URI when the store cannot be used.
        """
        if not is_global_zero():
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, self.http_timeout_s))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.http_max_retries))
        check_reachable(self.tracking_uri, self.connect_timeout_s)
        from mlflow.tracking import MlflowClient

        tags = {**self.tags, **(extra_tags or {})}
        try:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment_name)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_location or local_artifact_root(self.tracking_uri),
                )
            )
            if run_id and self._run_exists(client, run_id):
                client.update_run(run_id, status="RUNNING")
                for key, value in tags.items():
                    client.set_tag(run_id, key, _clip(value, _MAX_TAG_LEN))
                self.resumed = True
                self.run_id = run_id
            else:
                if run_id:
                    log.warning(
                        "MLflow run %s (from the checkpoint) does not exist at %s; starting a new run",
                        run_id,
                        self.tracking_uri,
                    )
                tags = {k: _clip(v, _MAX_TAG_LEN) for k, v in tags.items()}
                if self.run_name:
                    tags["mlflow.runName"] = self.run_name
                run = client.create_run(exp_id, tags=tags, run_name=self.run_name)
                self.run_id = run.info.run_id
        except TrackingUnavailableError:
            raise
        except Exception as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking at {self.tracking_uri} cannot be used: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else exc!r}. Fix logger.tracking_uri / "
                "MLFLOW_TRACKING_URI or train without tracking: logger=none"
            ) from exc
        self.experiment_id = str(exp_id)
        self._client = client

    @staticmethod
    def _run_exists(client: Any, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(run_id)
        except MlflowException:
            return False
        return True

    @rank_zero_only
    def log_config(self, params: Mapping[str, Any]) -> None:
        """Flattened config as params (dotted keys). On a resumed run, unchanged keys are skipped and
        changed values (params are immutable) are recorded in the tag ``defectscope.resume_changes``.
        """
        if not self.active:
            return
        from mlflow.entities import Param

        flat = {k[:250]: _clip(v, _MAX_PARAM_LEN) for k, v in flatten(params).items()}
        if self.resumed:
            existing: dict[str, str] = {}
            self._call(lambda: existing.update(self._client.get_run(self.run_id).data.params), "read params")
            changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
            flat = {k: v for k, v in flat.items() if k not in existing}
            if changed:
                log.warning(
                    "resumed with changed config values (kept as a tag): %s", ", ".join(sorted(changed))
                )
                tag = _clip(json.dumps(changed, sort_keys=True), _MAX_TAG_LEN)
                self._call(
                    lambda: self._client.set_tag(self.run_id, "defectscope.resume_changes", tag), "tag"
                )
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _BATCH_PARAMS):
            chunk = items[i : i + _BATCH_PARAMS]
            self._call(lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk), "log params")

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for key, value in tags.items():
                self._call(
                    lambda k=key, v=value: self._client.set_tag(self.run_id, k, _clip(str(v), _MAX_TAG_LEN)),
                    "tag",
                )

    @rank_zero_only
    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file; on failure it is listed in the unsent file instead of failing the run."""
        if not self.active:
            return
        path = str(local_path)
        ok = self._call(lambda: self._client.log_artifact(self.run_id, path, artifact_path), f"upload {path}")
        if not ok:
            self._failed_artifacts.append((path, artifact_path))

    @rank_zero_only
    def close(self, status: str = "FINISHED") -> Path | None:
        """Send what is pending, end the run; returns the unsent-file path if anything stayed unsent."""
        if not self.active:
            return None
        self._flush(force=True)
        self._call(lambda: self._client.set_terminated(self.run_id, status=status), "end run", force=True)
        self._closed = True
        if not self._pending and not self._failed_artifacts:
            return None
        spool = Path(self.spool_dir or ".") / UNSENT_FILE
        spool.parent.mkdir(parents=True, exist_ok=True)
        with open(spool, "w", encoding="utf-8") as fh:
            fh.write(
                json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, "status": status})
                + "\n"
            )
            for m in self._pending:
                fh.write(
                    json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp})
                    + "\n"
                )
            for path, artifact_path in self._failed_artifacts:
                fh.write(json.dumps({"artifact": path, "artifact_path": artifact_path}) + "\n")
        log.warning(
            "MLflow at %s: %d metric values and %d artifacts were not sent; they are in %s "
            "(send them later with defectscope.training.tracking.replay_unsent)",
            self.tracking_uri,
            len(self._pending),
            len(self._failed_artifacts),
            spool,
        )
        return spool

    # ------------------------------------------------------------------ failure handling

    def _flush(self, force: bool = False) -> None:
        while self._pending:
            chunk = self._pending[:_BATCH_METRICS]
            if not self._call(
                lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk), "log metrics", force
            ):
                return
            del self._pending[: len(chunk)]

    def _call(self, fn: Any, what: str, force: bool = False) -> bool:
        """Run one client call; on failure warn once, back off for ``retry_after_s`` and return False."""
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            fn()
        except Exception as exc:
            self._retry_at = time.monotonic() + self.retry_after_s
            if not self._warned:
                self._warned = True
                log.warning(
                    "MLflow at %s failed (%s: %s) during '%s'; training continues, metrics are buffered "
                    "and retried every %g s, checkpoints are kept locally",
                    self.tracking_uri,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    what,
                    self.retry_after_s,
                )
            return False
        return True


def replay_unsent(spool_file: str | os.PathLike[str], tracking_uri: str | None = None) -> tuple[int, int]:
    """Send a run's ``mlflow_unsent.jsonl`` (written when the server was away); returns (metrics, artifacts)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    lines = [
        json.loads(line) for line in Path(spool_file).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    head, rows = lines[0], lines[1:]
    client = MlflowClient(tracking_uri=tracking_uri or head["tracking_uri"])
    run_id = head["run_id"]
    metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows if "key" in r]
    for i in range(0, len(metrics), _BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + _BATCH_METRICS])
    artifacts = [r for r in rows if "artifact" in r]
    for r in artifacts:
        client.log_artifact(run_id, r["artifact"], r["artifact_path"])
    client.set_terminated(run_id, status=head.get("status", "FINISHED"))
    return len(metrics), len(artifacts)
