"""`defectscope watch`: exactly-once handling across kill -9, restarts and SIGTERM (real subprocesses)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from defectscope.runtime.hotfolder import is_ignored
from defectscope.runtime.watch import build_parser
from onnx_models import build_model
from watch_runs import (
    FOLDERS,
    Dropper,
    _no_watcher_outlives_its_test,  # noqa: F401  (autouse: no watcher outlives its test)
    check_exactly_once,
    hot_names,
    png_bytes,
    read_rows,
    start_watch,
    wait_for,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.mark.slow
def test_storm_of_files_with_kill_9_restart_and_sigterm(model: Path, tmp_path: Path) -> None:
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    (hot / ".hidden.png").write_bytes(png_bytes(0, False))  # dotfile: never touched
    (hot / "upload.png.part").write_bytes(png_bytes(1, False))  # temp name: never touched
    dropper = Dropper(hot)
    n_files = 300

    def produce() -> None:
        for i in range(n_files):
            name = f"cam1_{i:04d}.png"
            data = png_bytes(i, bright=i % 4 == 0)
            if i % 50 == 7:
                dropper.atomic(f"broken_{i:04d}.png", data[: len(data) // 2], "broken")
            elif i % 50 == 21:
                dropper.atomic(f"empty_{i:04d}.png", b"", "broken")
            elif i % 50 == 33:
                dropper.direct(f"notes_{i:04d}.txt", b"operator notes", "broken")
            if i % 15 == 0:
                dropper.slow(name, data)
            elif i % 3 == 0:
                dropper.direct(name, data)
            else:
                dropper.atomic(name, data)
            time.sleep(0.004)

    proc = start_watch(model, hot, out, log)
    producer = threading.Thread(target=produce)
    producer.start()
    wait_for(lambda: len(read_rows(out)) >= 60, what="first rows")
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 in the middle of the storm
    proc.wait(timeout=30)
    rows_at_kill = len(read_rows(out))
    proc = start_watch(model, hot, out, log)
    producer.join(timeout=120)
    assert rows_at_kill < len(dropper.written), "the kill must happen while files are still arriving"
    wait_for(
        lambda: hot_names(hot) == [] and len(read_rows(out)) >= len(dropper.written), what="all files handled"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    rows = check_exactly_once(hot, out, dropper)
    assert sorted(os.listdir(hot)) == [".hidden.png", "upload.png.part"]
    status = {Path(r["path"]).name: r["status"] for r in rows}
    for name, kind in dropper.kinds.items():
        assert status[name] == ("error" if kind == "broken" else "ok"), (name, kind, status[name])
    assert {r["verdict"] for r in rows if r["status"] == "ok"} == {"OK", "NG"}
    print(f"{len(rows)} files, {rows_at_kill} rows at kill -9; {log.read_text().count('batch')} batch lines")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after_commit:1", "mid_move:2"])
def test_crash_between_row_and_move_is_recovered_without_reinference(
    model: Path, tmp_path: Path, fault: str
) -> None:
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    dropper = Dropper(hot)
    for i in range(20):
        dropper.atomic(f"p{i:02d}.png", png_bytes(i, bright=i % 2 == 0))
    proc = start_watch(model, hot, out, log, crash_at=fault)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # the hook killed it at the chosen point
    rows = read_rows(out)
    batches = int(fault.split(":")[1])
    assert len(rows) == 8 * batches
    recorded_in_hot = [r for r in rows if (hot / Path(r["path"]).name).exists()]
    assert recorded_in_hot, "some recorded files must still be in HOT for this test to mean anything"

    # restart: recorded files are moved without inference; a new file reusing a processed name
    # must not overwrite the earlier one
    proc = start_watch(model, hot, out, log)
    wait_for(lambda: hot_names(hot) == [], what="hot folder drained")
    assert "moved without re-inference" in log.read_text()
    reused = Path(rows[0]["path"]).name
    data = png_bytes(99, bright=True)
    (hot / "tmp.partial").write_bytes(data)
    os.replace(hot / "tmp.partial", hot / reused)
    wait_for(lambda: hot_names(hot) == [], what="reused name handled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    all_rows = read_rows(out)
    assert len(all_rows) == 21  # 20 files + the reused name, nothing inspected twice
    assert Counter(Path(r["path"]).name for r in all_rows)[reused] == 2
    dests = [r["moved_to"] for r in all_rows if Path(r["path"]).name == reused]
    assert len(set(dests)) == 2 and all((out / d).exists() for d in dests)
    dropper.written[reused] = hashlib.sha1(data).hexdigest()  # latest content for the check below
    placed = sum(len(os.listdir(out / sub)) for sub in FOLDERS)
    assert placed == 21


@pytest.mark.slow
def test_sigterm_finishes_the_batch_in_flight(model: Path, tmp_path: Path) -> None:
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    dropper = Dropper(hot)
    heat = tmp_path / "heat"
    proc = start_watch(model, hot, out, log, extra=("--heatmaps", str(heat)))
    wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    for i in range(60):
        dropper.atomic(f"s{i:02d}.png", png_bytes(i, bright=i % 3 == 0))
    wait_for(lambda: len(read_rows(out)) >= 1, what="first batch")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    # invariant after a graceful stop: every recorded file has been moved, nothing is half done
    for r in read_rows(out):
        assert not (hot / Path(r["path"]).name).exists()
        assert (out / r["moved_to"]).exists()
    left = hot_names(hot)
    assert len(read_rows(out)) + len(left) == 60
    # and a restart finishes the rest exactly once
    proc = start_watch(model, hot, out, log, extra=("--heatmaps", str(heat)))
    wait_for(lambda: hot_names(hot) == [], what="rest handled")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    rows = check_exactly_once(hot, out, dropper)
    n_ng = sum(r["verdict"] == "NG" for r in rows)
    assert n_ng > 0 and len(list(heat.glob("*.png"))) == n_ng  # one CAM overlay per NG file


def test_ignore_rules_and_parser() -> None:
    for name in (".x.png", "a.tmp", "a.png.part", "b.PARTIAL", "c.crdownload", "d.png~"):
        assert is_ignored(name), name
    for name in ("a.png", "tmp.png", "part.jpg"):
        assert not is_ignored(name), name
    args = build_parser().parse_args(["m.onnx", "--in", "hot", "--out", "out", "--interval", "1"])
    assert (args.hot, args.out, args.interval, args.stable_polls) == ("hot", "out", 1.0, 2)


def test_watch_rejects_bad_setups(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from defectscope.runtime.watch import main

    hot, out = tmp_path / "hot", str(tmp_path / "o")
    hot.mkdir()
    cases = [
        ([str(model), "--in", str(tmp_path / "nope"), "--out", out], "nope' is not an existing folder"),
        ([str(model), "--in", str(hot), "--out", str(hot)], "--in must not be --out"),
        ([str(model), "--in", str(hot / "OK"), "--out", str(hot)], "--in must not be --out or one of its"),
        ([str(model), "--in", str(hot), "--out", out, "--stable-polls", "0"], "--stable-polls must be >= 1"),
        # each overlay landed in the hot folder as a new part (21 rows in 15 s, then a traceback)
        ([str(model), "--in", str(hot), "--out", out, "--heatmaps", str(hot)], "--heatmaps must not be --in"),
        ([str(tmp_path / "missing.onnx"), "--in", str(hot), "--out", out], "model file not found"),
        # nan polled in a busy loop, inf was a traceback after the model loaded, nan grace held files forever
        ([str(model), "--in", str(hot), "--out", out, "--interval", "nan"], "--interval must be a number of"),
        ([str(model), "--in", str(hot), "--out", out, "--interval", "inf"], "--interval must be a number of"),
        ([str(model), "--in", str(hot), "--out", out, "--grace", "nan"], "--grace must be a number of"),
    ]
    (hot / "OK").mkdir()
    # an --out whose rows came from another model: the way on is another --out (it said "a new results file")
    used = tmp_path / "used"
    used.mkdir()
    row = {"path": "a.png", "status": "error", "error": "x", "model_sha256": "0" * 64, "threshold": 0.5}
    (used / "results.jsonl").write_text(json.dumps(row) + "\n")
    cases.append(([str(model), "--in", str(hot), "--out", str(used)], "another model (sha256 000"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, argv
        if argv[-1] == str(used):
            assert err.strip().endswith("; use a new --out folder"), err


@pytest.mark.slow
def test_slow_writer_pausing_mid_file_is_waited_for_and_every_move_is_logged(
    model: Path, tmp_path: Path
) -> None:
    """A writer pausing far longer than the stable window (0.2 s here) is not called truncated
    while it is inside --grace; a file that stays cut off is, once --grace has passed."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    (hot / "archive").mkdir()  # a sub-folder: never descended into, but said so in the log
    proc = start_watch(model, hot, out, log, extra=("--stable-polls", "2", "--grace", "3", "--workers", "0"))
    wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    slow, cut = png_bytes(1, bright=True), png_bytes(2, bright=False)
    with open(hot / "slow.png", "wb") as f:
        f.write(slow[: len(slow) // 2])
        f.flush()
        (hot / "cut.png").write_bytes(cut[: len(cut) // 2])
        time.sleep(1.5)  # the writer stalls mid-file (a network share): 7x the stable window
        f.write(slow[len(slow) // 2 :])
    wait_for(lambda: len(read_rows(out)) == 2, timeout=30, what="both files handled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert rows["slow.png"]["status"] == "ok" and rows["slow.png"]["moved_to"] == "NG/slow.png"
    assert (out / "NG" / "slow.png").read_bytes() == slow  # the whole file, inspected once
    assert rows["cut.png"]["status"] == "error" and rows["cut.png"]["error"].startswith("truncated")
    cut_mtime = (out / "error" / "cut.png").stat().st_mtime
    decided = datetime.fromisoformat(rows["cut.png"]["time"]).timestamp()
    assert decided - cut_mtime >= 3.0  # held for the whole grace period after its last change
    text = log.read_text()
    assert "slow.png reads as truncated; watching it for more writes" in text
    assert "slow.png -> NG/slow.png: NG (" in text and "cut.png -> error/cut.png: error (truncated" in text
    assert text.count("ignoring sub-folder archive/") == 1
    assert (hot / "archive").is_dir()


def test_names_the_os_allows_each_get_one_row_and_a_place(model: Path, tmp_path: Path) -> None:
    """A 255-byte name arriving twice (its stem_1 name was past the limit: a restart loop), a name whose
    bytes are not UTF-8 (a traceback and a restart loop), a link that loops (the whole listing failed,
    nothing was inspected) and one that dangles (never given a row)."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    long, raw = "\u00e9" * 60 + "x" * 131 + ".png", "bad\udcffname.png"
    assert len(long.encode()) == 255
    proc = start_watch(model, hot, out, log, extra=("--heatmaps", str(tmp_path / "heat")))
    wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    (hot / long).write_bytes(png_bytes(1, bright=True))
    (hot / raw).write_bytes(png_bytes(2, bright=False))
    wait_for(lambda: len(read_rows(out)) == 2 and hot_names(hot) == [], what="the first two moved")
    (hot / long).write_bytes(png_bytes(3, bright=True))  # the same name again
    os.symlink("loop.png", hot / "loop.png")
    os.symlink(tmp_path / "nowhere.png", hot / "dangling.png")
    wait_for(lambda: len(read_rows(out)) == 5 and hot_names(hot) == [], what="every name handled")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
    rows = read_rows(out)
    names = Counter(Path(r["path"]).name for r in rows)
    assert names == Counter({long: 2, raw: 1, "loop.png": 1, "dangling.png": 1})
    places = sorted(r["moved_to"] for r in rows)
    assert len(set(places)) == 5 and all(os.path.lexists(out / p) for p in places)
    assert {r["moved_to"].split("/")[0] for r in rows if "loop" in r["path"] or "dangling" in r["path"]} == {
        "error"
    }
    assert "Traceback" not in log.read_text(errors="replace")
