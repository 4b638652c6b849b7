"""The int8 export's plumbing that needs no trained model: the CPU flag probe, the calibration/gate image
split, the images list file and class-spread picking, and the metadata's int8 fields."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from defectscope.data.records import Sample
from defectscope.data.splits import spread_samples
from defectscope.export.parity import list_images
from defectscope.export.quantize import Int8Config, QuantizationError, cpu_has_vnni, split_paths
from defectscope.runtime.metadata import MetadataError, ModelMetadata


def test_cpu_has_vnni_reads_the_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_has_vnni(str(info)) is False
    info.write_text("processor\t: 0\n")
    assert cpu_has_vnni(str(info)) is None
    assert cpu_has_vnni(str(tmp_path / "absent")) is None


def test_split_paths_is_disjoint_deterministic_and_sized(tmp_path: Path) -> None:
    paths = [f"/img/{i:03d}.png" for i in range(300)]
    cfg = Int8Config(calib_images=128, check_images=64)
    dupes = [p.replace("/img/", "/img/./") for p in paths[:10]]  # the same files, spelled differently
    calib, check = split_paths(paths + dupes, cfg)
    assert len(check) == 64 and len(calib) == 128 and not set(calib) & set(check)
    assert (calib, check) == split_paths(paths, cfg)
    assert check != paths[:64]  # shuffled: not a class-sorted prefix
    # enough for both: each gets what it asked for (not a third held back)
    calib, check = split_paths(paths[:200], Int8Config(calib_images=100, check_images=100))
    assert (len(calib), len(check)) == (100, 100)
    # fewer: a third (at least 10) gates, the rest calibrates
    calib, check = split_paths(paths[:60], cfg)
    assert (len(calib), len(check)) == (40, 20)
    calib, check = split_paths(paths[:12], cfg)
    assert (len(calib), len(check)) == (2, 10)
    with pytest.raises(QuantizationError, match="got 10"):
        split_paths(paths[:10], cfg)
    with pytest.raises(QuantizationError, match="choose one of minmax, percentile"):
        Int8Config(method="mean")


def test_images_list_file_and_class_spread_val_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text("\ufeff# calibration set\nrel/a.png\n\n/abs/b.png\n", encoding="utf-8")
    assert list_images(listing) == [str(tmp_path / "sub" / "rel" / "a.png"), "/abs/b.png"]
    with pytest.raises(FileNotFoundError, match="directory of images or a text file"):
        list_images(tmp_path / "missing")

    samples = [Sample(f"/c{label}/{i}.png", label) for label in (0, 1, 2) for i in range(10 if label else 50)]
    picked = [s.path for s in spread_samples(samples, 12)]
    assert len(picked) == len(set(picked)) == 12
    assert Counter(p.split("/")[1] for p in picked) == {"c0": 4, "c1": 4, "c2": 4}
    assert [s.path for s in spread_samples(samples, 12)] == picked and len(spread_samples(samples, 500)) == 70


def test_metadata_int8_fields_default_and_validate() -> None:
    base = {
        "class_names": ["good", "bad"], "good_class": "good", "threshold": 0.5, "channels": 1,
        "mean": [0.5], "std": [0.5], "max_side": None, "min_size": 32, "size_multiple": 1,
        "max_pixels": 10**8, "model_name": "tiny", "package_version": "0", "format": "defectscope.model",
        "format_version": 1,
    }  # fmt: skip
    old = ModelMetadata.from_json(json.dumps(base))  # written before int8 existed
    assert old.int8 is False and old.quantization == {}
    quant = {"format": "QDQ", "top1_agreement": 0.99, "check_images": 98}
    new = ModelMetadata.from_json(json.dumps({**base, "int8": True, "quantization": quant}))
    assert ModelMetadata.from_json(new.to_json()) == new
    assert new.int8 is True and new.quantization == quant
    with pytest.raises(MetadataError, match="fp16 and int8 exclude each other"):
        ModelMetadata.from_json(json.dumps({**base, "fp16": True, "int8": True}))


def test_a_list_file_and_a_csv_manifest_name_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rule (runtime.files.listed_path) for a plain list and a CSV's path column: ``~`` is the home
    folder and ``./`` goes in both (before, ``~/a.png`` in a .txt list was a folder named ``~`` beside it)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text("~/a.png\n./b.png\nsub/../c.png\n", encoding="utf-8")
    (lists / "l.csv").write_text(
        "path,label\n~/a.png,good\n./b.png,good\nsub/../c.png,bad\n", encoding="utf-8"
    )
    expected = [str(home / "a.png"), str(lists / "b.png"), str(lists / "sub" / ".." / "c.png")]
    assert list_images(lists / "l.txt") == expected
    assert list_images(lists / "l.csv") == expected
