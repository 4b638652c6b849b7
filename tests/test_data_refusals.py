"""Data problems found while listing and scanning, refused before training with one line naming the key
or the file (an attack review found each as a traceback, several after a whole training run, two of them
deleting the user's images: tests/test_data_sources.py and tests/test_synth.py hold those)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from defectscope.data.datamodule import DefectDataModule
from defectscope.data.errors import DataConfigError
from defectscope.data.rebuild import datamodule_kwargs
from defectscope.data.settings import data_settings
from defectscope.data.sources import SourceError, build_source
from defectscope.training.app_errors import is_own_error
from defectscope.training.config import ng_classes_setting
from onnx_models import make_image


def _classes(root: Path, names: list[str], n: int = 6, size: tuple[int, int] = (64, 64)) -> Path:
    for name in names:
        for i in range(n):
            make_image(root / name / f"{i}.png", *size, bright=name != "good", seed=i)
    return root


def test_an_empty_split_the_run_needs_is_refused_before_training(tmp_path: Path) -> None:
    root = _classes(tmp_path / "parts", ["good", "crack"])
    dm = DefectDataModule({"kind": "folder", "root": str(root)}, split={"test_fraction": 0}, scan_workers=1)
    dm.setup("fit")
    dm.require_splits("train", "val")
    with pytest.raises(SourceError, match=r"the test split is empty; set data.split.test_fraction \(> 0\)"):
        dm.require_splits("train", "val", "test")
    fixed = tmp_path / "fixed"  # split folders without test/: test_fraction does not apply there
    _classes(fixed / "train", ["good", "crack"])
    _classes(fixed / "val", ["good", "crack"], n=2)
    dm = DefectDataModule({"kind": "folder", "root": str(fixed)}, scan_workers=1)
    dm.setup("fit")
    with pytest.raises(
        SourceError, match=r"a test/ folder beside train/ or test rows in a CSV, or run with test=false"
    ) as err:
        dm.require_splits("train", "val", "test")
    assert is_own_error(err.value)


def test_a_size_changing_step_is_found_whatever_its_probability(tmp_path: Path) -> None:
    """At p=0.1 a 90-degree turn hid from the probe and stopped training mid-epoch."""
    root = _classes(tmp_path / "parts", ["good", "crack"], size=(96, 64))
    spec = {
        "_target_": "albumentations.Compose",
        "transforms": [{"_target_": "albumentations.RandomRotate90", "p": 0.1}],
    }
    dm = DefectDataModule({"kind": "folder", "root": str(root)}, train_transform=spec, scan_workers=1)
    with pytest.raises(
        DataConfigError, match=r"data.train_transform changed an image of shape \(64, 96, 1\)"
    ):
        dm.setup("fit")


def test_steps_that_cannot_run_pass_and_rare_choices_are_found(tmp_path: Path) -> None:
    root = _classes(tmp_path / "parts", ["good", "crack"], size=(96, 64))
    off = {
        "_target_": "albumentations.Compose",
        "transforms": [{"_target_": "albumentations.RandomRotate90", "p": 0}],
    }
    DefectDataModule({"kind": "folder", "root": str(root)}, train_transform=off, scan_workers=1).setup("fit")
    rare = {"_target_": "albumentations.OneOf", "p": 0.5, "transforms": [
        {"_target_": "albumentations.RandomRotate90", "p": 0.02}, {"_target_": "albumentations.HorizontalFlip", "p": 0.98}]}  # fmt: skip
    dm = DefectDataModule({"kind": "folder", "root": str(root)}, train_transform=rare, scan_workers=1)
    with pytest.raises(DataConfigError, match=r"changed an image of shape"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("drop_last", "maybe", "data.drop_last: expected true or false, got str 'maybe'"),
        ("seed", -1, "data.seed must be a whole number >= 0, got -1"),
        ("split", {"val_fraction": 2}, "data.split.val_fraction must be a number in [0, 1) or null, got 2"),
    ],
)
def test_settings_errors_are_the_commands_own(tmp_path: Path, key: str, value: object, message: str) -> None:
    """Raised when the module is built, as evaluate builds it from its own data= options: one line there too."""
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        DefectDataModule({"kind": "folder", "root": str(tmp_path)}, **{key: value})  # type: ignore[arg-type]
    assert is_own_error(err.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scan_workers": -1}, "data.scan_workers must be a whole number in [0, 256], got -1"),
        ({"batch_size": 0}, "data.batch_size must be a whole number in [1, 16384], got 0"),
        ({"source": {"kind": ["folder"]}}, "data.source.kind must be one of folder, csv, elpv, synthetic"),
        ({"source": None}, "data.source.kind is required"),
    ],
)
def test_a_recorded_data_config_is_held_to_trainings_rules(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    """One rule for a data config typed for training and one read back from a checkpoint by evaluate: before,
    num_workers=65 trained and its checkpoint could not be evaluated (now: capped at 256, clamped to the cores), batch_size=0 passed the rebuild, and a
    source kind given as a list was a TypeError traceback."""
    spec = {"source": {"kind": "folder", "root": str(tmp_path)}, **data}
    with pytest.raises(ValueError, match=re.escape(message)):
        data_settings(**spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(message.replace("data", "run.ckpt: run_config.data", 1))):
        datamodule_kwargs(spec, "run.ckpt: run_config.data", from_file=True)
    accepted = {"source": {"kind": "folder", "root": str(tmp_path)}, "num_workers": 96, "batch_size": 1}
    assert data_settings(**accepted).num_workers == 96  # type: ignore[arg-type]  # a 128-core machine's
    with pytest.raises(
        ValueError, match=re.escape("data.num_workers must be a whole number in [0, 256], got 257")
    ):
        data_settings(**{**accepted, "num_workers": 257})  # type: ignore[arg-type]
    # read back from a checkpoint on a smaller machine: at most its cores (a file must not start 96 processes)
    assert datamodule_kwargs(accepted, "data", from_file=True)["num_workers"] == min(96, os.cpu_count() or 1)


@pytest.mark.parametrize("name", ["bad\nline", "x" * 210, os.fsdecode(b"\xff\xfe")])
def test_class_names_no_model_can_carry_are_refused_at_listing(tmp_path: Path, name: str) -> None:
    """They trained, then failed at their own best.ckpt, at export or as a UnicodeEncodeError."""
    root = _classes(tmp_path / "parts", ["good"], n=2)
    make_image(
        Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(name), b"0.png"))), 64, 64, bright=True
    )
    with pytest.raises(
        SourceError, match=r"cannot be carried by a model: expected printable UTF-8 names of 1 to 200"
    ):
        build_source({"kind": "folder", "root": str(root)})


def test_class_lists_twice_and_numeric_class_names(tmp_path: Path) -> None:
    root = _classes(tmp_path / "parts", ["good", "crack"], n=2)
    with pytest.raises(SourceError, match=r"class name\(s\) \['good'\] listed twice"):
        build_source({"kind": "folder", "root": str(root), "classes": ["good", "good", "crack"]})
    digits = _classes(tmp_path / "digits", ["0", "1"], n=2)
    data = build_source(
        {"kind": "folder", "root": str(digits), "good_class": 0, "classes": [0, 1]}
    )  # as Hydra reads them
    assert (data.good_class, data.class_names) == ("0", ["0", "1"])
    # more classes than a model file carries: refused when listed, not at the run's own checkpoint
    many = tmp_path / "many"
    for i in range(1001):
        (many / f"c{i:04d}").mkdir(parents=True)
    make_image(many / "c0000" / "a.png", 64, 64, bright=False)
    with pytest.raises(SourceError, match=r"1001 classes; a model file carries at most 1000"):
        build_source({"kind": "folder", "root": str(many), "good_class": "c0000"})
    # grades named 0, 0.5 and 1: the NG classes are read back as names by the same rule (0.5 was refused there)
    grades = _classes(tmp_path / "grades", ["0", "0.5", "1"], n=2)
    data = build_source({"kind": "folder", "root": str(grades), "good_class": 0, "classes": [0, 0.5, 1]})
    assert data.class_names == ["0", "0.5", "1"]
    assert ng_classes_setting({"ng_classes": [0.5, 1]}) == ["0.5", "1"]


def test_a_misspelt_csv_label_names_the_class_it_is_close_to(tmp_path: Path) -> None:
    """A typo in a manifest's label column listed the classes but left the reader to find the near one."""
    _classes(tmp_path, ["good", "scratch"], n=2)
    (tmp_path / "m.csv").write_text("path,label\ngood/0.png,good\nscratch/0.png,scrach\nscratch/1.png,dent\n")
    with pytest.raises(SourceError) as info:
        build_source({"kind": "csv", "path": str(tmp_path / "m.csv"), "classes": ["good", "scratch"]})
    assert "row 3: label 'scrach' (did you mean 'scratch'?); row 4: label 'dent';" in str(info.value)
    assert "labels must be in data.source.classes ['good', 'scratch']" in str(info.value)


def test_csv_rows_listing_one_image_twice_and_a_stray_quote(tmp_path: Path) -> None:
    _classes(tmp_path, ["good", "crack"], n=2)
    (tmp_path / "m.csv").write_text("path,label\ngood/0.png,good\ncrack/0.png,crack\ngood/0.png,crack\n")
    with pytest.raises(SourceError, match=r"m.csv: 1 invalid row\(s\): row 4: good/0.png already on row 2"):
        build_source({"kind": "csv", "path": str(tmp_path / "m.csv")})
    rows = "".join(f"good/{i}.png,good\n" if i != 7 else '"good/7.png,good\n' for i in range(9000))
    (tmp_path / "big.csv").write_text("path,label\n" + rows)  # > 128 KB: the quote swallows the rest
    with pytest.raises(
        SourceError, match=r"big.csv: line \d+: not valid CSV \(field larger than field limit"
    ):
        build_source({"kind": "csv", "path": str(tmp_path / "big.csv")})
    # small files: the open quote joins lines into one row (it read as "empty path or label" on a later
    # row, or as a class name holding a line break); CRLF files count lines the same
    for name, text in (
        ("path.csv", 'path,label\ngood/0.png,good\n"crack/0.png,crack\ngood/1.png,good\n'),
        ("label.csv", 'path,label\r\ngood/0.png,good\r\ncrack/0.png,"crack\r\ngood/1.png,good\r\n'),
        ("closed.csv", 'path,label\ngood/0.png,"good\ncrack/0.png",crack\ngood/1.png,good\n'),
        ("end.csv", 'path,label\ngood/0.png,"\ncrack/0.png,crack\ngood/1.png,good\n'),
    ):
        (tmp_path / name).write_bytes(text.encode())
        with pytest.raises(SourceError) as refused:
            build_source({"kind": "csv", "path": str(tmp_path / name)})
        lines = "3-4" if name in ("path.csv", "label.csv") else "2-3" if name == "closed.csv" else "2-4"
        assert re.fullmatch(
            rf".*{name}: lines {lines} are one row: a path, label or split holds a line break \('.+'\), so a "
            "quote there is probably not closed; check its quotes",
            str(refused.value),
        ), refused.value
    # a closed multi-line value in a column of the user's own is data, not a mistake
    (tmp_path / "notes.csv").write_text(
        'path,label,note\ngood/0.png,good,"first line\nsecond line"\ncrack/0.png,crack,ok\n'
    )
    notes = build_source({"kind": "csv", "path": str(tmp_path / "notes.csv")})
    assert [(Path(s.path).name, s.label) for s in notes.samples] == [("0.png", 1), ("0.png", 0)]


@pytest.mark.slow
def test_one_validation_image_trains(
    tmp_path: Path, defectscope_cmd: list[str], cli_env: dict[str, str]
) -> None:
    """torchmetrics squeezes a one-element result to 0-d; the epoch end failed on it."""
    root = tmp_path / "fixed"
    _classes(root / "train", ["good", "crack"], n=4)
    _classes(root / "test", ["good", "crack"], n=1)
    make_image(root / "val" / "good" / "0.png", 64, 64, bright=False)
    proc = subprocess.run(
        [*defectscope_cmd, "train", "data=folder", f"data.source.root={root}", "logger=none", "data.num_workers=0",
         "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


def test_a_recorded_synthetic_source_is_read_back_in_the_generators_class_order() -> None:
    """A checkpoint's synthetic data config without classes (a library caller's) is read back as its folder in
    the generator's class order, not the sorted folder names (evaluate then refused: classes differ)."""
    from defectscope.synth import DEFAULT_CLASSES

    kwargs = datamodule_kwargs({"source": {"kind": "synthetic", "root": "/gen"}}, "ck: data", from_file=True)
    assert kwargs["source"] == {
        "kind": "folder",
        "root": "/gen",
        "extensions": [".png"],
        "classes": list(DEFAULT_CLASSES),
    }


def test_evaluation_checks_no_rejects_file_it_never_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation writes its own rejects list; the data settings' default rejects.csv in the working folder
    (here a folder of that name) was checked anyway and refused a lot given with on_bad_file=skip."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rejects.csv").mkdir()
    spec = {"source": {"kind": "folder", "root": str(tmp_path)}, "on_bad_file": "skip"}
    assert datamodule_kwargs(spec, "data", from_file=False)["on_bad_file"] == "skip"


def test_a_folder_of_camera_and_split_folders_is_unlabelled(tmp_path: Path) -> None:
    """Sub-folders named like splits say nothing of labels: cam1/ beside test/ is an unlabelled set, while a
    folder beside a class folder is a misspelt class (refused, naming it)."""
    from defectscope.evaluation.labelled import read_labelled

    for rel in ("cams/cam1/a.png", "cams/test/b.png", "mixed/good/a.png", "mixed/Crack/b.png"):
        make_image(tmp_path / rel, 64, 64, bright=False)
    assert read_labelled(tmp_path / "cams", ["good", "crack"], "good") is None
    with pytest.raises(SourceError, match=r"sub-folder\(s\) \['Crack'\] are not among the model's classes"):
        read_labelled(tmp_path / "mixed", ["good", "crack"], "good")


def _unlistable(parent: Path) -> Path:
    """A folder under ``parent`` that ``os.scandir`` refuses: chmod 000, or, for root (who reads those), one
    nested past the system's path length limit (made level by level through folder descriptors)."""
    if os.geteuid() != 0:
        folder = parent / "locked"
        folder.mkdir()
        folder.chmod(0)
        return folder
    name, path, fd = "d" * 200, parent, os.open(parent, os.O_RDONLY)
    try:
        while len(str(path)) <= 4200:
            os.mkdir(name, dir_fd=fd)
            fd, old = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            path = path / name
    finally:
        os.close(fd)
    return path


def test_a_folder_that_cannot_be_read_is_told_not_passed_over(tmp_path: Path) -> None:
    """An unreadable folder inside a class folder lost its images without a word (attack: 10 images dropped):
    training refuses it naming the folder, and inspect warns that its images get no rows."""
    from PIL import Image

    from defectscope.data.sources import folder_source
    from defectscope.runtime.inputs import expand_inputs

    for cls in ("good", "scratch"):
        (tmp_path / cls).mkdir()
        Image.new("L", (32, 32)).save(tmp_path / cls / "a.png")
    _unlistable(tmp_path / "good")
    with pytest.raises(
        SourceError, match=r"good/(locked|d{200}/.*): cannot be read \(.*\); its images would be left"
    ):
        folder_source(tmp_path)
    said: list[str] = []
    found = list(expand_inputs([str(tmp_path)], recursive=True, warn=said.append))
    assert len(found) == 2 and len(said) == 1 and said[0].startswith(f"folder '{tmp_path / 'good'}")
    assert said[0].endswith("; its images are not inspected")


def test_files_beside_the_class_folders_are_reported_as_ignored(tmp_path: Path) -> None:
    """Images put in the root, next to the class folders, were dropped without being counted (attack)."""
    from PIL import Image

    from defectscope.data.sources import folder_source

    for cls in ("good", "scratch"):
        (tmp_path / cls).mkdir()
        Image.new("L", (32, 32)).save(tmp_path / cls / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "stray.png")
    (tmp_path / ".hidden").write_text("tool cache")
    data = folder_source(tmp_path)
    assert len(data.samples) == 2 and data.ignored == [str(tmp_path / "stray.png")]


def test_labels_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """CSV labels ``Good`` and ``good`` trained as two classes without a word (attack)."""
    from PIL import Image

    rows = ["path,label"]
    for i, label in enumerate(("good", "Good", "scratch")):
        Image.new("L", (32, 32)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SourceError, match=r"classes 'Good' and 'good' differ only in case"):
        build_source({"kind": "csv", "path": str(tmp_path / "m.csv")})


def test_control_characters_in_an_error_line_are_shown_as_codes() -> None:
    """A file name holding an escape sequence reached the terminal raw (attack)."""
    from defectscope.runtime.files import error_line

    line = error_line("defectscope train", "a\x1b[31mred.png\nx\x07")
    assert line == "defectscope train: error: a\\x1b[31mred.png\\nx\\x07"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"kind": "csv", "path": 5},
            "data.source.path must be the CSV manifest's path (columns path,label[,split]), got 5",
        ),
        (
            {"kind": "csv", "path": None},
            "data.source.path must be the CSV manifest's path (columns path,label[,split]), got None",
        ),
        (
            {"kind": "folder", "root": ["a", "b"]},
            "data.source.root must be the image folder's path (one folder per class), got ['a', 'b']",
        ),
    ],
)
def test_a_path_setting_that_is_not_a_path_names_its_key(spec: dict[str, object], expected: str) -> None:
    """``data.source.path=5`` said "expected str, bytes or os.PathLike object, not int" (attack)."""
    with pytest.raises(SourceError) as caught:
        build_source(spec)
    assert str(caught.value) == expected
