"""A checkpoint is data: hostile checkpoints are refused by the real CLI before anything runs.

Every attack writes a marker file if it gets to run; each test asserts a one-line error, exit 2,
no marker and no output.  The first two are the attacks of issue 15 that the old name-prefix guard
let through.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trust_files import Payload, cli, data_of, error_line, genuine_checkpoint, variant, write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def genuine(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = write_images(tmp_path / "images")
    path = tmp_path / "genuine.ckpt"
    return path, genuine_checkpoint(path, root)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(ckpt: dict[str, Any]) -> None:
        data_of(ckpt)[key] = value

    return edit


def _marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned.txt"


# (name, edit of the run config's data, text the error must contain); {marker} / {pickle} filled in
DATA_ATTACKS: list[tuple[str, Callable[[Path, Path], Callable[[dict[str, Any]], None]], str]] = [
    (
        "write_text through a module's globals (issue 15)",
        lambda m, _p: (
            lambda c: c["hyper_parameters"]["run_config"].update(
                data={
                    "_target_": "defectscope.training.train.Path.write_text",
                    "self": {"_target_": "defectscope.training.train.Path", "_args_": [str(m)]},
                    "data": "pwned",
                }
            )
        ),
        "data._target_ is 'defectscope.training.train.Path.write_text'",
    ),
    (
        "torch.load of a second, pickled file (issue 15)",
        lambda _m, p: (
            lambda c: c["hyper_parameters"]["run_config"].update(
                data={"_target_": "defectscope.training.train.torch.load", "f": str(p), "weights_only": False}
            )
        ),
        "data._target_ is 'defectscope.training.train.torch.load'",
    ),
    (
        "nested _target_ in the source",
        lambda m, _p: _set("source", {"_target_": "pathlib.Path.write_text", "self": str(m), "data": "x"}),
        "data.source._target_",
    ),
    (
        "nested _target_ inside an allowed Compose",
        lambda m, _p: _set(
            "eval_transform",
            {
                "_target_": "albumentations.Compose",
                "transforms": [{"_target_": "defectscope.training.train.Path.write_text", "self": str(m)}],
            },
        ),
        "data.eval_transform.transforms[0]._target_",
    ),
    (
        "attribute path through albumentations' globals",
        lambda _m, _p: _set(
            "eval_transform", {"_target_": "albumentations.core.composition.os.system", "command": "true"}
        ),
        "'albumentations.core.composition.os.system'",
    ),
    (
        "_partial_",
        lambda _m, _p: _set(
            "eval_transform", {"_target_": "albumentations.HorizontalFlip", "_partial_": True}
        ),
        "_partial_ is refused",
    ),
    (
        "_args_",
        lambda m, _p: _set("eval_transform", {"_target_": "albumentations.Compose", "_args_": [[str(m)]]}),
        "_args_ is refused",
    ),
    (
        "_recursive_ and _convert_",
        lambda _m, _p: _set("split", {"_recursive_": False, "_convert_": "all", "seed": 1}),
        "_recursive_ is refused",
    ),
    (
        "_target_ in the training transforms too",
        lambda _m, _p: _set("train_transform", {"_target_": "builtins.exec", "source": "1"}),
        "data.train_transform._target_ is 'builtins.exec'",
    ),
    (
        "an oversize string",
        lambda _m, _p: _set("source", {"kind": "folder", "root": "x" * 100_000}),
        "a string of 100000 characters",
    ),
    (
        "an odd type",
        lambda _m, _p: _set("batch_size", [4] * 3),
        "data.batch_size must be a whole number in [1, 16384], got [4, 4, 4]",
    ),
    (
        "an unknown source kind",
        lambda _m, _p: _set("source", {"kind": "os.system"}),
        "run_config.data.source.kind must be one of folder, csv, elpv, synthetic, got 'os.system'",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("attack", DATA_ATTACKS, ids=[a[0] for a in DATA_ATTACKS])
def test_evaluate_refuses_a_hostile_data_config(
    attack: Any, genuine: tuple[Path, dict[str, Any]], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, edit_for, expected = attack
    marker = _marker(tmp_path)
    pickled = tmp_path / "second.pt"
    torch.save(Payload(marker), pickled)  # what the torch.load attack would unpickle
    evil = variant(genuine[1], tmp_path / "evil.ckpt", edit_for(marker, pickled))
    out = tmp_path / "eval-out"
    proc = cli(["evaluate", f"ckpt_path={evil}", f"hydra.run.dir={out}"], tmp_path, cli_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith("defectscope evaluate: error: ") and expected in line, line
    assert not marker.exists()
    assert not (out / "metrics.json").exists() and not (out / "plots").exists()


INFO_ATTACKS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "_target_ in model_kwargs",
        lambda c: c["defectscope"]["model_kwargs"].update(_target_="os.system"),
        "model_kwargs._target_: _target_ is refused",
    ),
    (
        "a model name that is a dotted path",
        lambda c: c["defectscope"].update(model_name="os.system"),
        "unknown model 'os.system'",
    ),
    (
        "an oversize class list",
        lambda c: c["defectscope"].update(class_names=[f"c{i}" for i in range(5000)]),
        "class_names: 5000 entries (at most 1000)",
    ),
    (  # the model file's rule: evaluate took it and export refused it
        "a class name no model file can carry",
        lambda c: c["defectscope"].update(class_names=["good", "a\tb"]),
        "class_names: class name(s) 'a\\tb' cannot be carried by a model",
    ),
    (
        "a threshold given as text",
        lambda c: c["defectscope"].update(threshold="0.5"),
        "threshold: expected a number",
    ),
    (
        "deeply nested kwargs",
        lambda c: c["defectscope"]["model_kwargs"].update(stages=_deep(40)),
        "nested deeper than 16 levels",
    ),
    (
        "a teacher hash that is a path",
        lambda c: c["defectscope"].update(teacher_sha256="../../teacher.onnx"),
        "teacher_sha256: expected 64 hex digits",
    ),
    (
        "a pretrained-weights URL",
        lambda c: c["defectscope"]["model_kwargs"].update(weights="https://example.invalid/w.pth"),
        "unknown kwarg(s) 'weights'",
    ),
    (
        "a grading link that is a dotted path",
        lambda c: c["defectscope"].update(grading={"link": "os.system", "ordered": False}),
        "evil.ckpt: defectscope.grading.link is 'os.system'; this defectscope knows softmax, corn",
    ),
    (
        "ordered grades given as a word",
        lambda c: c["defectscope"].update(grading={"link": "softmax", "ordered": "no"}),
        "evil.ckpt: defectscope.grading.ordered must be true or false, got 'no'",
    ),
    (
        "cut points on unordered classes",
        lambda c: c["defectscope"].update(
            grading={"link": "softmax", "ordered": False, "rule": "cuts", "cuts": [0.5]}
        ),
        "evil.ckpt: defectscope.grading.rule is 'cuts'; unordered classes (ordered: false) take argmax",
    ),
    (
        "argmax with cut points",
        lambda c: c["defectscope"].update(grading={"link": "softmax", "ordered": False, "cuts": [0.5]}),
        "evil.ckpt: defectscope.grading.cuts needs 0 value(s) for rule 'argmax' and 2 classes",
    ),
]


def _deep(n: int) -> Any:
    node: Any = 1
    for _ in range(n):
        node = [node]
    return node


# every attack through export; two through evaluate too (both read through the one checkpoint reader)
INFO_CASES = [(a, "export") for a in INFO_ATTACKS] + [(a, "evaluate") for a in INFO_ATTACKS[:2]]


@pytest.mark.slow
@pytest.mark.parametrize(("attack", "command"), INFO_CASES, ids=[f"{a[0]}-{c}" for a, c in INFO_CASES])
def test_checkpoint_info_is_checked_by_every_reader(
    attack: Any, command: str, genuine: tuple[Path, dict[str, Any]], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, edit, expected = attack
    evil = variant(genuine[1], tmp_path / "evil.ckpt", edit)
    out = tmp_path / "out.onnx"
    args = (
        ["evaluate", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'ev'}"]
        if command == "evaluate"
        else ["export", str(evil), "-o", str(out)]
    )
    proc = cli(args, tmp_path, cli_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"defectscope {command}: error: " in line and expected in line, line
    assert not out.exists() and not (tmp_path / "ev" / "metrics.json").exists()


@pytest.mark.slow
def test_a_pickled_checkpoint_is_refused_by_evaluate_export_resume_and_the_benchmark(
    genuine: tuple[Path, dict[str, Any]], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    marker = _marker(tmp_path)
    evil = tmp_path / "pickled.ckpt"
    torch.save({**genuine[1], "extra": Payload(marker)}, evil)
    runs = {
        "evaluate": ["-m", "defectscope", "evaluate", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'ev'}"],
        "export": ["-m", "defectscope", "export", str(evil), "-o", str(tmp_path / "m.onnx")],
        "train": [
            "-m", "defectscope", "train", "experiment=smoke", "logger=none", f"ckpt_path={evil}",
            f"paths.data_dir={tmp_path / 'nodata'}", f"hydra.run.dir={tmp_path / 'tr'}",
        ],
        "elpv": [str(REPO / "benchmarks" / "elpv.py"), "--checkpoint", str(evil)],
    }  # fmt: skip
    for name, args in runs.items():
        proc = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert "weights_only=True" in error_line(proc), name
        assert not marker.exists(), name
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "nodata").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["ModelCheckpoint{'monitor': 'val/bal_acc'}", "BestAndLastCheckpoint{...}"])
def test_resume_refuses_checkpoint_paths_outside_its_folder(
    genuine: tuple[Path, dict[str, Any]], tmp_path: Path, cli_env: dict[str, str], key: str
) -> None:
    """ModelCheckpoint deletes the files its restored state names: a checkpoint must not choose them,
    whatever key (a subclass's, or any name) the state is filed under."""
    victim = tmp_path / "victim.ckpt"
    victim.write_text("keep me")
    folder = str(tmp_path / "tr" / "checkpoints")

    def edit(c: dict[str, Any]) -> None:
        c["callbacks"] = {
            key: {
                "dirpath": folder,
                "best_model_path": f"{folder}/best.ckpt",
                "best_k_models": {f"{folder}/../../victim.ckpt": 0.1},
                "last_model_path": "",
            }
        }

    evil = variant(genuine[1], tmp_path / "evil.ckpt", edit)
    proc = cli(
        ["train", "experiment=smoke", "logger=none", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'tr'}",
         f"paths.data_dir={tmp_path / 'nodata'}"],
        tmp_path, cli_env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "may only name .ckpt files in its own folder" in error_line(proc)
    assert victim.read_text() == "keep me" and not (tmp_path / "nodata").exists()


@pytest.mark.slow
def test_the_genuine_checkpoint_evaluates(
    genuine: tuple[Path, dict[str, Any]], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The control: the same file unmodified is evaluated on its own test split (allow-listed transforms)."""
    out = tmp_path / "ev"
    proc = cli(
        ["evaluate", f"ckpt_path={genuine[0]}", f"hydra.run.dir={out}", "threads=1"], tmp_path, cli_env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 6 images (3 good, 3 defect): the test split of folder" in proc.stdout
    assert (out / "metrics.json").is_file()
