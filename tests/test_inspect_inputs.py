"""`defectscope inspect` inputs: folders, globs, @list files (one rule with `export --images`), links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inspect_runs import rows_of, run
from onnx_models import build_model, make_image


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


def test_input_expansion_folders_globs_lists_duplicates(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/deeper/d.bmp"):
        p = root / name
        make_image(p, 64, 64, bright=False)
    (root / "notes.txt").write_text("ignored in folders")
    out = tmp_path / "r.jsonl"
    run(model, root, "-o", out)
    assert sorted(Path(r["path"]).name for r in rows_of(out)) == ["a.png", "b.jpg"]
    run(model, root, "--recursive", "-o", out)
    assert sorted(Path(r["path"]).name for r in rows_of(out)) == ["a.png", "b.jpg", "c.png", "d.bmp"]
    run(model, str(root / "*.png"), str(root / "sub" / "*"), "-o", out)  # matched folder expands
    assert sorted(Path(r["path"]).name for r in rows_of(out)) == ["a.png", "c.png", "d.bmp"]
    listing = tmp_path / "l.txt"
    listing.write_text(f"{root / 'a.png'}\n{root / 'a.png'}\n{root / 'b.jpg'}\n{root / 'a.png'}\n")
    assert run(model, f"@{listing}", "-o", out) == 0
    assert [Path(r["path"]).name for r in rows_of(out)].count("a.png") == 3


def test_list_file_lines_are_relative_to_the_list_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inspect @list` and `export --images` read lists with one rule (runtime.files.read_path_list):
    relative lines start at the list's folder, wherever the command runs; a BOM and comments are fine."""
    from defectscope.export.parity import list_images

    make_image(tmp_path / "cells" / "a.png", 64, 64, bright=False)
    make_image(tmp_path / "cells" / "b.png", 64, 64, bright=True)
    listing = tmp_path / "lists" / "todo.txt"
    listing.parent.mkdir()
    listing.write_text("\ufeff# two cells\n../cells/a.png\n\n" + str(tmp_path / "cells" / "b.png") + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "r.jsonl"
    assert run(model, f"@{listing}", "-o", out) == 0
    paths = [r["path"] for r in rows_of(out)]
    assert [os.path.realpath(p) for p in paths] == [str(tmp_path / "cells" / n) for n in ("a.png", "b.png")]
    assert list_images(listing) == paths


def test_list_line_naming_an_existing_file_verbatim_is_that_file(model: Path, tmp_path: Path) -> None:
    """A `find`-made list of files whose names start with `#` or a space loses none of them; a comment
    line (no such file) is still skipped and a padded name of a file that exists only unpadded is stripped."""
    from defectscope.export.parity import list_images

    names = ["#1.png", " lead.png", "plain.png"]
    for i, name in enumerate(names):
        make_image(tmp_path / name, 64, 64, bright=bool(i % 2))
    listing = tmp_path / "found.txt"
    listing.write_text("# not a file\n#1.png\n lead.png\n plain.png \n")
    out = tmp_path / "r.jsonl"
    assert run(model, f"@{listing}", "-o", out) == 0
    got = sorted(os.path.basename(r["path"]) for r in rows_of(out))
    assert got == sorted(names)
    assert [r["status"] for r in rows_of(out)] == ["ok"] * 3
    assert sorted(os.path.basename(p) for p in list_images(listing)) == sorted(names)


def test_recursive_pattern_does_not_follow_linked_folders(model: Path, tmp_path: Path) -> None:
    """``**`` followed symlinked folders: a link up the tree gave 367 rows for 3 images. A pattern now
    gives what the folder itself gives (links to folders are not followed)."""
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png", "sub/c.png"):
        make_image(t / rel, 64, 64, bright=False, seed=len(rel))
    (t / "loop").symlink_to(t)
    (t / "sub" / "up").symlink_to(t / "sub")
    by_folder, by_pattern = tmp_path / "f.jsonl", tmp_path / "p.jsonl"
    assert run(model, t, "-o", by_folder, "--recursive") == 0
    assert run(model, f"{t}/**/*.png", "-o", by_pattern, "--recursive") == 0
    expected = sorted(str(t / rel) for rel in ("a.png", "sub/b.png", "sub/c.png"))
    assert sorted(r["path"] for r in rows_of(by_folder)) == expected
    assert sorted(r["path"] for r in rows_of(by_pattern)) == expected
