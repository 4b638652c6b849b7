"""The pre-training scan and `defectscope scan`: all bad files listed at once, rejects CSV, stats."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defectscope.data.scan import (
    SHOWN_BAD_FILES,
    BadFile,
    BadFilesError,
    main,
    mean_std,
    scan_files,
    write_rejects,
)
from defectscope.runtime.image import LoaderConfig, load_image

CFG = LoaderConfig(channels=1, min_size=32, size_multiple=16)


def _good(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def make_bad_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """A CSV dataset with 4 good images and one bad file of every kind the scan can meet here."""
    for i, size in enumerate([(64, 48), (64, 48), (80, 64), (100, 100)]):
        _good(root / "good" / f"g{i}.png", size, i)
    bad: dict[str, str] = {}
    (root / "scratch").mkdir()
    (root / "scratch" / "empty.png").write_bytes(b"")
    bad["scratch/empty.png"] = "zero_bytes"
    full = _good(root / "tmp.png", (200, 200), 9).read_bytes()
    (root / "scratch" / "cut.png").write_bytes(full[: len(full) // 2])
    (root / "tmp.png").unlink()
    bad["scratch/cut.png"] = "truncated"
    (root / "scratch" / "text.png").write_text("hello")
    bad["scratch/text.png"] = "not_an_image"
    Image.new("LAB", (64, 64)).save(root / "scratch" / "lab.tif")
    bad["scratch/lab.tif"] = "unsupported_mode"
    _good(root / "scratch" / "tiny.png", (20, 64))
    bad["scratch/tiny.png"] = "too_small"
    (root / "scratch" / "dir.png").mkdir()
    bad["scratch/dir.png"] = "is_directory"
    bad["scratch/missing.png"] = "vanished"
    _good(root / "scratch" / "ok.png", (64, 48), 5)
    lines = ["path,label"] + [f"good/g{i}.png,good" for i in range(4)] + ["scratch/ok.png,scratch"]
    lines += [f"{p},scratch" for p in bad]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, bad


def test_scan_lists_every_bad_file_with_kind_and_reason(tmp_path: Path) -> None:
    _, bad = make_bad_dataset(tmp_path)
    paths = [str(tmp_path / "good" / f"g{i}.png") for i in range(4)] + [str(tmp_path / p) for p in bad]
    result = scan_files(paths, CFG, workers=2)
    assert {Path(b.path).relative_to(tmp_path).as_posix(): b.kind for b in result.bad} == bad
    assert [r is None for r in result.records] == [False] * 4 + [True] * len(bad)
    assert [r.size for r in result.records[:4] if r] == [(48, 64), (48, 64), (64, 80), (96, 96)]
    err = BadFilesError(result.bad, len(paths), "hint here")
    text = str(err)
    assert f"{len(bad)} of {len(paths)} image files cannot be used (" in text and text.endswith("hint here")
    assert (
        len(bad) > SHOWN_BAD_FILES and err.bad == result.bad
    )  # all kept; a few named (one 7,310-char line was)
    for i, b in enumerate(result.bad):
        assert (f"{b.path}: [{b.kind}] {b.reason}" in text) is (i < SHOWN_BAD_FILES)
    assert f"... and {len(bad) - SHOWN_BAD_FILES} more (defectscope scan" in text
    assert "backslashes" not in text
    windows = BadFilesError(
        [BadFile("parts\\good\\a.png", "vanished", "file does not exist")], 1, "none can be used"
    )
    assert "backslashes name no folder here" in str(windows)


def test_rejects_csv_roundtrip(tmp_path: Path) -> None:
    _, bad = make_bad_dataset(tmp_path)
    result = scan_files([str(tmp_path / p) for p in bad], CFG)
    out = write_rejects(tmp_path / "out" / "rejects.csv", result.bad)
    rows = list(csv.DictReader(io.StringIO(Path(out).read_text(encoding="utf-8"))))
    assert [r["kind"] for r in rows] == list(bad.values())
    assert all(r["path"] and r["reason"] for r in rows)


def test_mean_std_are_exact(tmp_path: Path) -> None:
    paths = [str(_good(tmp_path / f"{i}.png", (40 + 8 * i, 48), i)) for i in range(3)]
    cfg = LoaderConfig(channels=3, min_size=16)
    result = scan_files(paths, cfg)
    mean, std = mean_std(result.records, 3)
    pixels = np.concatenate([load_image(p, cfg).reshape(-1, 3) for p in paths]).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)


def test_cli_reports_bad_files_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, bad = make_bad_dataset(tmp_path)
    rejects = tmp_path / "rej.csv"
    rc = main(
        [
            "data=csv",
            f"data.source.path={manifest}",
            "data.loader.size_multiple=16",
            "--rejects",
            str(rejects),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert f"scanned {5 + len(bad)} files" in out and f"5 ok, {len(bad)} bad" in out
    for rel, kind in bad.items():
        assert f"{tmp_path / rel}: [{kind}]" in out
    assert "good" in out and "scratch" in out  # per-class table
    assert len(list(csv.DictReader(io.StringIO(Path(rejects).read_text(encoding="utf-8"))))) == len(bad)


def test_cli_rejects_to_standard_output_as_training_allows(tmp_path: Path) -> None:
    """`scan --rejects /dev/stdout` is held to the rule of data.rejects_path (a device is fine: nothing resumes
    from it); it was refused with a message about --resume, which scan does not have."""
    manifest, bad = make_bad_dataset(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "scan", "data=csv", f"data.source.path={manifest}",
         "data.loader.size_multiple=16", "--rejects", "/dev/stdout"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("path,kind,reason") :].splitlines()
    rows = list(csv.DictReader(io.StringIO("\n".join(table[: len(bad) + 1]))))
    assert sorted(r["kind"] for r in rows) == sorted(bad.values())


def test_cli_folder_short_form_uses_the_training_loader(tmp_path: Path, compose_train: Any) -> None:
    """`scan FOLDER` is `data=folder data.source.root=FOLDER` of the training config: same loader
    (size_multiple 32, not a scan-only default), so the same size buckets as training."""
    for i in range(3):
        _good(tmp_path / "d" / "good" / f"{i}.png", (64, 40 + 16 * i), i)
        _good(tmp_path / "d" / "crack" / f"{i}.png", (64, 64), i)
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "scan", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 ok, 0 bad" in proc.stdout
    trained = compose_train(["data=folder", "paths.launch_dir=."]).data.loader
    assert f"loader: {LoaderConfig(**trained).to_dict()}" in proc.stdout
    assert trained.size_multiple == 32
    sizes = {(64, 64), (64, 32)}  # heights 40, 56, 64 round to multiples of 32 as training does
    assert f"{len(sizes)} distinct preprocessed sizes" in proc.stdout


def test_cli_overrides_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _good(tmp_path / "d" / "good" / "0.png", (64, 40), 0)
    _good(tmp_path / "d" / "crack" / "0.png", (64, 64), 1)
    assert main([str(tmp_path / "d"), "data.loader.size_multiple=1"]) == 0
    assert "2 distinct preprocessed sizes" in capsys.readouterr().out
    (tmp_path / "e" / "good").mkdir(parents=True)  # every file bad: no size line with nothing after it
    (tmp_path / "e" / "good" / "0.png").write_text("not an image")
    assert main([str(tmp_path / "e")]) == 1
    out = capsys.readouterr().out
    assert "0 ok, 1 bad" in out and "preprocessed sizes" not in out and "0.png: [not_an_image]" in out
    assert main([str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path / "d"), "data.loader.min_size=64", "data.loader.max_side=32"]) == 2
    assert "min_size" in capsys.readouterr().err
    assert main(["data=nope"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "data=nope: no such option in config group 'data'; valid: csv, elpv, folder" in err
    )
    # the data settings train refuses are refused here too, not scanned with (attack: exit 0)
    assert main([str(tmp_path / "d"), "data.batch_size=abc"]) == 2
    assert "data.batch_size must be a whole number" in capsys.readouterr().err
    assert main([str(tmp_path / "d"), "data.train_transform.transforms.0._target_=os.system"]) == 2
    assert "_target_ is 'os.system'; a data config is built only from" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_elpv_full_scan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data=elpv", "data.source.task=4class"]) == 0
    out = capsys.readouterr().out
    assert "2624 ok, 0 bad" in out and "300x300: 2624" in out and "p100" in out


def test_no_output_is_written_over_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rejects list named like the manifest replaced it, one inside the image folder landed among the images,
    and evaluate's metrics file named like the checkpoint replaced it (attack): refused before any work."""
    from omegaconf import OmegaConf

    from defectscope.data.settings import DataConfigError, config_data_settings
    from defectscope.training.config import TrainingConfigError
    from defectscope.training.preflight import check_evaluate_config

    manifest, _ = make_bad_dataset(tmp_path)
    kept = manifest.read_bytes()
    rc = main(["data=csv", f"data.source.path={manifest}", "--rejects", str(manifest)])
    assert (
        rc == 2
        and f"--rejects {manifest}: is data.source.path, which this run reads" in capsys.readouterr().err
    )
    base = {"source": {"kind": "folder", "root": str(tmp_path)}, "on_bad_file": "skip"}
    with pytest.raises(DataConfigError, match=r"data\.rejects_path .*: lies inside data\.source\.root"):
        config_data_settings({**base, "rejects_path": str(tmp_path / "good" / "rejects.csv")})
    ckpt = tmp_path / "best.ckpt"
    import zipfile

    with zipfile.ZipFile(ckpt, "w") as zf:  # a whole zip archive: what the checkpoint check reads
        zf.writestr("archive/data.pkl", b"weights")
    kept_ckpt = ckpt.read_bytes()
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "metrics_file": str(ckpt), "evaluate_on": "test"})
    with pytest.raises(
        TrainingConfigError, match=r"metrics_file .*best\.ckpt: is ckpt_path, which this run reads"
    ):
        check_evaluate_config(cfg)
    assert manifest.read_bytes() == kept and ckpt.read_bytes() == kept_ckpt
    listed = next(
        p for p in tmp_path.rglob("*.png")
    )  # a CSV's images lie anywhere: the listed ones are inputs too
    image = listed.read_bytes()
    assert main(["data=csv", f"data.source.path={manifest}", "--rejects", str(listed)]) == 2
    assert f"--rejects {listed}: is one of the images this run reads" in capsys.readouterr().err
    assert listed.read_bytes() == image
