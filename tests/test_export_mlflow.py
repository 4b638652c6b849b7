"""`defectscope export --mlflow`: logged into the training run, registered, loadable back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from defectscope.export.cli import main
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata
from test_export_support import build_preset, checkpoint_info, model_presets, randomize, write_checkpoint

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def restore_tracking_uri() -> Iterator[None]:
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _probs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(["probs"], {"input": x})[0]
    return out


@pytest.mark.slow
def test_register_and_load_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_tracking_uri: None,
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("train", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp) as run:  # stands in for the training run
        mlflow.log_metric("val_f1", 0.9)
    run_id = run.info.run_id

    model = randomize(build_preset(model_presets()["tiny"]), seed=4)
    # the checkpoint remembers a store that is gone; MLFLOW_TRACKING_URI must win
    info = checkpoint_info(
        "gapcnn",
        model.model_kwargs,
        mlflow_run_id=run_id,
        mlflow_tracking_uri=f"sqlite:///{tmp_path}/gone/x.db",
    )
    ckpt = write_checkpoint(tmp_path / "best.ckpt", model, info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    out = tmp_path / "model.onnx"
    rc = main(
        [
            str(ckpt),
            "-o",
            str(out),
            "--mlflow",
            "--register-name",
            "line3-scratch",
            "--parity-images",
            "0",
            "--threshold",
            "0.5",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    m = re.search(r"mlflow: registered (models:/line3-scratch/(\d+))", text)
    assert m, text
    model_uri = m.group(1)
    assert m.group(2) == "1"

    client = MlflowClient(uri)
    version = client.get_model_version("line3-scratch", "1")
    assert version.run_id == run_id  # logged into the training run, not a new one
    assert version.tags["defectscope.class_names"] == "good,crack,scratch"
    assert ModelMetadata.from_json(version.tags["defectscope.defectscope_json"]).model_name == "gapcnn"
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val_f1"] == 0.9 and "export/max_abs_prob_fused" in metrics

    info_back = mlflow.models.get_model_info(model_uri)
    sig = json.loads(info_back.signature.inputs.to_json())
    assert sig == [
        {"name": "input", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, -1, -1]}}
    ]
    assert [o["name"] for o in json.loads(info_back.signature.outputs.to_json())] == [
        "logits",
        "probs",
        "cam",
    ]
    assert info_back.metadata[METADATA_KEY]["checkpoint_sha256"]

    loaded = mlflow.onnx.load_model(model_uri)
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert ModelMetadata.from_json(meta[METADATA_KEY]) == ModelMetadata.from_json(
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map[METADATA_KEY]
    )
    x = np.random.default_rng(1).standard_normal((3, 1, 40, 56)).astype(np.float32)
    np.testing.assert_array_equal(_probs(loaded.SerializeToString(), x), _probs(out.read_bytes(), x))


@pytest.mark.slow
def test_missing_run_fails_before_exporting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_tracking_uri: None,
) -> None:
    model = randomize(build_preset(model_presets()["tiny"]), seed=4)
    info = checkpoint_info("gapcnn", model.model_kwargs, mlflow_run_id="0123456789abcdef")
    ckpt = write_checkpoint(tmp_path / "best.ckpt", model, info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    out = tmp_path / "model.onnx"
    rc = main([str(ckpt), "-o", str(out), "--mlflow", "--parity-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "run '0123456789abcdef' is not there" in err and "empty.db" in err
    assert "MLFLOW_TRACKING_URI" in err and "nothing was exported" in err
    assert not out.exists()


def test_a_tracking_server_that_does_not_answer_is_told_in_seconds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_tracking_uri: None,
) -> None:
    """MLflow's client retried a refused connection for about 4 minutes and then said the run "is not there";
    the server is asked first (training's probe), and the line says it cannot be reached."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = randomize(build_preset(model_presets()["tiny"]), seed=4)
    info = checkpoint_info("gapcnn", model.model_kwargs, mlflow_run_id="0123456789abcdef")
    ckpt = write_checkpoint(tmp_path / "best.ckpt", model, info)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    rc = main([str(ckpt), "-o", str(tmp_path / "model.onnx"), "--mlflow", "--parity-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"MLflow tracking server http://127.0.0.1:{port} cannot be reached" in err, err
    assert "Start it, or set MLFLOW_TRACKING_URI" in err and "logger=none" not in err
    assert not (tmp_path / "model.onnx").exists()
