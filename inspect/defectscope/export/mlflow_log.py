"""Log an exported model to the training run in MLflow and register it.

The ONNX model goes into the *same* run that trained it (run id and tracking URI come from the
checkpoint; ``MLFLOW_TRACKING_URI`` overrides the URI), so the registry version links back to the
metrics, config and plots of its training.  The defectscope metadata travels three ways: inside the
ONNX file, as MLmodel ``metadata``, and as model-version tags (searchable in the UI).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlparse

import numpy as np
import onnx

from defectscope.runtime.metadata import INPUT_NAME, METADATA_KEY, ModelMetadata
from defectscope.training.reachability import TrackingUnavailableError, check_reachable, local_artifact_root

ARTIFACT_NAME = "onnx_model"
FALLBACK_EXPERIMENT = "defectscope-export"
#: threshold_source figures logged as run metrics (export/threshold_<name>)
THRESHOLD_FIGURES = ("threshold", "target_recall", "recall", "false_reject_rate", "n_defect", "n_good")


class MlflowExportError(RuntimeError):
    """Logging or registering in MLflow failed; the message names the store and run."""


def default_register_name(model_name: str) -> str:
    return f"defectscope-{model_name}"


def tracking_uri(info: dict[str, Any]) -> str | None:
    """``MLFLOW_TRACKING_URI`` wins over the URI recorded at training time."""
    return os.environ.get("MLFLOW_TRACKING_URI") or info.get("mlflow_tracking_uri") or None


def signature(meta: ModelMetadata) -> Any:
    """Tensor signature with -1 for the dynamic batch, height and width."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    k = len(meta.class_names)
    outputs: list[Any] = [TensorSpec(f32, (-1, k), "logits"), TensorSpec(f32, (-1, k), "probs")]
    if "cam" in meta.outputs:
        outputs.append(TensorSpec(f32, (-1, k, -1, -1), "cam"))
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, meta.channels, -1, -1), INPUT_NAME)]),
        outputs=Schema(outputs),
    )


def version_tags(meta: ModelMetadata, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Flat, searchable tags; the full JSON too while it fits MLflow's tag size limit."""
    tags = {
        "defectscope.model_name": meta.model_name,
        "defectscope.class_names": ",".join(meta.class_names),
        "defectscope.good_class": meta.good_class,
        "defectscope.threshold": f"{meta.threshold:g}",
        "defectscope.channels": str(meta.channels),
        "defectscope.fp16": str(meta.fp16).lower(),
        "defectscope.int8": str(meta.int8).lower(),
        "defectscope.tta": meta.tta,
        "defectscope.outputs": ",".join(meta.outputs),
        "defectscope.checkpoint_sha256": meta.checkpoint_sha256 or "",
        "defectscope.package_version": meta.package_version,
        "defectscope.threshold_method": str(meta.threshold_source.get("method", "not recorded")),
        "defectscope.threshold_too_costly": str(bool(meta.threshold_source.get("too_costly"))).lower(),
    }
    doc = meta.to_json()
    if len(doc) <= 5000:
        tags[f"defectscope.{METADATA_KEY}_json"] = doc
    for k, v in (extra or {}).items():
        tags[k] = str(v)
    return tags


def preflight(info: dict[str, Any]) -> str:
    """Point MLflow at the store and check the checkpoint's run is there — before exporting, so
    a wrong store fails fast with nothing written.  Returns a description of the store."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MlflowExportError(
            "--mlflow needs the mlflow package (the 'train' extra): pip install mlflow"
        ) from None

    uri = tracking_uri(info)
    if uri:
        mlflow.set_tracking_uri(uri)
    store = uri or mlflow.get_tracking_uri()
    where = f"MLflow store {store}"
    if urlparse(store).scheme in ("http", "https"):  # MLflow retried a refused connection for minutes
        try:
            check_reachable(
                store, 5.0, "Start it, or set MLFLOW_TRACKING_URI to the store the model was trained with"
            )
        except TrackingUnavailableError as exc:
            raise MlflowExportError(str(exc)) from None
    run_id = info.get("mlflow_run_id")
    if run_id:
        try:
            MlflowClient().get_run(run_id)
        except Exception as exc:
            missing = getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
            what = "is not there" if missing else f"cannot be read ({str(exc).strip().splitlines()[0][:200]})"
            raise MlflowExportError(
                f"{where}: the checkpoint's run {run_id!r} {what}; set MLFLOW_TRACKING_URI to the store the model "
                "was trained with"
            ) from None
    return where


def log_onnx_model(
    model: onnx.ModelProto,
    meta: ModelMetadata,
    info: dict[str, Any],
    *,
    register_name: str | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> str:
    """Log ``model`` to the checkpoint's run, register it; returns ``models:/NAME/VERSION``."""
    import mlflow
    import mlflow.onnx
    from mlflow.tracking import MlflowClient

    name = register_name or default_register_name(meta.model_name)
    where = preflight(info)
    run_id = info.get("mlflow_run_id")
    client = MlflowClient()
    tags = version_tags(meta, extra_tags)
    try:
        if run_id:
            run_ctx = mlflow.start_run(run_id=run_id)
        else:
            if client.get_experiment_by_name(FALLBACK_EXPERIMENT) is None:  # artifacts beside a local store
                try:
                    client.create_experiment(
                        FALLBACK_EXPERIMENT, artifact_location=local_artifact_root(mlflow.get_tracking_uri())
                    )
                except mlflow.exceptions.MlflowException as exc:  # another export created it meanwhile
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            mlflow.set_experiment(FALLBACK_EXPERIMENT)
            run_ctx = mlflow.start_run(run_name=f"export-{meta.model_name}")
        with run_ctx as run:
            mlflow.log_metrics(
                {
                    f"export/{k}": float(v)
                    for k, v in meta.parity.items()
                    if k.startswith("max_") and isinstance(v, (int, float))
                }
                | {
                    f"export/int8_{k}": float(v)
                    for k, v in meta.quantization.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                | {
                    f"export/threshold_{k}": float(v)
                    for k, v in meta.threshold_source.items()
                    if k in THRESHOLD_FIGURES and isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
            logged = mlflow.onnx.log_model(
                model,
                name=ARTIFACT_NAME,
                signature=signature(meta),
                metadata={METADATA_KEY: json.loads(meta.to_json())},
                registered_model_name=name,
                save_as_external_data=False,
                tags=tags,
            )
            version = logged.registered_model_version
            if version is None:
                raise MlflowExportError(f"{where}: model logged to run {run.info.run_id} but not registered")
            for k, v in tags.items():
                client.set_model_version_tag(name, str(version), k, v)
    except MlflowExportError:
        raise
    except Exception as exc:
        raise MlflowExportError(
            f"{where}: logging/registering {name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return f"models:/{name}/{version}"
