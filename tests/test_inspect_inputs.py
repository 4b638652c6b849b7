"""`defectscope inspect` inputs: folders, globs, @list files (one rule with `export --images`), links."""

from __future__ import annotations

import json
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


def test_resume_matches_rows_however_the_list_is_given(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed part-way and resumed from another folder, with the list spelt another way, finishes
    with one row per listed image: list lines are absolute and rows match inputs by their absolute path.
    A resume given relative folders from another folder, or the folder through a link, cannot match: it is
    refused before any image is inspected (it gave every image a second row, with a warning after)."""
    imgs = tmp_path / "imgs"
    names = [f"c{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        make_image(imgs / name, 64, 64, bright=i % 2 == 0, seed=i)
    (imgs / "todo.txt").write_text("".join(f"{n}\n" for n in names))
    out = tmp_path / "r.jsonl"
    monkeypatch.chdir(imgs)
    assert run(model, "@todo.txt", "-o", out) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))  # killed after 4 rows
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run(model, "@./imgs/todo.txt", "-o", out, "--resume") == 0
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(imgs / n) for n in names)

    by_folder = tmp_path / "f.jsonl"
    assert run(model, "imgs", "-o", by_folder) == 0
    assert run(model, "./imgs/", "-o", by_folder, "--resume") == 0  # another spelling, same folder
    assert len(rows_of(by_folder)) == len(names)
    assert "match no input" not in capsys.readouterr().err
    before = by_folder.read_bytes()
    (tmp_path / "alias").symlink_to(imgs)
    assert run(model, "alias", "-o", by_folder, "--resume") == 2  # the same files through a link
    assert f"has a row for this image under another name (row {imgs}/c" in capsys.readouterr().err
    monkeypatch.chdir(imgs)
    assert run(model, ".", "-o", by_folder, "--resume") == 2  # the first run's folder names, from inside it
    err = capsys.readouterr().err
    assert "every image would get a second row; resume from the folder" in err and len(err.splitlines()) == 1
    assert by_folder.read_bytes() == before
    assert run(model, ".", "-o", tmp_path / "new.jsonl", "--resume") == 0  # no rows yet: nothing to refuse


def test_resume_of_relative_rows_written_by_the_previous_version(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The previous version wrote list rows relative (list folder + line): resumed from the folder it ran
    in, such a file finishes without a second row for any image."""
    imgs = tmp_path / "imgs"
    for i in range(4):
        make_image(imgs / f"c{i}.png", 64, 64, bright=i % 2 == 0, seed=i)
    (imgs / "todo.txt").write_text("".join(f"c{i}.png\n" for i in range(4)))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    assert run(model, "@imgs/todo.txt", "-o", out) == 0
    old = []
    for row in rows_of(out)[:2]:
        row["path"] = os.path.relpath(row["path"])  # imgs/c0.png, as 0.x wrote it
        old.append(json.dumps(row) + "\n")
    out.write_text("".join(old))
    capsys.readouterr()
    assert run(model, "@imgs/todo.txt", "-o", out, "--resume") == 0
    assert sorted(os.path.abspath(r["path"]) for r in rows_of(out)) == [
        str(imgs / f"c{i}.png") for i in range(4)
    ]
    assert "match no input" not in capsys.readouterr().err


def test_lists_through_linked_folders_keep_dot_dot_as_the_os_reads_it(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`link/..` is the parent of the link's target: the list read through it finds its images, and the
    row of a file reached that way is not taken for another file of the same text after tidying."""
    real = tmp_path / "real"
    make_image(real / "lists2" / "x.png", 64, 64, bright=True)
    (real / "lists").mkdir()
    (real / "lists2" / "l.txt").write_text("x.png\n")
    (tmp_path / "link").symlink_to(real / "lists")
    make_image(tmp_path / "lists2" / "x.png", 64, 64, bright=False, seed=3)  # what text tidying would find
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    assert run(model, "@link/../lists2/l.txt", "lists2/x.png", "-o", out) == 0
    rows = rows_of(out)
    assert [os.path.realpath(r["path"]) for r in rows] == [
        str(real / "lists2" / "x.png"),
        str(tmp_path / "lists2" / "x.png"),
    ]
    out.write_text(json.dumps(rows[1]) + "\n")  # only the second input's row was written before a kill
    assert run(model, "@link/../lists2/l.txt", "lists2/x.png", "-o", out, "--resume") == 0
    assert sorted(os.path.realpath(r["path"]) for r in rows_of(out)) == sorted(
        os.path.realpath(r["path"]) for r in rows
    )


def test_odd_list_lines_and_arguments_keep_their_rows(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each line that names an image gets its row under its own name: `#` names padded with spaces, a `\\r`
    inside a name, a byte-order mark left mid-list by joining two lists; an image called `@a.png` that a
    shell glob hands over is an image, not a list; a UTF-16 list is one line saying so."""
    d = tmp_path / "d"
    for i, name in enumerate(["#hash.png", "x\ry.png", "a.png", "@a.png"]):
        make_image(d / name, 64, 64, bright=bool(i % 2), seed=i)
    listing = d / "l.txt"
    listing.write_bytes("#hash.png \n  #gone comment\nx\ry.png\n\ufeffa.png\n".encode())
    out = tmp_path / "r.jsonl"
    assert run(model, f"@{listing}", "-o", out) == 0
    assert [r["path"] for r in rows_of(out)] == [str(d / n) for n in ("#hash.png", "x\ry.png", "a.png")]
    monkeypatch.chdir(d)
    assert run(model, "@a.png", "a.png", "-o", out) == 0
    assert [r["path"] for r in rows_of(out)] == ["@a.png", "a.png"]
    (d / "#old").mkdir()  # a folder is not a file: "#old" stays a comment
    (d / "c.txt").write_text("#old\na.png\n")
    assert run(model, f"@{d / 'c.txt'}", "-o", out) == 0
    assert [r["path"] for r in rows_of(out)] == [str(d / "a.png")]
    utf16 = d / "u.txt"
    utf16.write_text("a.png\n", encoding="utf-16")
    (d / "mac.txt").write_bytes(b"a.png\ra.png\r")
    capsys.readouterr()
    assert run(model, f"@{utf16}", "-o", tmp_path / "u.jsonl") == 2
    assert "is UTF-16 text; save it as UTF-8" in capsys.readouterr().err
    assert run(model, f"@{d / 'mac.txt'}", "-o", tmp_path / "u.jsonl") == 2
    assert "ends its lines with \\r alone" in capsys.readouterr().err
    assert not (tmp_path / "u.jsonl").exists()


def test_impossible_names_get_worded_error_rows(model: Path, tmp_path: Path) -> None:
    """A list line with a NUL byte past the list's first 64 KiB and a link to a missing file each get an
    error row that says what is wrong with the name, not Python's wording."""
    make_image(tmp_path / "a.png", 64, 64, bright=False)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"# " + b"x" * 70_000 + b"\nbad\x00name.png\ndangling.png\na.png\n")
    out = tmp_path / "r.jsonl"
    assert run(model, f"@{listing}", "-o", out) == 1
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["error", "error", "ok"]
    assert "the name contains a NUL byte" in rows[0]["error"]
    assert "a link whose target does not exist" in rows[1]["error"]


def test_export_images_list_problems_are_one_line(tmp_path: Path) -> None:
    """`export --images` reads lists and manifests with inspect's rule: a UTF-16 or binary list, or a
    UTF-16 CSV, is an ExportError naming the file; a manifest's names that are not UTF-8 are kept."""
    from defectscope.export.errors import ExportError
    from defectscope.export.parity import image_paths

    utf16 = tmp_path / "u.txt"
    utf16.write_text("a.png\n", encoding="utf-16")
    with pytest.raises(ExportError, match=r"u\.txt: --images is UTF-16 text; save it as UTF-8"):
        image_paths({}, utf16)
    binary = tmp_path / "m.bin"
    binary.write_bytes(b"\x08\x07\x00\x01onnx")
    with pytest.raises(ExportError, match=r"m\.bin: --images is not a text file"):
        image_paths({}, binary)
    manifest = tmp_path / "m.csv"
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
    make_image(tmp_path / name, 64, 64, bright=False)
    manifest.write_bytes(b"path,label\ncaf\xe9.png,good\n")
    assert image_paths({}, manifest) == [str(tmp_path / name)]
    manifest.write_text("path,label\na.png,good\n", encoding="utf-16")
    with pytest.raises(ExportError, match=r"m\.csv: --images is UTF-16 text; save it as UTF-8"):
        image_paths({}, manifest)


def test_overlapping_folder_arguments_are_told_before_the_work(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder and a folder inside it (or the same folder twice) give their shared images two rows: said
    in one warning before any image; separate folders and a file listed twice (k rows on purpose) are not."""
    for name in ("good/a.png", "bad/b.png"):
        make_image(tmp_path / "lot" / name, 64, 64, bright=name.startswith("bad"))
    monkeypatch.chdir(tmp_path)
    cases = {
        ("lot", "lot/good", "--recursive"): (
            "lot/good is inside lot: an image named by both gets a row from each",
            3,
        ),
        ("lot/good", "./lot/good/"): ("./lot/good/ is the same folder as lot/good", 2),
        ("lot/good", "lot/good/a.png"): ("lot/good/a.png is inside lot/good", 2),
        ("lot/good", "lot/bad"): (None, 2),
        ("lot/good/a.png", "lot/good/a.png"): (None, 2),
    }
    for i, (args, (warning, rows)) in enumerate(cases.items()):
        capsys.readouterr()
        assert run(model, *args, "-o", f"r{i}.jsonl") == 0
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if "warning:" in line]
        assert len(said) == (warning is not None) and all(warning in line for line in said), (args, err)
        assert len(rows_of(tmp_path / f"r{i}.jsonl")) == rows, args


def test_a_folder_holds_the_same_images_for_inspect_training_and_export(model: Path, tmp_path: Path) -> None:
    """One rule for what a folder holds (runtime.files.walk_files): a hidden sub-folder (a viewer's cache) and
    a link to another folder are left out by `inspect --recursive`, the folder data source and `export
    --images` alike (training and export took `.cache/` in while inspect skipped it)."""
    from defectscope.data.sources import folder_source
    from defectscope.export.parity import list_images

    lot = tmp_path / "lot"
    for rel in ("good/a.png", "good/deep/b.png", "good/.cache/c.png", "elsewhere/d.png", "crack/e.png"):
        make_image(lot / rel if not rel.startswith("elsewhere") else tmp_path / rel, 64, 64, bright=False)
    (lot / "good" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (lot / "good" / ".hidden.png").write_bytes((lot / "good" / "a.png").read_bytes())
    expected = sorted(str(lot / rel) for rel in ("crack/e.png", "good/a.png", "good/deep/b.png"))
    out = tmp_path / "r.jsonl"
    assert run(model, str(lot), "--recursive", "-o", out) == 0
    assert sorted(r["path"] for r in rows_of(out)) == expected
    assert sorted(s.path for s in folder_source(lot, good_class="good").samples) == expected
    assert list_images(lot) == expected
