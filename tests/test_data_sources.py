"""Sources (folder, csv, elpv, synthetic) and the deterministic stratified split, on real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from defectscope.data.sources import SourceError, build_source, ensure_synthetic
from defectscope.data.splits import apportion, assign_splits, stratified_pick
from defectscope.synth_output import SYNTH_MARKER
from signal_runs import partial_holds, signal_when


def _img(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 100).save(path)
    return path


def _tree(root: Path, layout: dict[str, int], prefix: str = "") -> None:
    for cls, n in layout.items():
        for i in range(n):
            _img(root / prefix / cls / f"{cls}_{i}.png")


# --------------------------------------------------------------------------- folder


def test_folder_without_split_folders(tmp_path: Path) -> None:
    _tree(tmp_path, {"good": 3, "scratch": 2, "dent": 1})
    _img(tmp_path / "scratch" / "day2" / "nested.PNG")  # nested folders and upper-case extensions count
    (tmp_path / "good" / "notes.txt").write_text("x")
    (tmp_path / "good" / ".hidden.png").write_bytes(b"")  # not part of the folder, as for inspect
    data = build_source({"kind": "folder", "root": str(tmp_path)})
    assert data.class_names == ["dent", "good", "scratch"] and data.good_class == "good"
    counts = Counter(data.class_names[s.label] for s in data.samples)
    assert counts == {"good": 3, "scratch": 3, "dent": 1}
    assert all(s.split is None for s in data.samples)
    assert sorted(Path(p).name for p in data.ignored) == ["notes.txt"]


def test_folder_class_order_and_good_class_checked(tmp_path: Path) -> None:
    _tree(tmp_path, {"ok": 2, "bad": 2})
    data = build_source(
        {"kind": "folder", "root": str(tmp_path), "classes": ["ok", "bad"], "good_class": "ok"}
    )
    assert data.class_names == ["ok", "bad"] and {s.label for s in data.samples} == {0, 1}
    with pytest.raises(SourceError, match="good_class 'good' is not one of the classes"):
        build_source({"kind": "folder", "root": str(tmp_path)})
    with pytest.raises(SourceError, match=r"class folders \['bad'\] are not in data.source.classes"):
        build_source({"kind": "folder", "root": str(tmp_path), "classes": ["ok"], "good_class": "ok"})
    with pytest.raises(SourceError, match="does not exist"):
        build_source({"kind": "folder", "root": str(tmp_path / "nope")})
    with pytest.raises(SourceError, match="unknown key"):
        build_source({"kind": "folder", "root": str(tmp_path), "colour": "red"})
    with pytest.raises(SourceError, match="kind must be one of folder, csv, elpv, synthetic"):
        build_source({"kind": "s3"})


def test_folder_with_split_folders(tmp_path: Path) -> None:
    _tree(tmp_path, {"good": 4, "crack": 3}, "train")
    _tree(tmp_path, {"good": 1, "crack": 1}, "val")
    _tree(tmp_path, {"good": 2, "crack": 1}, "test")
    data = build_source({"kind": "folder", "root": str(tmp_path)})
    assert data.class_names == ["crack", "good"]
    assert Counter(s.split for s in data.samples) == {"train": 7, "val": 2, "test": 3}
    for s in data.samples:
        assert f"/{s.split}/{data.class_names[s.label]}/" in s.path
    splits = assign_splits([s.split for s in data.samples], ["x"] * 12, [s.path for s in data.samples],
                           val_fraction=0.5, test_fraction=0.5, seed=0)  # fmt: skip
    assert splits == [s.split for s in data.samples]  # given splits are kept


def test_folder_split_without_val_gets_val_from_train(tmp_path: Path) -> None:
    _tree(tmp_path, {"good": 10, "crack": 10}, "train")
    _tree(tmp_path, {"good": 2, "crack": 2}, "test")
    data = build_source({"kind": "folder", "root": str(tmp_path)})
    splits = assign_splits([s.split for s in data.samples], [str(s.label) for s in data.samples],
                           [s.path for s in data.samples], val_fraction=0.2, test_fraction=0.5, seed=1)  # fmt: skip
    assert Counter(splits) == {"train": 16, "val": 4, "test": 4}
    assert all(sp == "test" for s, sp in zip(data.samples, splits) if s.split == "test")


def test_folder_mixing_split_and_class_folders_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path, {"good": 1}, "train")
    _tree(tmp_path, {"good": 1})
    with pytest.raises(SourceError, match="mixes split folders"):
        build_source({"kind": "folder", "root": str(tmp_path)})


# --------------------------------------------------------------------------- csv


def test_csv_relative_absolute_and_split(tmp_path: Path) -> None:
    a = _img(tmp_path / "data" / "imgs" / "a.png")
    _img(tmp_path / "data" / "imgs" / "b.png")
    c = _img(tmp_path / "elsewhere" / "c.png")
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text(f"path,label,split\nimgs/a.png,good,train\nimgs/b.png,scratch,\n{c},scratch,test\n\n")
    data = build_source({"kind": "csv", "path": str(manifest)})
    assert data.class_names == ["good", "scratch"]
    assert [s.path for s in data.samples] == [str(a), str(tmp_path / "data" / "imgs" / "b.png"), str(c)]
    assert [s.split for s in data.samples] == ["train", None, "test"]
    assert [s.label for s in data.samples] == [0, 1, 1]


def test_csv_missing_rows_reported_together(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    _img(tmp_path / "b.png")
    long_name = "l" * 300 + ".png"  # too long for the file system to look up: an OSError traceback before
    manifest.write_text(
        f"path,label\na.png,good\nlost1.png,good\nb.png,crack\nsub/lost2.png,crack\n{long_name},good\n"
    )
    with pytest.raises(SourceError) as info:
        build_source({"kind": "csv", "path": str(manifest)})
    msg = str(info.value)
    assert str(manifest) in msg and "3 of 5 rows name files that do not exist" in msg
    assert "row 3: lost1.png" in msg and "row 5: sub/lost2.png" in msg and "row 2" not in msg
    assert f"row 6: {long_name} (File name too long: at most 255 bytes" in msg
    kept = build_source({"kind": "csv", "path": str(manifest)}, missing="keep")  # scan reports them later
    assert len(kept.samples) == 5


def test_csv_invalid_rows_listed(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\na.png,good,training\na.png,dent,\n,good,\n")
    with pytest.raises(SourceError) as info:
        build_source({"kind": "csv", "path": str(manifest), "classes": ["good", "crack"]})
    msg = str(info.value)
    assert "row 2: split 'training'" in msg and "row 3: label 'dent'" in msg and "row 4: empty path" in msg
    (tmp_path / "nohdr.csv").write_text("a.png,good\n")
    with pytest.raises(SourceError, match="header with columns path,label"):
        build_source({"kind": "csv", "path": str(tmp_path / "nohdr.csv")})
    with pytest.raises(SourceError, match="cannot open CSV"):
        build_source({"kind": "csv", "path": str(tmp_path / "none.csv")})
    (tmp_path / "u16.csv").write_text("path,label\na.png,good\n", encoding="utf-16")
    with pytest.raises(
        SourceError, match=r"^data\.source\.path: CSV .*u16\.csv is UTF-16 text; save it as UTF-8$"
    ):
        build_source({"kind": "csv", "path": str(tmp_path / "u16.csv")})


def test_csv_names_that_are_not_utf8_are_kept(tmp_path: Path) -> None:
    """A manifest written on a Latin-1 system names its files as the OS does (a traceback before)."""
    name = os.fsdecode(b"caf\xe9.png")
    _img(tmp_path / name)
    _img(tmp_path / "b.png")
    (tmp_path / "m.csv").write_bytes(b"path,label\ncaf\xe9.png,good\nb.png,crack\n")
    data = build_source({"kind": "csv", "path": str(tmp_path / "m.csv")})
    assert sorted(s.path for s in data.samples) == sorted([str(tmp_path / name), str(tmp_path / "b.png")])
    (tmp_path / "l.csv").write_bytes(b"path,label\nb.png,d\xe9faut\n")  # a class name must be text
    with pytest.raises(SourceError, match=r"row 2: label or split is not UTF-8 text; save the CSV as UTF-8"):
        build_source({"kind": "csv", "path": str(tmp_path / "l.csv")})


# --------------------------------------------------------------------------- elpv


@pytest.mark.parametrize("task", ["binary", "4class"])
def test_elpv_real_package(task: str) -> None:
    data = build_source({"kind": "elpv", "task": task})
    assert len(data.samples) == 2624
    assert all(Path(s.path).is_file() for s in data.samples[:50] + data.samples[-50:])
    assert Counter(s.meta["module_type"] for s in data.samples) == {"mono": 1074, "poly": 1550}
    grades = Counter(s.stratum for s in data.samples)
    assert grades == {"p0": 1508, "p33": 295, "p67": 106, "p100": 715}
    if task == "binary":
        assert data.class_names == ["functional", "defective"] and data.good_class == "functional"
        assert Counter(s.label for s in data.samples) == {0: 1508 + 295, 1: 106 + 715}
    else:
        assert data.class_names == ["p0", "p33", "p67", "p100"] and data.good_class == "p0"
        assert all(data.class_names[s.label] == s.stratum for s in data.samples)
    d = data.split_defaults
    splits = assign_splits([None] * 2624, [s.stratum or "" for s in data.samples], [s.path for s in data.samples],
                           val_fraction=0.15, test_fraction=float(d["test_fraction"]), seed=int(d["seed"]))  # fmt: skip
    counts = Counter(splits)
    assert counts["test"] == 656 and counts["train"] + counts["val"] == 1968
    assert counts["val"] == round(1968 * 0.15)
    test_grades = Counter(s.stratum for s, sp in zip(data.samples, splits) if sp == "test")
    assert test_grades == {"p0": 377, "p33": 74, "p67": 26, "p100": 179}  # stratified, largest remainder


def test_elpv_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # what an environment without it raises
    with pytest.raises(SourceError, match=r"pip install elpv-dataset \(the .elpv. extra\)"):
        build_source({"kind": "elpv"})


# --------------------------------------------------------------------------- synthetic


SYN = {
    "n": 12,
    "seed": 1,
    "channels": 1,
    "min_size": 40,
    "max_size": 64,
    "classes": ["good", "spot", "crack"],
}


def test_synthetic_generates_once_then_reuses(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    data = build_source({"kind": "synthetic", "root": str(root), **SYN})
    assert data.class_names == ["good", "spot", "crack"] and len(data.samples) == 12
    marker = json.loads((root / SYNTH_MARKER).read_text())
    assert marker["n"] == 12 and marker["classes"] == ["good", "spot", "crack"]
    stamp = (root / SYNTH_MARKER).stat().st_mtime_ns
    again = build_source({"kind": "synthetic", "root": str(root), **SYN})
    assert (root / SYNTH_MARKER).stat().st_mtime_ns == stamp
    assert [s.path for s in again.samples] == [s.path for s in data.samples]
    assert not data.ignored  # manifest.csv sits at the root, the marker is ours
    bigger = build_source({"kind": "synthetic", "root": str(root), **{**SYN, "n": 16}})
    assert len(bigger.samples) == 16  # other parameters -> regenerated
    # a user's image put into the generated set is neither deleted nor trained on: refused, named
    mine = _img(root / "good" / "mine.png")
    with pytest.raises(SourceError, match=r"^data\.source\.root: .* holds .*mine\.png, which the synthetic"):
        build_source({"kind": "synthetic", "root": str(root), **SYN})
    assert mine.is_file() and len(list(root.rglob("*.png"))) == 17


def test_a_folder_of_pngs_without_the_marker_is_never_replaced(tmp_path: Path) -> None:
    """A user's own class folders of PNGs named as a synthetic root (data=synthetic is the default,
    so forgetting data=folder is enough) were taken for a generated set and deleted."""
    root = tmp_path / "parts"
    mine = [_img(root / "good" / "good_00000.png"), _img(root / "dent" / "d1.png")]
    before = {p: p.read_bytes() for p in mine}
    with pytest.raises(
        SourceError,
        match=r"^data\.source\.root: .*parts is not empty and is not a finished synth output .*data=folder",
    ):
        build_source({"kind": "synthetic", "root": str(root), **SYN})
    assert {p: p.read_bytes() for p in mine} == before and sorted(os.listdir(root)) == ["dent", "good"]
    assert os.listdir(tmp_path) == ["parts"]  # no lock file left beside the user's folder either
    (root.parent / "empty").mkdir()  # an empty folder is generated into
    data = build_source({"kind": "synthetic", "root": str(root.parent / "empty"), **SYN})
    assert len(data.samples) == 12 and (root.parent / "empty" / SYNTH_MARKER).exists()


def test_synthetic_refuses_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    _img(root / "photos" / "holiday.jpg")
    with pytest.raises(SourceError, match="is not empty and is not a finished synth output"):
        build_source({"kind": "synthetic", "root": str(root), **SYN})
    assert (root / "photos" / "holiday.jpg").exists()


@pytest.mark.slow
def test_synthetic_killed_generation_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    params = {**SYN, "n": 1500, "min_size": 32, "max_size": 40}
    code = (
        "import sys, json; from defectscope.data.sources import ensure_synthetic; "
        "ensure_synthetic(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), json.dumps(params)], text=True)
    signal_when(
        proc, partial_holds(root, ".defectscope-partial-*", 50), "half-written set", 60, signal.SIGKILL
    )
    assert not (root / SYNTH_MARKER).exists(), "generation finished before it could be killed"
    ensure_synthetic(root, **params)  # type: ignore[arg-type]
    assert (root / SYNTH_MARKER).exists()
    assert sum(1 for _ in root.rglob("*.png")) == 1500
    assert not list(root.glob(".defectscope-partial-*"))  # the dead run's leftovers are cleaned up


@pytest.mark.slow
def test_synthetic_concurrent_processes_generate_once(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    params = {**SYN, "n": 300, "min_size": 32, "max_size": 48}
    code = (
        "import sys, json, logging; logging.basicConfig(level=logging.INFO);"
        "from defectscope.data.sources import ensure_synthetic; from defectscope.synth_output import SYNTH_MARKER;"
        "root = ensure_synthetic(sys.argv[1], **json.loads(sys.argv[2]));"
        "print((root / SYNTH_MARKER).stat().st_mtime_ns)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root), json.dumps(params)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    stamps = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(stamps) == 1  # one generation, reused by the others (never replaced under them)
    assert sum(1 for _ in root.rglob("*.png")) == 300
    assert not list(root.glob(".defectscope-partial-*"))


# --------------------------------------------------------------------------- splits


def test_apportion_is_exact() -> None:
    assert apportion([1508, 295, 106, 715], 656) == [377, 74, 26, 179]
    assert sum(apportion([3, 3, 3], 4)) == 4
    with pytest.raises(ValueError):
        apportion([1, 2], 4)


def test_split_is_stratified_deterministic_and_order_independent() -> None:
    keys = [f"img{i:03d}" for i in range(100)]
    strata = ["a" if i % 4 else "b" for i in range(100)]
    one = stratified_pick(strata, keys, 0.2, seed=5)
    assert len(one) == 20 and sum(strata[i] == "b" for i in one) == 5
    rev = stratified_pick(strata[::-1], keys[::-1], 0.2, seed=5)
    assert {keys[i] for i in one} == {keys[::-1][i] for i in rev}
    assert stratified_pick(strata, keys, 0.2, seed=6) != one
    splits = assign_splits([None] * 100, strata, keys, val_fraction=0.25, test_fraction=0.2, seed=5)
    assert Counter(splits) == {"train": 60, "val": 20, "test": 20}
    assert splits == assign_splits([None] * 100, strata, keys, val_fraction=0.25, test_fraction=0.2, seed=5)


def test_sources_and_scan_do_not_import_torch() -> None:
    code = "import sys, defectscope.data.scan, defectscope.data.sources; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
