"""A line PC set up from deploy/README.md, attacked the way a new user's mistakes would (helper report of
2026-12-07): outputs that named the model or an input overwrote it, a run that found no image emptied the last
results, evaluate needed the training stack, the service user's missing rights surfaced late. Real commands,
real files, real ONNX Runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocked_imports import blocking_env
from defectscope.runtime.results import iter_rows
from inspect_runs import rows_of, run
from onnx_models import build_model, make_image
from test_cli_errors import defectscope, one_line_error
from watch_runs import png_bytes, read_rows, start_watch, wait_for

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("torch", "lightning", "pytorch_lightning", "hydra", "mlflow", "omegaconf", "yaml", "onnx")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.fixture
def lot(tmp_path: Path) -> Path:
    for i in range(4):
        make_image(
            tmp_path / "lot" / ("good", "crack")[i % 2] / f"{i}.png", 64, 64, bright=i % 2 == 1, seed=i
        )
    return tmp_path / "lot"


@pytest.mark.parametrize(
    ("option", "victim", "kind"),
    [
        ("-o", "model", "an ONNX model"),
        ("-o", "image", "a PNG image"),
        ("-o", "list", "another kind of file"),
        ("--csv", "model", "an ONNX model"),
        ("--report", "image", "a PNG image"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_an_output_never_replaces_a_file_of_another_kind(
    model: Path,
    tmp_path: Path,
    option: str,
    victim: str,
    kind: str,
    resume: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-o m.onnx`` turned the model into a 478-byte JSONL row; ``-o a.png --resume`` cut 183 bytes off the
    image before a traceback. Each is refused, the file untouched."""
    shutil.copy(model, tmp_path / "m.onnx")
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    (tmp_path / "list.txt").write_text(f"{image}\n")
    target = {"model": tmp_path / "m.onnx", "image": image, "list": tmp_path / "list.txt"}[victim]
    before = target.read_bytes()
    outputs = ["-o", tmp_path / "r.jsonl"] if option != "-o" else []
    assert (
        run(
            tmp_path / "m.onnx",
            f"@{tmp_path / 'list.txt'}",
            *outputs,
            option,
            target,
            *(["--resume"] * resume),
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{option} {target}: is {kind}" in err and "would destroy it" in err
    assert target.read_bytes() == before


def test_results_csv_and_report_of_an_earlier_run_are_still_replaced(model: Path, tmp_path: Path) -> None:
    """The refusal tells files apart by their first bytes: a second run over its own outputs (a CSV with a
    byte-order mark too, as a spreadsheet saves it) replaces them."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    outs = ["-o", tmp_path / "r.jsonl", "--csv", tmp_path / "r.csv", "--report", tmp_path / "r.html"]
    assert run(model, image, *outs) == 0
    (tmp_path / "r.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "r.csv").read_bytes())
    assert run(model, image, image, *outs) == 0
    assert len(rows_of(tmp_path / "r.jsonl")) == 2
    assert (tmp_path / "r.csv").read_text(encoding="utf-8").count("a.png") == 2


def test_a_labelled_manifest_is_no_results_csv(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Telling a results CSV by ``path,`` let ``--csv labels.csv`` replace a training manifest (review)."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\na.png,good,train\n")
    assert run(model, image, "-o", tmp_path / "r.jsonl", "--csv", labels) == 2
    assert f"--csv {labels}: is another kind of file, not a results CSV" in capsys.readouterr().err
    assert labels.read_text() == "path,label,split\na.png,good,train\n"


@pytest.mark.parametrize("leftover", ["torn first row", "zeros after a power cut", "BOM", "keys sorted"])
def test_a_crashed_or_rewritten_results_file_is_still_resumed(
    model: Path, tmp_path: Path, leftover: str
) -> None:
    """The kind check refused what a crash leaves (a torn first row, a power cut's zeros), which --resume
    cuts off, and rows a tool rewrote (a BOM, ``jq -S``'s sorted keys) (review). They are results: the crash's
    leftovers are cut off and the image inspected; the rewritten row counts as done."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    out = tmp_path / "r.jsonl"
    assert run(model, image, "-o", out) == 0
    row = json.loads(out.read_text())
    out.write_bytes(
        {
            "torn first row": b'{"pa',
            "zeros after a power cut": b"\x00" * 512,
            "BOM": b"\xef\xbb\xbf" + out.read_bytes(),
            "keys sorted": (json.dumps(row, sort_keys=True) + "\n").encode(),
        }[leftover]
    )
    assert run(model, image, "-o", out, "--resume") == 0
    assert [r["path"] for r in iter_rows(out)] == [
        str(image)
    ]  # the runtime's reader (a BOM is not text JSON)


def test_a_run_that_finds_no_image_keeps_the_last_results(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused run (an empty folder, a pattern matching nothing) emptied the 2000-row file of the last one."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    out = tmp_path / "r.jsonl"
    assert run(model, image, "-o", out) == 0
    before = out.read_bytes()
    (tmp_path / "empty").mkdir()
    assert run(model, tmp_path / "empty", f"{tmp_path}/nomatch*.png", "-o", out) == 2
    assert "no input images found" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(model, tmp_path / "empty", "-o", tmp_path / "new.jsonl", "--resume") == 2
    assert not (tmp_path / "new.jsonl").exists()


def test_a_report_of_no_listed_items(model: Path, tmp_path: Path) -> None:
    """``--report-items 0`` (accepted by its check) raised IndexError once an NG row came."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    assert (
        run(
            model,
            image,
            image,
            "-o",
            tmp_path / "r.jsonl",
            "--report-items",
            "0",
            "--report",
            tmp_path / "r.html",
        )
        == 0
    )
    assert "<!DOCTYPE html>" in (tmp_path / "r.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["inspect", "watch", "evaluate"])
def test_a_model_file_that_cannot_be_read_is_a_setting_error(command: str, tmp_path: Path) -> None:
    """A model this user may not read exited 1 (systemd restarted watch five times); /proc/self/mem is a
    regular file that even root cannot read from its start."""
    args = {
        "inspect": [tmp_path / "a.png", "-o", tmp_path / "r.jsonl"],
        "watch": ["--in", tmp_path, "--out", tmp_path / "out"],
        "evaluate": [tmp_path, "--out", tmp_path / "ev"],
    }[command]
    make_image(tmp_path / "a.png", 64, 64, bright=True)
    proc = defectscope(command, "/proc/self/mem", *args, cwd=tmp_path)
    assert one_line_error(proc).endswith(
        "/proc/self/mem: the model file cannot be read (Input/output error); expected an exported model (.onnx)"
    )


def test_evaluate_runs_on_a_line_pc_without_the_training_stack(
    model: Path, lot: Path, tmp_path: Path
) -> None:
    """docs/training.md calls ``evaluate MODEL.onnx DATA`` torch-free; it needed omegaconf through the
    training app, and named the wrong extra for it."""
    env = blocking_env(tmp_path, TRAINING_STACK)
    cmd = [
        sys.executable,
        "-m",
        "defectscope",
        "evaluate",
        str(model),
        str(lot),
        "--out",
        str(tmp_path / "ev"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(map(sum, json.loads((tmp_path / "ev" / "evaluation.json").read_text())["confusion"])) == 4
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "evaluate", "ckpt_path=x.ckpt"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and "'omegaconf' of the 'train' extra" in proc.stderr
        and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    ("command", "package"),
    [(["scan", "--help"], "hydra"), (["export", "--help"], "onnx"), (["demo"], "yaml")],
)
def test_a_command_missing_its_extra_says_which(command: list[str], package: str, tmp_path: Path) -> None:
    """Imports inside a command ended in a ModuleNotFoundError traceback; at import, onnx was put in the 'cpu'
    extra. Every missing package is one line naming its extra."""
    env = blocking_env(tmp_path, TRAINING_STACK)
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"defectscope: this command needs the Python package {package!r} of the 'train' extra; install it with: "
        "pip install '.[train]' in the defectscope checkout (or the wheel file with [train])"
    )


def _device_id_files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if "onnxruntime" in str(p).lower() and p.is_file()]


def test_onnx_runtime_telemetry_is_off_on_the_line(model: Path, tmp_path: Path) -> None:
    """onnxruntime 1.29+ on Linux stores a device id in the home folder and uploads usage events; a service
    user without a home printed its warning at every start. The runtime turns it off; a site sets the
    variables to 0 to leave it on (the control, which shows the attack is real with this onnxruntime)."""
    image = make_image(tmp_path / "a.png", 64, 64, bright=True)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ORT_") and k not in ("CI", "GITHUB_ACTIONS")
    }
    for label, extra in (
        ("default", {}),
        ("opted in", {"ORT_DISABLE_TELEMETRY": "0", "ORT_TELEMETRY_DISABLED": "0"}),
    ):
        home = tmp_path / label
        home.mkdir()
        out = home / "r.jsonl"
        cmd = [sys.executable, "-m", "defectscope", "inspect", str(model), str(image), "-o", str(out)]
        proc = subprocess.run(
            cmd, env={**env, **extra, "HOME": str(home)}, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert bool(_device_id_files(home)) is (label == "opted in"), (label, proc.stderr)


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in or moved out of, for root too (chattr +i), or by chmod as a user."""
    folder = tmp_path / "hot"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("chattr +i is not available to make a folder root cannot write")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_watch_refuses_a_hot_folder_it_cannot_move_files_out_of(
    model: Path, frozen: Path, tmp_path: Path
) -> None:
    """Every file got its row, then 'cannot move ... will retry' forever: nothing was ever filed."""
    proc = defectscope("watch", model, "--in", frozen, "--out", tmp_path / "out", cwd=tmp_path)
    line = one_line_error(proc)
    assert f"--in {frozen}: cannot create files in {frozen}" in line and "needs write access to --in" in line
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_watch_files_a_relative_link_still_pointing_at_its_image(model: Path, tmp_path: Path) -> None:
    """``ln -s ../imgs/a.png hot/a.png`` was renamed into NG/, where it dangled: the evidence was lost."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(1, bright=True))
    proc = start_watch(model, hot, out, log)
    try:
        os.symlink("../imgs/a.png", hot / "a.png")
        wait_for(
            lambda: len(read_rows(out)) == 1 and not os.path.lexists(hot / "a.png"), what="the link filed"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    filed = out / read_rows(out)[0]["moved_to"]
    assert filed.is_symlink() and filed.read_bytes() == (tmp_path / "imgs" / "a.png").read_bytes()


def test_bench_inspect_measures_only_its_own_run(model: Path, tmp_path: Path) -> None:
    """A failed run in a reused --workdir reported the last run's rows as 144 images/s and exited 0."""
    bench = [sys.executable, str(REPO / "deploy" / "bench_inspect.py")]
    common = [
        "--images",
        "3",
        "--source",
        "simple",
        "--min-side",
        "64",
        "--max-side",
        "80",
        "--workdir",
        str(tmp_path),
    ]
    good = subprocess.run([*bench, str(model), *common], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0 and json.loads(good.stdout)["rows"] == 3, good.stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.read_bytes()[:100])
    bad = subprocess.run([*bench, str(broken), *common], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and json.loads(bad.stdout)["rows"] == 0, bad.stdout
    assert bad.stderr.startswith("bench_inspect: inspect failed: defectscope inspect: error:")
    for args in (["--images", "0"], ["--min-side", "90", "--max-side", "80"]):
        proc = subprocess.run([*bench, str(model), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr
