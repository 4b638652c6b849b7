"""`defectscope inspect`: rows, bad inputs, exit codes, CSV, resume, input expansion (real files, real ORT)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.runtime.image import ERROR_KINDS
from defectscope.runtime.results import ROW_KEYS, recover_jsonl
from inspect_runs import rows_of, run
from onnx_models import build_model, make_image


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("good")
    sizes = [(64, 64), (96, 64), (64, 64), (80, 120), (96, 64), (64, 64), (200, 150), (64, 64)]
    for i, (w, h) in enumerate(sizes * 2):
        make_image(d / f"img_{i:02d}.png", w, h, bright=i % 3 == 0, seed=i)
    return d


def make_bad_files(d: Path) -> dict[str, str]:
    """One file per loader error kind; returns {input as listed: expected kind}."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "zero.png").write_bytes(b"")
    good = make_image(d / "full.png", 120, 120, bright=True, seed=1)
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    (d / "text.png").write_text("not an image at all")
    Image.new("LAB", (64, 64)).save(d / "lab.tif")
    Image.new("L", (2100, 2000)).save(d / "huge.png")  # 4.2 MP > the fixture's 4 MP limit
    make_image(d / "tiny.png", 16, 16, bright=False)
    os.symlink("loop.png", d / "loop.png")  # ELOOP: exists as a name, cannot be read
    (d / "adir").mkdir()
    os.mkfifo(d / "pipe.png")  # opening it for reading would wait for a writer forever
    return {
        str(d / "zero.png"): "zero_bytes",
        str(d / "truncated.png"): "truncated",
        str(d / "text.png"): "not_an_image",
        str(d / "lab.tif"): "unsupported_mode",
        str(d / "huge.png"): "too_large",
        str(d / "tiny.png"): "too_small",
        str(d / "loop.png"): "unreadable",
        str(d / "missing.png"): "vanished",
        str(d / "adir"): "is_directory",
        str(d / "pipe.png"): "not_a_file",
    }


def test_one_row_per_input_for_every_bad_kind(model: Path, good_dir: Path, tmp_path: Path) -> None:
    bad = make_bad_files(tmp_path / "bad")
    assert set(bad.values()) == set(ERROR_KINDS)
    goods = sorted(str(p) for p in good_dir.glob("*.png"))[:5]
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\n\n" + "\n".join(goods[:2] + list(bad) + goods[2:]) + "\n")
    out = tmp_path / "r.jsonl"
    assert run(model, f"@{listing}", "-o", out, "--workers", 3, "--batch-size", 2) == 1
    rows = rows_of(out)
    assert len(rows) == len(bad) + len(goods)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows)
    for path, kind in bad.items():
        r = by_path[path]
        assert r["status"] == "error" and r["verdict"] is None and r["probs"] is None
        assert r["error"].startswith(kind + ": "), (path, r["error"])
    for path in goods:
        r = by_path[path]
        assert r["status"] == "ok" and r["error"] is None and r["verdict"] in {"OK", "NG"}
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["model_sha256"] and r["provider"] == "cpu" and r["latency_ms"] >= 0


def test_rows_are_complete_and_consistent(model: Path, good_dir: Path, tmp_path: Path) -> None:
    out, csv_path = tmp_path / "r.jsonl", tmp_path / "r.csv"
    assert run(model, good_dir, "-o", out, "--csv", csv_path) == 0
    rows = rows_of(out)
    assert len(rows) == 16 and {r["verdict"] for r in rows} == {"OK", "NG"}
    for r in rows:
        probs = r["probs"]
        assert list(probs) == ["good", "crack", "scratch"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["defect_prob"] == pytest.approx(1 - probs["good"])
        assert r["top_class"] == max(probs, key=probs.get)
        assert r["top_prob"] == pytest.approx(probs[r["top_class"]])
        assert (r["threshold"], r["threshold_source"]) == (0.5, "model")  # the fixture model's own
        assert r["verdict"] == ("NG" if r["defect_prob"] >= r["threshold"] else "OK")
        with Image.open(r["path"]) as im:
            assert (r["width"], r["height"]) == im.size
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert [c for c in table[0] if c.startswith("prob_")] == ["prob_good", "prob_crack", "prob_scratch"]
    for r, c in zip(rows, table):
        assert c["path"] == r["path"] and c["verdict"] == r["verdict"]
        assert float(c["prob_crack"]) == pytest.approx(r["probs"]["crack"])


def test_threshold_override(model: Path, good_dir: Path, tmp_path: Path) -> None:
    assert run(model, good_dir, "-o", tmp_path / "a.jsonl", "--threshold", 0) == 0
    assert {r["verdict"] for r in rows_of(tmp_path / "a.jsonl")} == {"NG"}
    assert run(model, good_dir, "-o", tmp_path / "b.jsonl", "--threshold", 1) == 0
    rows = rows_of(tmp_path / "b.jsonl")
    assert {r["verdict"] for r in rows} == {"OK"}
    assert {(r["threshold"], r["threshold_source"]) for r in rows} == {(1.0, "--threshold")}


def test_resume_refuses_results_of_another_threshold_or_model(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.jsonl"
    assert run(model, good_dir, "-o", out, "--threshold", 0.3) == 0
    before = out.read_bytes()
    assert run(model, good_dir, "-o", out, "--resume") == 2  # the model's 0.5 now: refused
    err = capsys.readouterr().err
    assert "threshold 0.3 (--threshold)" in err and "uses 0.5 (model)" in err and "--threshold 0.3" in err
    other = build_model(tmp_path / "other.onnx", seed=1)
    assert run(other, good_dir, "-o", out, "--resume", "--threshold", 0.3) == 2
    assert "another model" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(model, good_dir, "-o", out, "--resume", "--threshold", 0.3) == 0  # the same run goes on


def test_results_of_the_first_row_format_still_resume_report_and_export(
    model: Path, good_dir: Path, tmp_path: Path
) -> None:
    """Rows written before the fields were renamed (``label``/``score``) and before thresholds were
    recorded: --resume continues them, and CSV and report read them under today's names."""
    new = tmp_path / "new.jsonl"
    assert run(model, good_dir, "-o", new) == 0
    old_rows = []
    for r in rows_of(new)[:10]:
        r["label"], r["score"] = r.pop("top_class"), r.pop("top_prob")
        del r["threshold"], r["threshold_source"]
        old_rows.append(r)
    out = tmp_path / "old.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    csv_path, page = tmp_path / "r.csv", tmp_path / "r.html"
    assert run(model, good_dir, "-o", out, "--resume", "--csv", csv_path, "--report", page) == 0
    rows = rows_of(out)
    assert len(rows) == 16 and rows[:10] == old_rows
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [c["top_class"] for c in table[:10]] == [r["label"] for r in old_rows]
    assert [c["top_class"] for c in table[10:]] == [r["top_class"] for r in rows[10:]]
    assert {c["threshold"] for c in table[:10]} == {""} and {c["threshold"] for c in table[10:]} == {"0.5"}
    assert "most likely" in page.read_text()


def test_batching_and_workers_do_not_change_probabilities(
    model: Path, good_dir: Path, tmp_path: Path
) -> None:
    results = []
    for i, (bs, workers) in enumerate([(1, 0), (8, 3), (3, 1)]):
        out = tmp_path / f"{i}.jsonl"
        assert run(model, good_dir, "-o", out, "--batch-size", bs, "--workers", workers) == 0
        results.append({r["path"]: np.array(list(r["probs"].values())) for r in rows_of(out)})
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert max(np.abs(other[k] - results[0][k]).max() for k in other) <= 1e-5


def test_exit_2_for_bad_command_lines_and_models(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.jsonl"
    assert run(model, good_dir) == 2  # no -o
    capsys.readouterr()
    for bad in (1.5, "nan"):
        assert run(model, good_dir, "-o", out, "--threshold", bad) == 2
        assert f"--threshold: expected a number in [0, 1], got '{bad}'" in capsys.readouterr().err
    assert run(model, good_dir, "-o", out, "--batch-size", 0) == 2
    assert run(model, good_dir, "-o", tmp_path) == 2
    assert run(model, good_dir, "-o", out, "--provider", "cuda") == 2
    assert "'cuda' is not available" in capsys.readouterr().err
    assert run(model, "@" + str(tmp_path / "nolist.txt"), "-o", out) == 2
    assert "nolist.txt" in capsys.readouterr().err
    foreign = build_model(tmp_path / "foreign.onnx", omit_metadata=True)
    assert run(foreign, good_dir, "-o", out) == 2
    assert "foreign.onnx" in capsys.readouterr().err
    assert run(model, tmp_path / "empty-glob-*.png", "-o", out) == 2
    assert "no input images" in capsys.readouterr().err
    assert run("--help") == 0


def test_resume_truncates_torn_line_and_finishes_exactly_once(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "l.txt"
    goods = sorted(str(p) for p in good_dir.glob("*.png"))
    listing.write_text("\n".join(goods + goods[:3]) + "\n")  # 3 inputs listed twice
    full = tmp_path / "full.jsonl"
    assert run(model, f"@{listing}", "-o", full, "--batch-size", 4) == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == len(goods) + 3

    out = tmp_path / "r.jsonl"
    torn = lines[7][: len(lines[7]) // 2]
    out.write_text("".join(lines[:7]) + torn)  # a crash mid-write of row 8
    assert run(model, f"@{listing}", "-o", out, "--resume", "--csv", tmp_path / "r.csv") == 0
    assert "torn last line" in capsys.readouterr().err
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(goods + goods[:3])
    ref = {r["path"]: r["probs"] for r in map(json.loads, lines)}
    for r in rows:
        assert max(abs(r["probs"][k] - ref[r["path"]][k]) for k in ref[r["path"]]) <= 1e-5
    with open(tmp_path / "r.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)  # CSV regenerated from the whole JSONL

    # resuming a finished run does nothing; resuming with another model is refused
    assert run(model, f"@{listing}", "-o", out, "--resume") == 0
    assert len(rows_of(out)) == len(rows)
    other = build_model(tmp_path / "other.onnx", seed=5)
    assert run(other, f"@{listing}", "-o", out, "--resume") == 2
    assert "another model" in capsys.readouterr().err


def test_recover_jsonl_edge_cases(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    assert recover_jsonl(p) == 0
    p.write_bytes(b"")
    assert recover_jsonl(p) == 0
    p.write_bytes(b'{"path": "a"}\n{"pa')
    assert recover_jsonl(p) == 4 and p.read_bytes() == b'{"path": "a"}\n'
    p.write_bytes(b'{"path": "only torn"')
    assert recover_jsonl(p) == 20 and p.read_bytes() == b""
    big = b'{"path": "%d"}\n' % 1 + b"x" * 200_000
    p.write_bytes(big)
    assert recover_jsonl(p) == 200_000


def test_heatmaps_written_for_every_ng(model: Path, good_dir: Path, tmp_path: Path) -> None:
    hm = tmp_path / "hm"
    out = tmp_path / "r.jsonl"
    assert run(model, good_dir, "-o", out, "--heatmaps", hm, "--batch-size", 3) == 0
    ng = [r for r in rows_of(out) if r["verdict"] == "NG"]
    files = sorted(hm.glob("*.png"))
    assert ng and len(files) == len(ng)
    with Image.open(files[0]) as im:
        assert im.mode == "RGB"


def test_heat_map_of_a_file_with_a_longest_name(model: Path, tmp_path: Path) -> None:
    """A 250-byte name (legal: the limit is 255) made a heat-map name past the limit: the run failed."""
    d = tmp_path / "in"
    d.mkdir()
    long = make_image(d / ("é" * 60 + "x" * 126 + ".png"), 64, 64, bright=True, seed=3)
    assert len(long.name.encode()) == 250
    out, hm = tmp_path / "r.jsonl", tmp_path / "hm"
    assert run(model, d, "-o", out, "--heatmaps", hm, "--threshold", 0) == 0
    (row,) = rows_of(out)
    (overlay,) = hm.glob("*.png")
    assert row["verdict"] == "NG" and overlay.name.startswith("\u00e9" * 60)
    assert len(overlay.name.encode()) <= 255 - len(".") - len(".tmp")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_tty_and_plain_summary_otherwise(
    model: Path, good_dir: Path, tmp_path: Path
) -> None:
    import pty

    cmd = [
        sys.executable,
        "-m",
        "defectscope",
        "inspect",
        str(model),
        str(good_dir),
        "-o",
        str(tmp_path / "t.jsonl"),
    ]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    tty_text = b"".join(chunks).decode()
    assert "\r" in tty_text and "16 images" in tty_text and "img/s" in tty_text
    assert b"inspected 16 inputs" in out

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # pipes: no bar
    assert r.returncode == 0 and "\r" not in r.stderr and "img/s" not in r.stderr
    assert "inspected 16 inputs: OK" in r.stdout


def test_jsonl_writer_flushes_every_commit_and_fsyncs_by_interval(tmp_path: Path) -> None:
    """A row is readable by another process right after commit (what kill -9 safety needs);
    fsync, the slow part, runs at most once per interval and always at close."""
    from defectscope.runtime.results import JsonlWriter

    lazy = JsonlWriter(tmp_path / "lazy.jsonl", append=False, fsync_interval_s=3600)
    eager = JsonlWriter(tmp_path / "eager.jsonl", append=False, fsync_interval_s=0)
    for i in range(3):
        for w in (lazy, eager):
            w.add({"path": f"img{i}.png"})
            w.commit()
        for name in ("lazy.jsonl", "eager.jsonl"):
            lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
            assert [json.loads(x)["path"] for x in lines] == [f"img{k}.png" for k in range(i + 1)]
    assert lazy.fsyncs == 0 and eager.fsyncs == 3
    lazy.close()
    eager.close()
    assert lazy.fsyncs == 1 and eager.fsyncs == 3


def test_a_name_that_is_not_utf8_gets_its_row_everywhere(model: Path, tmp_path: Path) -> None:
    """The OS hands such a name over with lone surrogates: the JSONL encoder raised mid-run, every rerun
    and --resume stopped at the same file; a list file's line past 64 KiB did the same."""
    d = tmp_path / "in"
    d.mkdir()
    good = make_image(d / "a.png", 64, 64, bright=False, seed=1)
    raw = os.fsdecode(os.fsencode(d) + b"/bad\xffname.png")
    Path(raw).write_bytes(good.read_bytes())
    out, csv_out, report = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.html"
    assert run(model, d, "-o", out, "--csv", csv_out, "--report", report, "--threshold", 0) == 0  # all NG
    assert sorted(r["path"] for r in rows_of(out)) == sorted([str(good), raw])
    assert all(r["status"] == "ok" for r in rows_of(out))
    assert "bad\\udcffname.png" in csv_out.read_text(encoding="utf-8")
    assert "bad\\udcffname.png" in report.read_text(encoding="utf-8")
    assert run(model, d, "-o", out, "--resume", "--threshold", 0) == 0 and len(rows_of(out)) == 2
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# " + b"x" * 70_000 + b"\n" + os.fsencode(raw) + b"\n" + os.fsencode(good) + b"\n")
    listed = tmp_path / "l.jsonl"
    assert run(model, f"@{listing}", "-o", listed) == 0
    assert [r["path"] for r in rows_of(listed)] == [raw, str(good)]
    binary = tmp_path / "model-as-list.txt"
    binary.write_bytes(model.read_bytes())
    assert run(model, f"@{binary}", "-o", tmp_path / "b.jsonl") == 2


def test_output_names_at_the_limit_and_dangling_links(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 253-byte --csv name passed the up-front check, then its temporary name (+ .tmp) failed with a
    traceback after the whole run; a --heatmaps link to a missing folder was a FileExistsError traceback."""
    long_csv = tmp_path / ("r" * 249 + ".csv")
    assert run(model, good_dir, "-o", tmp_path / "r.jsonl", "--csv", long_csv) == 0
    assert len(long_csv.read_text().splitlines()) == 1 + len(rows_of(tmp_path / "r.jsonl"))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    dangling = tmp_path / "hm"
    dangling.symlink_to(tmp_path / "missing")
    capsys.readouterr()
    assert run(model, good_dir, "-o", tmp_path / "h.jsonl", "--heatmaps", dangling) == 2
    assert "missing, which does not exist; create that folder or give another" in capsys.readouterr().err
    assert not (tmp_path / "h.jsonl").exists()


def test_inputs_that_name_no_image_are_one_line_or_a_warning_after_the_run(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty folder alone printed a warning and then the error saying the same; beside a folder with
    images, its warning comes once, after the run's rows."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "r.jsonl"
    assert run(model, empty, "-o", out) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"defectscope inspect: error: no input images found in {empty}"
    ]
    assert run(model, empty, f"{empty}/*.png", good_dir, "-o", out) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"defectscope inspect: warning: folder '{empty}' yielded no images",
        f"defectscope inspect: warning: pattern '{empty}/*.png' yielded no images",
    ]
    assert len(rows_of(out)) == len(list(good_dir.iterdir()))


def test_replacing_earlier_results_is_said(
    model: Path, good_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --resume a results file starts over; a newcomer's 6,000 rows went without a word."""
    out = tmp_path / "r.jsonl"
    assert run(model, good_dir, "-o", out) == 0
    assert "held earlier results" not in capsys.readouterr().err
    assert run(model, good_dir, "-o", out) == 0
    assert f"defectscope inspect: warning: {out} held earlier results; they are replaced (--resume would" in (
        capsys.readouterr().err
    )
    assert len(rows_of(out)) == len(list(good_dir.iterdir()))
