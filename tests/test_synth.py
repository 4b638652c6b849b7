"""The synthetic generator: layout, determinism, variety, visible defects, CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope import synth
from defectscope.runtime.image import LoaderConfig, load_image


def _files(root: Path) -> dict[str, bytes]:
    """The files of ``root`` and their bytes, without the generator's transient ones (its runs' folders, the lock)."""
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
    transient = (".defectscope-partial-", ".defectscope-synth.lock")
    return {k: p.read_bytes() for k, p in files.items() if not k.startswith(transient)}


def test_layout_manifest_and_balanced_classes(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "s", n=22, seed=1, size_range=(64, 200))
    rows = list(csv.DictReader(io.StringIO(Path(root / "manifest.csv").read_text(encoding="utf-8"))))
    assert set(rows[0]) == {"path", "label"}
    assert len(rows) == 22
    counts = Counter(r["label"] for r in rows)
    assert (
        set(counts) == {"good", "scratch", "spot", "crack"}
        and max(counts.values()) - min(counts.values()) <= 1
    )
    for r in rows:
        p = root / r["path"]
        assert p.parent.name == r["label"] and p.suffix == ".png"
        with Image.open(p) as im:
            assert im.mode == "L" and 64 <= im.width <= 200 and 64 <= im.height <= 200
    assert sorted(_files(root)) == sorted([*(r["path"] for r in rows), "manifest.csv", synth.SYNTH_MARKER])
    marker = json.loads((root / synth.SYNTH_MARKER).read_text())
    assert (marker["n"], marker["seed"], marker["min_size"], marker["max_size"]) == (22, 1, 64, 200)


def test_sizes_vary_and_are_not_square(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "s", n=16, seed=2)
    sizes = [Image.open(p).size for p in root.rglob("*.png")]
    assert len(set(sizes)) >= 12
    assert sum(w != h for w, h in sizes) >= 12
    assert all(96 <= s <= 512 for wh in sizes for s in wh)


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = _files(synth.generate(tmp_path / "a", n=12, seed=7, size_range=(64, 128)))
    b = _files(synth.generate(tmp_path / "b", n=12, seed=7, size_range=(64, 128), workers=1))
    c = _files(synth.generate(tmp_path / "c", n=12, seed=8, size_range=(64, 128)))
    assert a == b  # also independent of the number of writer threads
    assert a != c
    shared = set(a) & set(c)
    assert all(a[k] != c[k] for k in shared if k != "manifest.csv")


def test_rerun_replaces_previous_output_and_refuses_foreign_folders(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "s", n=12, seed=0, size_range=(48, 64))
    # a file the generator did not write stops the replacement (training's synthetic cache says the same)
    (root / "good" / "mine.png").write_bytes(b"mine")
    with pytest.raises(
        ValueError, match=r"^synth: .*s holds .*good/mine\.png, which the synthetic generator did not"
    ):
        synth.generate(root, n=5, seed=0, size_range=(48, 64))
    assert len(list(root.rglob("*.png"))) == 13
    (root / "good" / "mine.png").unlink()
    said: list[str] = []
    synth.generate(root, n=5, seed=0, size_range=(48, 64), log=said.append)
    assert said == [f"synth: replaced the earlier synth output in {root} (12 images, its manifest.csv)"]
    assert len(list(root.rglob("*.png"))) == 5  # no stale images from the larger run
    assert _files(root) == _files(synth.generate(tmp_path / "fresh", 5, 0, 1, (48, 64)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is not empty and is not a finished synth output"):
        synth.generate(tmp_path / "other", n=2)
    # a user's own manifest.csv (where data=csv looks) is no synth output: its images were deleted
    mine = tmp_path / "mydata"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "x.png").write_bytes(
        (root / "good").joinpath(next(iter(sorted(os.listdir(root / "good"))))).read_bytes()
    )
    (mine / "manifest.csv").write_text("path,label\nimages/x.png,good\n")
    with pytest.raises(ValueError, match=r"mydata is not empty and is not a finished synth output"):
        synth.generate(mine, n=2)
    assert (mine / "images" / "x.png").is_file() and "images/x.png" in (mine / "manifest.csv").read_text()
    # options are checked before anything is replaced
    for bad in ({"seed": -1}, {"workers": -1}):
        with pytest.raises(ValueError, match=f"synth: {next(iter(bad))} must be >= "):
            synth.generate(root, n=2, **bad)  # type: ignore[arg-type]
    assert len(list(root.rglob("*.png"))) == 5


def test_rgb_output(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "s", n=4, seed=0, channels=3, size_range=(64, 96))
    for p in root.rglob("*.png"):
        arr = load_image(p, LoaderConfig(channels=3))
        assert arr.shape[2] == 3 and not np.array_equal(arr[:, :, 0], arr[:, :, 2])  # tinted, not grey


@pytest.mark.parametrize("label", ["scratch", "spot", "crack"])
def test_defects_are_visible_local_and_not_single_pixels(label: str) -> None:
    for index in range(6):
        good = synth.render(3, index, "good", 1, (128, 256)).astype(np.float32)
        bad = synth.render(3, index, label, 1, (128, 256)).astype(np.float32)
        assert good.shape == bad.shape  # same RNG stream up to the defect: the difference is the defect
        diff = np.abs(bad - good)
        changed = diff > 20
        area = changed.mean()
        assert changed.sum() >= 20, f"{label} #{index}: defect too faint/small ({changed.sum()} px)"
        assert area < 0.15, f"{label} #{index}: defect covers {area:.0%} of the image"
        ys, xs = np.nonzero(changed)
        assert ys.max() - ys.min() >= 3 and xs.max() - xs.min() >= 3  # at least a few pixels across


def test_defect_position_and_orientation_vary() -> None:
    centres = []
    for index in range(8):
        good = synth.render(5, index, "good", 1, (160, 160)).astype(np.float32)
        bad = synth.render(5, index, "scratch", 1, (160, 160)).astype(np.float32)
        ys, xs = np.nonzero(np.abs(bad - good) > 20)
        centres.append((round(xs.mean() / 16), round(ys.mean() / 16)))
    assert len(set(centres)) >= 6


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        synth.generate("/nonexistent/never", 4, classes=["good", "dent"])
    with pytest.raises(ValueError, match="min_size and max_size must satisfy 16 <= min_size <= max_size"):
        synth.generate("/nonexistent/never", 4, size_range=(200, 100))
    assert synth.main(["/nonexistent/never", "--n", "0"]) == 2


def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "synth", str(out), "--n", "6", "--seed", "3", "--classes",
         "good,crack", "--min-size", "64", "--max-size", "80", "--channels", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 images" in proc.stdout
    labels = {
        r["label"]
        for r in csv.DictReader(io.StringIO(Path(out / "manifest.csv").read_text(encoding="utf-8")))
    }
    assert labels == {"good", "crack"} and not (out / "spot").exists()
    assert _files(out) == _files(synth.generate(tmp_path / "api", 6, 3, 3, (64, 80), ["good", "crack"]))


@pytest.mark.parametrize("label", ["scratch", "spot", "crack"])
def test_region_keeps_every_defect_inside_its_third(label: str) -> None:
    """The same image with the defect drawn in each third: changed pixels only inside that third."""
    seen: dict[str, list[float]] = {r: [] for r in synth.REGIONS}
    for index in range(5):
        good = synth.render(4, index, "good", 1, (120, 300)).astype(np.float32)
        w = good.shape[1]
        for region in synth.REGIONS:
            bad = synth.render(4, index, label, 1, (120, 300), region).astype(np.float32)
            _, xs = np.nonzero(np.abs(bad - good) > 3)
            x0, x1 = synth.region_columns(region, w)
            assert xs.size >= 10, f"{label} #{index} in {region}: no visible defect"
            assert x0 <= xs.min() and xs.max() < x1, f"{label} #{index} in {region}: {xs.min()}..{xs.max()}"
            seen[region].append(xs.mean() / w)
    assert synth.region_columns("anywhere", 90) == (0, 90)
    assert [synth.region_columns(r, 90) for r in ("left", "centre", "right")] == [(0, 30), (30, 60), (60, 90)]
    assert max(seen["left"]) < 1 / 3 < min(seen["centre"]) <= max(seen["centre"]) < 2 / 3 < min(seen["right"])


def test_region_default_is_the_old_generator_and_bad_regions_exit_2(tmp_path: Path) -> None:
    base = synth.generate(tmp_path / "a", 8, seed=2, size_range=(64, 96))
    assert _files(base) == _files(
        synth.generate(tmp_path / "b", 8, seed=2, size_range=(64, 96), region="anywhere")
    )
    assert _files(base) != _files(
        synth.generate(tmp_path / "c", 8, seed=2, size_range=(64, 96), region="right")
    )
    with pytest.raises(ValueError, match="unknown region 'top'; valid: anywhere, left, centre, right"):
        synth.generate(tmp_path / "d", 4, region="top")
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "synth", str(tmp_path / "e"), "--n", "4", "--region", "middle"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "valid: anywhere, left, centre, right" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "e").exists()


def test_synthetic_source_regenerates_when_the_region_changes(tmp_path: Path) -> None:
    from defectscope.data.sources import SourceError, ensure_synthetic

    root = tmp_path / "src"
    ensure_synthetic(root, 8, seed=1, min_size=64, max_size=96, region="left")
    left = _files(root)
    ensure_synthetic(root, 8, seed=1, min_size=64, max_size=96, region="left")
    assert _files(root) == left  # same parameters: kept
    ensure_synthetic(root, 8, seed=1, min_size=64, max_size=96, region="centre")
    assert _files(root) != left
    with pytest.raises(
        SourceError,
        match=r"data\.source\.region: unknown region 'everywhere'; valid: anywhere, left, centre, right",
    ):
        ensure_synthetic(root, 8, region="everywhere")


@pytest.mark.slow
def test_a_killed_synth_leaves_its_folder_as_it_was(tmp_path: Path) -> None:
    """`defectscope synth` killed mid-way left class folders without the marker, and the next synth into the
    folder refused it as "not a finished synth output" (a newcomer had to delete it by hand)."""
    import signal

    from signal_runs import partial_holds, signal_when

    root = synth.generate(tmp_path / "s", n=6, seed=0, size_range=(48, 64))
    before = _files(root)
    args = [sys.executable, "-m", "defectscope", "synth", str(root), "--n", "1500", "--min-size", "32",
            "--max-size", "40", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL, text=True)
    signal_when(
        proc, partial_holds(root, ".defectscope-partial-*", 50), "half-written set", 60, signal.SIGKILL
    )
    visible = {k: v for k, v in _files(root).items() if not k.startswith(".defectscope-partial-")}
    assert visible == before  # the earlier output is untouched; the half set waits in its hidden folder
    again = synth.generate(root, n=8, seed=1, size_range=(48, 64), log=lambda _: None)
    assert len(list(again.rglob("*.png"))) == 8 and not list(
        root.glob(".defectscope-partial-*")
    )  # leftovers gone


def test_a_link_or_the_current_folder_is_generated_into_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generation's own folder lies inside the output folder: a link to a folder, ``.`` or a mount point
    keep their renames on one file system (a sibling folder broke all three, review)."""
    real = tmp_path / "real"
    synth.generate(real, n=4, seed=0, size_range=(16, 24))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    said: list[str] = []
    synth.generate(link, n=6, seed=1, size_range=(16, 24), log=said.append)
    assert link.is_symlink() and len(list(real.rglob("*.png"))) == 6 and said[0].startswith("synth: replaced")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    synth.generate(Path("."), n=5, seed=2, size_range=(16, 24))
    assert len(list(here.rglob("*.png"))) == 5 and sorted(
        p.name for p in here.iterdir() if p.name.startswith(".")
    )
    assert not list(here.glob(".defectscope-partial-*")) and not list(real.glob(".defectscope-partial-*"))
