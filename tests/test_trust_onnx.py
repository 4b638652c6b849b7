"""An ONNX file is data: external data outside the model's folder and unknown operator domains are
refused before ONNX Runtime opens the file (runtime/model_checks.py), by the library and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from defectscope.runtime.inspector import Inspector, ModelLoadError
from defectscope.runtime.model_checks import KNOWN_DOMAINS, scan_model
from onnx_models import build_model, make_image


def _externalise(model_path: Path, location: str, data_file: Path) -> Path:
    """Move the first initializer's bytes into ``data_file``, referenced as ``location``."""
    model = onnx.load(str(model_path))
    tensor = model.graph.initializer[0]
    raw = numpy_helper.to_array(tensor).tobytes()
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(model_path))
    return model_path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_model(tmp_path / "line" / "model.onnx")


def test_external_data_inside_the_model_folder_loads(model: Path, tmp_path: Path) -> None:
    reference = Inspector(model, provider="cpu")
    img = make_image(tmp_path / "a.png", 64, 48, bright=True)
    want = reference.predict(reference.preprocess([img]))["probs"]
    _externalise(model, "weights.bin", model.parent / "weights.bin")
    got = Inspector(model, provider="cpu").predict(reference.preprocess([img]))["probs"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("../secret.bin", "climbs out with '..'"),
        ("sub/../../secret.bin", "climbs out with '..'"),
        ("ABSOLUTE", "is an absolute path"),
        ("link.bin", "outside the model's folder"),
    ],
)
def test_external_data_outside_the_model_folder_is_refused(
    model: Path, tmp_path: Path, location: str, why: str
) -> None:
    secret = tmp_path / "secret.bin"
    if location == "ABSOLUTE":
        location = str(secret)
    _externalise(model, location, secret)
    if location == "link.bin":
        os.symlink(secret, model.parent / "link.bin")
    with pytest.raises(ModelLoadError, match="reads external data from") as exc:
        Inspector(model, provider="cpu")
    assert why in str(exc.value) and "refused" in str(exc.value)


def _with_custom_op(model: Path, domain: str) -> Path:
    proto = onnx.load(str(model))
    proto.graph.node.append(helper.make_node("Boom", ["probs"], ["boom"], domain=domain))
    proto.graph.output.append(helper.make_tensor_value_info("boom", onnx.TensorProto.FLOAT, None))
    proto.opset_import.append(helper.make_opsetid(domain, 1))
    onnx.save(proto, str(model))
    return model


def test_unknown_operator_domain_is_refused_by_the_cli(
    model: Path, tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    _with_custom_op(model, "evil.ops")
    img = make_image(tmp_path / "a.png", 64, 48, bright=True)
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [*defectscope_cmd, "inspect", str(model), str(img), "-o", str(out)],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "evil.ops::Boom" in proc.stderr and "custom domain this runtime does not know" in proc.stderr
    assert not out.exists()


def test_external_data_outside_is_refused_by_the_cli(
    model: Path, tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    _externalise(model, "../secret.bin", tmp_path / "secret.bin")
    img = make_image(tmp_path / "a.png", 64, 48, bright=True)
    proc = subprocess.run(
        [*defectscope_cmd, "inspect", str(model), str(img), "-o", str(tmp_path / "r.jsonl")],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "defectscope inspect: error:" in proc.stderr and "'../secret.bin'" in proc.stderr


def test_scanner_sees_subgraphs_functions_and_known_domains(model: Path) -> None:
    """Nodes hidden in an If branch and in a local function are found; ORT's own domains pass."""
    proto = onnx.load(str(model))
    branch = helper.make_graph(
        [helper.make_node("Hidden", [], ["y"], domain="evil.ops")],
        "b",
        [],
        [helper.make_tensor_value_info("y", 1, None)],
    )
    proto.graph.node.append(helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch))
    proto.functions.append(
        helper.make_function("local.fn", "Fn", ["x"], ["z"], [helper.make_node("Relu", ["x"], ["z"])], [])
    )
    proto.graph.node.append(helper.make_node("Fn", ["probs"], ["z"], domain="local.fn"))
    found = scan_model(proto.SerializeToString())
    assert ("evil.ops", "Hidden") in found.ops and ("local.fn", "Fn") in found.functions
    assert {d for d, _ in found.ops} - {"evil.ops", "local.fn"} <= set(KNOWN_DOMAINS)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # a length that overruns the file
    with pytest.raises(ModelLoadError, match=r"is damaged \(cut off\?\) or not an ONNX model \(.*protobuf"):
        Inspector(bad, provider="cpu")


def test_runtime_check_module_is_torch_free() -> None:
    code = "import sys, defectscope.runtime.model_checks; print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
