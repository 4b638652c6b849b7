"""Bad input in training and at the line (issue 15, part 4), through the real commands.

* one class folder only: a one-line error naming the folder and the need for two classes;
* a class too small for validation/test: warnings in the log and the data report, saying what to do;
* degenerate images (4x4, 3x600): ``too_small`` in training's scan and in the runtime alike, because
  the minimum-size rule applies to real pixels before rounding to the size multiple.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blocked_imports import blocking_env
from defectscope.data.datamodule import DefectDataModule
from defectscope.runtime.image import ImageLoadError, LoaderConfig, load_image
from onnx_models import build_model, make_image


def _png(path: Path, width: int, height: int, value: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, np.uint8)).save(path)
    return path


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("size", [(4, 4), (3, 600), (600, 3), (31, 64)])
def test_minimum_size_is_checked_on_real_pixels_before_rounding(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    cfg = LoaderConfig(channels=1, min_size=32, size_multiple=32)
    with pytest.raises(ImageLoadError) as exc:
        load_image(_png(tmp_path / "x.png", *size), cfg)
    assert exc.value.kind == "too_small"
    assert f"{size[0]}x{size[1]}; the minimum side is 32 px (checked before rounding" in exc.value.reason
    assert load_image(_png(tmp_path / "ok.png", 32, 40), cfg).shape == (32, 32, 1)  # rounded down, still fine


def test_rounding_below_the_minimum_is_too_small_too(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="45x45 becomes 32x32 after rounding to the size multiple 32"):
        load_image(_png(tmp_path / "x.png", 45, 45), LoaderConfig(channels=1, min_size=40, size_multiple=32))


def test_degenerate_images_are_too_small_rows_at_the_line(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    model = build_model(tmp_path / "m.onnx", size_multiple=32, min_size=32)
    files = [_png(tmp_path / "in" / "dot.png", 4, 4, 250), _png(tmp_path / "in" / "line.png", 3, 600, 250)]
    files.append(make_image(tmp_path / "in" / "fine.png", 64, 64, bright=False))
    out = tmp_path / "r.jsonl"
    proc = _run(
        [*defectscope_cmd, "inspect", str(model), str(tmp_path / "in"), "-o", str(out)], tmp_path, cli_env
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # 1: some inputs failed
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    for name in ("dot.png", "line.png"):
        assert rows[name]["status"] == "error" and rows[name]["verdict"] is None, rows[name]
        assert rows[name]["error"].startswith("too_small: "), rows[name]
    assert rows["fine.png"]["status"] == "ok" and rows["fine.png"]["verdict"] in ("OK", "NG")


def test_degenerate_images_fail_training_scan(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "data"
    for cls in ("good", "bad"):
        for i in range(3):
            _png(root / cls / f"{i}.png", 64, 64, 40 + 60 * i)
    _png(root / "bad" / "dot.png", 4, 4)
    proc = _run(
        [*defectscope_cmd, "scan", str(root), "data.loader.size_multiple=32", "data.loader.min_size=32"],
        tmp_path,
        cli_env,
    )
    assert proc.returncode == 1
    assert "dot.png: [too_small] 4x4; the minimum side is 32 px" in proc.stdout


@pytest.mark.slow
def test_one_class_folder_is_a_clear_error(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "only-good"
    for i in range(6):
        _png(root / "good" / f"{i}.png", 64, 64, 30 + 10 * i)
    proc = _run(
        [*defectscope_cmd, "train", "data=folder", f"data.source.root={root}", "logger=none", "data.num_workers=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path, cli_env,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope train: error:")]
    assert len(errors) == 1 and f"folder {root}: only one class (good)" in errors[0]
    assert "at least 2 classes" in errors[0]


def test_a_class_too_small_for_validation_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    for i in range(20):
        _png(root / "good" / f"{i}.png", 40, 40, 20 + i)
    _png(root / "rare" / "0.png", 40, 40, 200)
    dm = DefectDataModule(
        {"kind": "folder", "root": str(root), "good_class": "good"}, loader={"min_size": 32}, scan_workers=1
    )
    dm.setup("fit")
    assert "class 'rare' has no val images" in dm.report and "class 'rare' has no test images" in dm.report
    assert "validation split has no defect images" in dm.report and "what to do: add images" in dm.report
    assert "WARNING: class 'rare' has no val images" in dm.report
    assert any("class 'rare' has no val images" in r.getMessage() for r in caplog.records)


#: config mistakes and the one line each gets, all told before torch is imported
DATA_MISTAKES = {
    "data.multi_scale=[0]": "data.multi_scale must be null or a non-empty list of scale factors",
    "+data.foo=1": "data: unknown key(s) ['foo']; valid keys: source, loader, split,",
    # numbers given as words: before these were tracebacks from Lightning, the seed or the generator
    "trainer.max_epochs=abc": "trainer.max_epochs must be a whole number >= 1, or -1 for no limit, got 'abc'",
    "seed=abc": "seed must be a whole number in [0, 2**32), got 'abc'",
    "data.source.n=abc": "data.source.n must be a whole number, got 'abc'",
    "data.batch_size=abc": "data.batch_size must be a whole number in [1, 16384], got 'abc'",
    "trainer.accumulate_grad_batches=0": "trainer.accumulate_grad_batches must be a whole number >= 1, got 0",
    "trainer.limit_train_batches=abc": (
        "trainer.limit_train_batches must be a share of the batches in [0, 1] or a whole number of batches >= 0, "
        "got 'abc'"
    ),
    "+trainer.val_check_interval=0.0": "trainer.val_check_interval must be a share of the batches in (0, 1]",
    "trainer.num_sanity_val_steps=-2": "trainer.num_sanity_val_steps must be a whole number >= -1 (-1: the",
    # words that read as true under bool(), a number where class names belong, and "no limit" under a
    # schedule that needs the run's length: silently wrong runs or tracebacks before
    "data.ordered=no": "data.ordered: expected true or false, got str 'no'",
    "data.dihedral=off": "data.dihedral: expected true or false, got str 'off'",
    "threshold.ng_classes=5": "threshold.ng_classes: expected a list of class names or '>= NAME', got 5",
    "trainer.max_epochs=-1": "trainer.max_epochs=-1 (no limit) leaves the learning-rate schedule no length",
    "+data.source.colour=red": "data.source: unknown key(s) ['colour'] for kind=synthetic",
    # the model module's settings, checked before the data are generated or scanned (they were after)
    "ordinal.objective=foo": "ordinal.objective must be auto or one of ce, soft, expected, corn, got 'foo'",
    "optim.sam_rho=abc": "optim.sam_rho must be a number >= 0 (0 or null = off), got 'abc'",
    "loss.ng_weight=-1": "loss.ng_weight must be a number >= 0 (0 = off), got -1",
    # data settings that were tracebacks from the splitter, numpy, torch or albumentations, most of
    # them after the scan (an attack review)
    "data.split.val_fraction=1.5": "data.split.val_fraction must be a number in [0, 1) or null, got 1.5",
    "data.split.val_fraction=abc": "data.split.val_fraction must be a number in [0, 1) or null, got 'abc'",
    "data.split.test_fraction=1": "data.split.test_fraction must be a number in [0, 1) or null, got 1",
    "data.mean=[0.5,0.5]": "data.mean has 2 values; expected 1 or 1 (data.loader.channels)",
    "data.num_workers=-1": "data.num_workers must be a whole number in [0, 256], got -1",
    "data.seed=-1": "data.seed must be a whole number >= 0, got -1",
    "data.drop_last=maybe": "data.drop_last: expected true or false, got str 'maybe'",
    "data.pin_memory=no": "data.pin_memory: expected true, false or null, got str 'no'",
    "data.train_transform=5": "data.train_transform: expected a transform mapping with _target_, got int",
    # Hydra built any transform a config named; the checkpoint's config then failed evaluate's allow-list
    "data.train_transform.transforms=[{_target_:albumentations.Rotate,limit:5}]": (
        "data.train_transform.transforms[0]._target_ is 'albumentations.Rotate'; a data config is built only"
    ),
    "data.source.n=-5": "data.source.n must be >= 1, got -5",
    "data.mean=[abc]": "data.mean must be null or a list of numbers in",
    "memory_format=x": "memory_format must be one of channels_last, contiguous, got 'x'",
    "distill.teacher=nope.onnx": "distill.teacher: nope.onnx: model file not found; expected an exported model",
    # values of a type no check expected: tracebacks once the settings were checked outside Hydra (review)
    "data.split=5": "data.split must be a mapping of val_fraction, test_fraction and seed, got 5",
    "data.source.kind=[a]": "data.source.kind must be one of folder, csv, elpv, synthetic, got ['a']",
    "data.source.classes=[[a]]": "data.source.classes must be null or a list of class names, got [['a']]",
    # a value an interpolation cannot resolve (data.source.channels reads data.loader.channels)
    "data.loader=5": "(config key data.source.channels)",
    # a second attack review: groups given as numbers, a synthetic root or rejects file that is no path
    "loss=5": "loss must be a mapping of settings (loss.NAME=VALUE), got 5",
    "threshold=5": "threshold must be a mapping of settings (threshold.NAME=VALUE), got 5",
    "ordinal=5": "ordinal must be a mapping of settings (ordinal.NAME=VALUE), got 5",
    "data.source.root=null": "data.source.root must be the folder to generate into, got None",
    "data.rejects_path=[1]": "data.rejects_path must be null or a file path, got [1]",
    f"distill.teacher={'a' * 300}": "distill.teacher: "
    + "a" * 300
    + ": model file cannot be read (File name too long: at most 255 bytes per file or folder name",
}


def test_data_config_mistakes_are_one_line_naming_the_key(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """A value the data module refuses reads as its own message on one line, not Hydra's 3-line wrapper,
    and every such setting is told before torch and Lightning are imported (seconds): here they cannot be."""
    env = blocking_env(tmp_path, ("torch", "lightning", "pytorch_lightning"), cli_env)
    for override, message in DATA_MISTAKES.items():
        proc = _run(
            [*defectscope_cmd, "train", "experiment=smoke", "logger=none", f"paths.data_dir={tmp_path / 'data'}",
             f"hydra.run.dir={tmp_path / 'run'}", override],
            tmp_path, env,
        )  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope train: error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "full_key" not in proc.stderr and "Error in call to target" not in proc.stderr
        # the run folder Hydra made says why the run stopped (its job log ends with the same line)
        job_log = (tmp_path / "run" / "train.log").read_text().splitlines()
        assert job_log and job_log[-1].endswith(errors[0]), job_log[-3:]
        assert not (tmp_path / "data").exists()  # refused before the synthetic set was generated


def test_export_evaluate_and_search_mistakes_are_told_before_torch_is_imported(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """A mistyped checkpoint path, a folder or an exported model where the checkpoint belongs, export's
    option mistakes and search's settings are told without torch (its import alone took 2-5 s of every such
    refusal)."""
    model = build_model(tmp_path / "m.onnx")
    zipped = tmp_path / "weights.bin"  # a zip archive, as torch.save writes: a checkpoint by its first bytes
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("weights/data.pkl", b"")
    env = blocking_env(tmp_path, ("torch", "lightning", "pytorch_lightning"), cli_env)
    cases = [
        (["export", "nope.ckpt", "-o", "x.onnx"], "nope.ckpt: checkpoint file does not exist"),
        (
            ["export", str(tmp_path), "-o", "x.onnx"],
            "is not a file (expected a .ckpt written by `defectscope train`)",
        ),
        (
            ["export", str(model), "-o", "x.onnx"],
            "m.onnx is an exported model (ONNX), not a training checkpoint",
        ),
        (["export", "nope.ckpt", "-o", "x.onnx", "--opset", "17"], "--opset 17 is too old"),
        # inspect's --resume carried over: Hydra's usage and "unrecognized arguments" before
        (
            ["train", "experiment=smoke", "--resume"],
            "--resume is not an option of defectscope train: a run resumes "
            "with ckpt_path=last and the same hydra.run.dir=RUN_FOLDER",
        ),
        (
            ["search", "--resume"],
            "--resume is not an option of defectscope search: a search continues its study",
        ),
        # train's ckpt_path: by the checkpoint reader's first look, before the data and torch (a newcomer read
        # "is not a checkpoint file" for a path that did not exist, after the torch import)
        (
            ["train", "experiment=smoke", "ckpt_path=nope.ckpt", f"hydra.run.dir={tmp_path / 't'}"],
            "ckpt_path: nope.ckpt: checkpoint file does not exist; ckpt_path takes a .ckpt file, 'last' or null",
        ),
        (
            ["train", "experiment=smoke", f"ckpt_path={model}", f"hydra.run.dir={tmp_path / 't'}"],
            "ckpt_path: " + str(model) + " is an exported model (ONNX), not a training checkpoint",
        ),
        (["evaluate", "ckpt_path=nope.ckpt"], "nope.ckpt: checkpoint file does not exist"),
        (["evaluate", "ckpt_path=nope.ckpt", "threshold=2"], "threshold must be a number in [0, 1], or null"),
        (["evaluate", "ckpt_path=null"], "ckpt_path is required: defectscope evaluate ckpt_path=CHECKPOINT"),
        (["evaluate", "ckpt_path=nope.ckpt", "seed=-1"], "seed must be a whole number in [0, 2**32), got -1"),
        (
            ["evaluate", "ckpt_path=nope.ckpt", "evaluate_on=every"],
            "evaluate_on must be one of test, all or null",
        ),
        (
            ["evaluate", "ckpt_path=nope.ckpt", "data=folder", "data.num_workers=999"],
            "data.num_workers must be",
        ),
        (["evaluate", f"ckpt_path={'a' * 300}.ckpt"], "cannot be read (File name too long:"),
        (["export", f"{'a' * 300}.ckpt", "-o", "x.onnx"], "cannot be read (File name too long:"),
        (["export", "nope.ckpt", "-o", f"{'o' * 300}.onnx"], "-o ooo"),
        (["export", "nope.ckpt", "-o", "x.onnx", "--images", "i" * 300], "--images iii"),
        (["evaluate", "ckpt_path=nope.ckpt", f"paths.output_dir={'o' * 300}"], "paths.output_dir ooo"),
        (
            ["evaluate", "ckpt_path=nope.ckpt", "+data.evaluate_on=all"],
            "data.evaluate_on given without a data",
        ),
        # search: its own settings and the trials' training settings, before Lightning is imported for the trials
        (
            [
                "search",
                "experiment=smoke",
                "search=smoke",
                "search.metric=acc",
                f"hydra.run.dir={tmp_path / 's'}",
            ],
            "search.metric must be a validation metric such as val/bal_acc, got 'acc'",
        ),
        (
            [
                "search",
                "experiment=smoke",
                "search=smoke",
                "data.split.seed=x",
                f"hydra.run.dir={tmp_path / 's'}",
            ],
            "data.split.seed must be a whole number >= 0 or null, got 'x'",
        ),
        (["evaluate", f"ckpt_path={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"], "is not a file"),
        # a path first: a checkpoint is pointed to ckpt_path= (Hydra's "missing EQUAL" or the exported-model
        # evaluation's "the following arguments are required: data" before)
        (["evaluate", "nope.ckpt"], "nope.ckpt: checkpoint file does not exist"),
        (
            ["evaluate", str(zipped)],
            f"{zipped} is a training checkpoint: defectscope evaluate ckpt_path={zipped}",
        ),
        (["evaluate", "hepl"], "hepl: no such file; expected defectscope evaluate MODEL.onnx DATA, or"),
        # folders and files written only after the work, and the run folder Hydra makes before the job: each
        # named by its key before anything runs (after the test loop or the scan, or naming no key, before)
        (
            ["evaluate", "ckpt_path=nope.ckpt", f"metrics_file={tmp_path}"],
            f"metrics_file {tmp_path}: is a folder",
        ),
        (
            ["train", "experiment=smoke", f"hydra.run.dir={model}"],
            f"hydra.run.dir {model}: is a file, not a folder",
        ),
        (
            ["search", "experiment=smoke", "search=smoke", f"hydra.run.dir={model}"],
            f"hydra.run.dir {model}: is a",
        ),
        (
            ["train", "-m", "experiment=smoke", f"hydra.sweep.dir={model}"],
            f"hydra.sweep.dir {model}: is a file",
        ),
        (
            ["train", "experiment=smoke", f"paths.data_dir={model}"],
            f"data.source.root {model}/synthetic-smoke: {model} is a file, not a folder",
        ),
        (
            ["train", "experiment=smoke", "data.on_bad_file=skip", f"data.rejects_path={tmp_path}"],
            f"data.rejects_path {tmp_path}: is a folder",
        ),
    ]
    for args, message in cases:
        proc = _run([*defectscope_cmd, *args], tmp_path, env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
        errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
        assert len(errors) == 1 and message in errors[0], (args, proc.stderr)


def test_a_manifest_naming_a_file_that_is_not_utf8_is_one_line_in_the_job_log_too(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """The job log's UTF-8 encoder met the undecodable byte of a file name and printed a "--- Logging error ---"
    traceback after the one-line error; a manifest that is a pipe made the run wait for ever."""
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label\nmiss\xff.png,good\nb.png,crack\n")
    run_dir = tmp_path / "run"
    base = [*defectscope_cmd, "train", "data=csv", "logger=none", f"hydra.run.dir={run_dir}"]
    proc = _run([*base, f"data.source.path={manifest}"], tmp_path, cli_env)
    assert proc.returncode == 2 and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope train: error:")]
    assert (
        len(errors) == 1
        and "2 of 2 image files cannot be used" in errors[0]
        and "miss\\udcff.png" in errors[0]
    )
    assert (run_dir / "train.log").read_text(encoding="utf-8").splitlines()[-1].endswith(errors[0])
    os.mkfifo(tmp_path / "pipe.csv")
    proc = _run([*base, f"data.source.path={tmp_path / 'pipe.csv'}"], tmp_path, cli_env)
    assert proc.returncode == 2 and "pipe.csv: is not a regular file (a pipe or device)" in proc.stderr


def test_a_missing_required_key_is_one_line_in_the_console_and_the_job_log(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """``defectscope evaluate`` without ``ckpt_path`` (a ``???`` key): one line naming it with an example, and the
    run folder Hydra already made keeps the same line, so it does not look like a run that vanished."""
    proc = _run([*defectscope_cmd, "evaluate", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("defectscope evaluate: error:")]
    assert len(errors) == 1 and "config key(s) ckpt_path must be given" in errors[0], proc.stderr
    assert errors[0] not in proc.stdout  # the job log's line is not echoed to the console again
    job_log = (tmp_path / "run" / "evaluate.log").read_text().splitlines()
    assert job_log and job_log[-1].endswith(errors[0]), job_log[-3:]


def test_output_paths_are_checked_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file where a folder is wanted (or the reverse) is one line and exit 2, before anything is scored,
    scanned or generated; before, each was a traceback after the work."""
    from defectscope.data import scan
    from defectscope.evaluation import cli as evaluate_cli
    from defectscope.synth import main as synth_main

    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (
            evaluate_cli.main,
            [
                str(build_model(tmp_path / "m.onnx")),
                str(folder),
                "--out",
                str(notes),
            ],  # the model is named first
            "--out ",
            "is a file, not a folder",
        ),
        (synth_main, [str(notes), "--n", "4"], "synth ", "is a file, not a folder"),
        (scan.main, [str(folder), "--rejects", str(folder)], "--rejects ", "is a folder; give a file name"),
    ]
    for entry, argv, option, message in cases:
        assert entry(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and message in err, err
    assert notes.read_text() == "hi" and list(folder.iterdir()) == []
