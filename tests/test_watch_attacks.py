"""`defectscope watch` against what a hot folder can hold besides finished images (from an attack on it):
a named pipe, a file replaced while its move waits, a camera delivering the same name, size and mtime
again, a writer that sizes the file before filling it, a hot folder that goes away, repeated NG names."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import watch_runs as wr
from onnx_models import build_model
from watch_runs import _no_watcher_outlives_its_test  # noqa: F401  (autouse: no watcher outlives its test)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace")


def _crashed_after_row(model: Path, tmp_path: Path, frame: bytes) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(hot, out, log, row): ``hot/cam.png`` holding ``frame`` was recorded, then the watcher was killed
    before moving it."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    (hot / "cam.png").write_bytes(frame)
    proc = wr.start_watch(model, hot, out, log, crash_at="after_commit:1")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (row,) = wr.read_rows(out)
    return hot, out, log, row


@pytest.mark.slow
def test_a_named_pipe_gets_an_error_row_and_files_after_it_are_inspected(model: Path, tmp_path: Path) -> None:
    """Reading a pipe waited for a writer forever: no row for it or any later file, and SIGTERM hung."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    os.mkfifo(hot / "pipe.png")
    (hot / "after.png").write_bytes(wr.png_bytes(1, bright=True))
    wr.wait_for(lambda: len(wr.read_rows(out)) == 2 and wr.hot_names(hot) == [], what="both handled")
    rows = {Path(r["path"]).name: r for r in wr.read_rows(out)}
    assert (
        rows["pipe.png"]["error"].startswith("not_a_file: ")
        and rows["pipe.png"]["moved_to"] == "error/pipe.png"
    )
    assert rows["after.png"]["status"] == "ok"
    _stop(proc, log)


@pytest.mark.slow
def test_a_file_delivered_again_with_the_same_name_size_and_mtime_is_inspected_again(
    model: Path, tmp_path: Path
) -> None:
    """Killed between a file's row and its move; before the restart the camera delivers a different image
    under the same name with the same size and mtime (`cp -p` of fixed-size frames). Recovery took it for
    the recorded file and deleted it unseen; the ctime tells them apart."""
    first = wr.png_bytes(3, bright=False)
    hot, out, log, recorded = _crashed_after_row(model, tmp_path, first)
    second = bytearray(first)
    second[-20] ^= 0xFF  # same size; the bytes before IEND differ
    time.sleep(0.05)  # a later ctime on any clock granularity
    (hot / "cam.png").write_bytes(bytes(second))
    os.utime(hot / "cam.png", ns=(recorded["source_mtime_ns"], recorded["source_mtime_ns"]))
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(
        lambda: len(wr.read_rows(out)) == 2 and wr.hot_names(hot) == [], what="the new delivery inspected"
    )
    _stop(proc, log)
    rows = wr.read_rows(out)
    assert rows[1]["source_ctime_ns"] != recorded["source_ctime_ns"]
    assert hashlib.sha1((out / rows[1]["moved_to"]).read_bytes()).digest() == hashlib.sha1(second).digest()
    assert "recovered" not in log.read_text()


@pytest.mark.slow
def test_a_chmod_between_a_row_and_a_crash_costs_no_second_row(model: Path, tmp_path: Path) -> None:
    """Killed between a file's row and its move, then the file's mode changed (its ctime too): the restart
    inspected it again, a second row for one file. Its bytes are the row's, so it is moved under it."""
    frame = wr.png_bytes(4, bright=True)
    hot, out, log, recorded = _crashed_after_row(model, tmp_path, frame)
    assert recorded["source_sha256"] == hashlib.sha256(frame).hexdigest()
    ctime = os.stat(hot / "cam.png").st_ctime_ns
    time.sleep(0.05)  # a later ctime on any clock granularity
    os.chmod(hot / "cam.png", 0o600)
    assert os.stat(hot / "cam.png").st_ctime_ns != ctime
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: wr.hot_names(hot) == [], what="the recorded file moved")
    _stop(proc, log)
    assert wr.read_rows(out) == [recorded] and (out / recorded["moved_to"]).read_bytes() == frame
    assert "recovered 1 file(s)" in log.read_text()


@pytest.mark.slow
def test_the_same_bytes_delivered_again_after_their_move_get_their_own_row(
    model: Path, tmp_path: Path
) -> None:
    """A file inspected and moved; with the watcher stopped, the same bytes arrive again under the name (a
    resend), even with the old mtime. Recovery knew files by their bytes alone and filed the resend under
    the first row (or deleted it, its destination holding those bytes): a delivery without a row."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    frame = wr.png_bytes(2, bright=True)
    (hot / "cam.png").write_bytes(frame)
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: len(wr.read_rows(out)) == 1 and wr.hot_names(hot) == [], what="the first delivery")
    _stop(proc, log)
    (first,) = wr.read_rows(out)
    (hot / "cam.png").write_bytes(frame)
    os.utime(hot / "cam.png", ns=(first["source_mtime_ns"], first["source_mtime_ns"]))
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: len(wr.read_rows(out)) == 2 and wr.hot_names(hot) == [], what="the resend inspected")
    _stop(proc, log)
    second = wr.read_rows(out)[1]
    assert second["source_sha256"] == first["source_sha256"] and second["moved_to"] != first["moved_to"]
    assert (out / first["moved_to"]).read_bytes() == (out / second["moved_to"]).read_bytes() == frame
    assert "recovered" not in log.read_text()


@pytest.mark.slow
def test_the_filed_file_linked_back_in_is_a_new_delivery(model: Path, tmp_path: Path) -> None:
    """The filed frame hard-linked (or symlinked) into the hot folder again while the watcher is down is
    the same inode, size, mtime and bytes as its row records: recovery unlinked it as a finished move's
    leftover. On one file system a move is a rename, so a row whose destination exists was filed: new."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    (hot / "a.png").write_bytes(wr.png_bytes(2, bright=True))
    (hot / "b.png").write_bytes(wr.png_bytes(3, bright=False))
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: len(wr.read_rows(out)) == 2 and wr.hot_names(hot) == [], what="both filed")
    _stop(proc, log)
    filed = {Path(r["path"]).name: r["moved_to"] for r in wr.read_rows(out)}
    os.link(out / filed["a.png"], hot / "a.png")
    os.symlink(out / filed["b.png"], hot / "b.png")
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: len(wr.read_rows(out)) == 4 and wr.hot_names(hot) == [], what="both inspected again")
    _stop(proc, log)
    rows = wr.read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows[2:]) == ["a.png", "b.png"]
    for r in rows[2:]:
        assert r["moved_to"] != filed[Path(r["path"]).name] and os.path.lexists(out / r["moved_to"])
    assert all((out / p).exists() for p in filed.values()) and "recovered" not in log.read_text()


@pytest.mark.slow
def test_a_renumbered_device_after_a_reboot_still_recovers_the_file(model: Path, tmp_path: Path) -> None:
    """NFS and btrfs may hand a file system another device number after a reboot: the recorded inode then
    names another device, which is no reason to call the file new (it was: a second row)."""
    hot, out, log, row = _crashed_after_row(model, tmp_path, wr.png_bytes(4, bright=True))
    row["source_inode"][0] += 1  # the same inode number on a "different" device, as after the reboot
    (out / "results.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    proc = wr.start_watch(model, hot, out, log)
    wr.wait_for(lambda: wr.hot_names(hot) == [], what="the recorded file moved")
    _stop(proc, log)
    assert wr.read_rows(out) == [row] and "recovered 1 file(s)" in log.read_text()


@pytest.mark.slow
def test_a_presized_png_is_not_inspected_before_its_end_is_written(model: Path, tmp_path: Path) -> None:
    """A writer that sets the file's size first and fills it later (Windows copies, SMB) left zeros at the
    end, which decode as black rows: the half-written image got an OK row and was moved mid-write."""
    hot, out, log = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log"
    hot.mkdir()
    proc = wr.start_watch(model, hot, out, log, extra=("--grace", "5", "--stable-polls", "2"))
    wr.wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    data = wr.png_bytes(4, bright=True)
    with open(hot / "big.png", "wb") as f:
        f.truncate(len(data))
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.5)  # far past the stable window (2 polls of 0.1 s)
        f.write(data[len(data) // 2 :])
    wr.wait_for(lambda: len(wr.read_rows(out)) == 1 and wr.hot_names(hot) == [], what="big.png handled")
    _stop(proc, log)
    (row,) = wr.read_rows(out)
    assert row["status"] == "ok" and row["source_size"] == len(data)
    assert (out / row["moved_to"]).read_bytes() == data
    assert "big.png reads as truncated; watching it for more writes" in log.read_text()


@pytest.mark.slow
def test_repeated_ng_names_keep_every_heat_map_and_a_lost_hot_folder_is_logged_once(
    model: Path, tmp_path: Path
) -> None:
    hot, out, log, heat = tmp_path / "hot", tmp_path / "out", tmp_path / "watch.log", tmp_path / "heat"
    hot.mkdir()
    proc = wr.start_watch(model, hot, out, log, extra=("--heatmaps", str(heat)))
    wr.wait_for(lambda: (out / "results.jsonl").exists(), what="watcher start")
    for i in range(2):
        (hot / "a.png").write_bytes(wr.png_bytes(10 + i, bright=True))
        wr.wait_for(
            lambda i=i: len(wr.read_rows(out)) == i + 1 and wr.hot_names(hot) == [], what=f"a.png #{i + 1}"
        )
    rows = wr.read_rows(out)
    assert [r["verdict"] for r in rows] == ["NG", "NG"] and rows[1]["moved_to"] == "NG/a_1.png"
    assert len(list(heat.glob("*.png"))) == 2  # before, the second overlay replaced the first
    hot.rename(tmp_path / "gone")
    time.sleep(1.5)  # 15 polls
    (tmp_path / "gone").rename(hot)
    (hot / "b.png").write_bytes(wr.png_bytes(12, bright=False))
    wr.wait_for(lambda: len(wr.read_rows(out)) == 3, what="b.png after the folder came back")
    _stop(proc, log)
    text = log.read_text()
    assert text.count("cannot list") == 1 and text.count("can be listed again") == 1


def test_a_stuck_move_of_a_file_replaced_since_its_row_is_not_filed(model: Path, tmp_path: Path) -> None:
    """A recorded file whose move failed (full disk) and that the camera then overwrote was filed under
    the old row's verdict, never inspected: an NG part in OK/. Now the replaced file is inspected anew."""
    hot, out = tmp_path / "hot", tmp_path / "out"
    watcher, _ = _stuck_watcher(model, hot, out)
    (hot / "f.png").write_bytes(wr.png_bytes(6, bright=True) + b"\0" * 7)  # overwritten while stuck
    watcher._retry_stuck()
    assert not (out / "OK" / "f.png").exists() and (hot / "f.png").exists() and not watcher.stuck
    assert [name for name, _ in _poll_until_ready(watcher)] == ["f.png"]


def test_a_stuck_file_is_known_by_its_bytes_not_its_status(model: Path, tmp_path: Path) -> None:
    """Replaced while its move waits by a frame of the same size with the mtime put back (`cp -p`): the
    size-and-mtime check filed it under the old row. A chmod, which changes no byte, still moves it."""
    hot, out = tmp_path / "hot", tmp_path / "out"
    watcher, frame = _stuck_watcher(model, hot, out)
    st = os.stat(hot / "f.png")
    other = bytearray(frame)
    other[-20] ^= 0xFF
    (hot / "f.png").write_bytes(bytes(other))
    os.utime(hot / "f.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    watcher._retry_stuck()
    assert not (out / "OK" / "f.png").exists() and not watcher.stuck
    watcher, frame = _stuck_watcher(model, tmp_path / "hot2", out)
    os.chmod(tmp_path / "hot2" / "f.png", 0o600)
    watcher._retry_stuck()
    assert (out / "OK" / "f.png").read_bytes() == frame and not watcher.stuck


def _stuck_watcher(model: Path, hot: Path, out: Path) -> tuple[Any, bytes]:
    """A watcher whose move of ``hot/f.png`` (recorded as OK, with its digest) failed and waits."""
    from defectscope.runtime.hotfolder import Recorded
    from defectscope.runtime.watcher import _Pending

    watcher, frame, st = _watcher_and_frame(model, hot, out)
    source = Recorded.of_stat(st, hashlib.sha256(frame).hexdigest())
    watcher.stuck["f.png"] = _Pending("f.png", "OK/f.png", "OK", source)
    return watcher, frame


def _watcher_and_frame(model: Path, hot: Path, out: Path) -> tuple[Any, bytes, os.stat_result]:
    """An in-process watcher of ``hot`` (not started) and the frame it holds as ``f.png``, with its status."""
    from defectscope.runtime.inspector import Inspector
    from defectscope.runtime.watcher import WatchConfig, Watcher

    hot.mkdir()
    frame = wr.png_bytes(5, bright=False)
    (hot / "f.png").write_bytes(frame)
    run = _run_options(model)
    watcher = Watcher(WatchConfig(run, str(hot), str(out)), Inspector.from_config(run.session))
    return watcher, frame, os.stat(hot / "f.png")


def test_a_file_that_cannot_be_read_to_tell_waits(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stuck file whose ctime changed must be read to tell whether it is the recorded one; a failed read
    (a Windows sharing lock, which root on Linux cannot make, hence the patched reader) was taken for a new
    file: inspected again, a second row. It waits now, and moves once it can be read."""
    from defectscope.runtime import hotfolder

    hot, out = tmp_path / "hot", tmp_path / "out"
    watcher, frame = _stuck_watcher(model, hot, out)
    os.chmod(hot / "f.png", 0o600)
    monkeypatch.setattr(hotfolder, "read_image_bytes", _locked)
    watcher._retry_stuck()
    assert "f.png" in watcher.stuck and _poll_until_ready(watcher) == []
    monkeypatch.undo()
    watcher._retry_stuck()
    assert (out / "OK" / "f.png").read_bytes() == frame and not watcher.stuck


def _locked(path: Path, max_bytes: int) -> bytes:
    from defectscope.runtime.image_file import ImageLoadError

    raise ImageLoadError(path, "unreadable", "cannot be read: sharing violation")


def test_a_rewrite_between_the_read_and_the_check_is_not_recorded_as_read(
    model: Path, tmp_path: Path
) -> None:
    """The row took its ctime from a `stat` after the read: a same-size rewrite with the mtime put back in
    between was filed under a verdict and digest of bytes it does not hold. The open file's status counts."""
    from defectscope.runtime.hotfolder import Observation, Recorded
    from defectscope.runtime.pipeline import decode

    hot, out = tmp_path / "hot", tmp_path / "out"
    watcher, frame, st = _watcher_and_frame(model, hot, out)
    item = decode(str(hot / "f.png"), watcher.inspector.loader_config, True)
    assert item.sha256 == hashlib.sha256(frame).hexdigest()
    obs = Observation.of(st)
    time.sleep(0.05)  # a later ctime on any clock granularity
    other = bytearray(frame)
    other[-20] ^= 0xFF
    (hot / "f.png").write_bytes(bytes(other))
    os.utime(hot / "f.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not watcher._still_same("f.png", obs, item) and obs.record is None
    fresh = decode(str(hot / "f.png"), watcher.inspector.loader_config, True)
    assert watcher._still_same("f.png", watcher.seen["f.png"], fresh)
    assert watcher.seen["f.png"].record == Recorded.of_stat(
        os.stat(hot / "f.png"), hashlib.sha256(other).hexdigest()
    )


def test_a_taken_destination_of_the_same_size_is_not_taken_for_the_copy(model: Path, tmp_path: Path) -> None:
    """Recovery unlinked the hot-folder file whenever its recorded destination held a file of the same
    size (fixed-size camera frames): only a byte-equal copy (a crashed cross-device move) counts now."""
    from defectscope.runtime.inspector import Inspector
    from defectscope.runtime.watcher import WatchConfig, Watcher, _Pending

    hot, out = tmp_path / "hot", tmp_path / "out"
    hot.mkdir()
    frame = wr.png_bytes(7, bright=True)
    (hot / "f.png").write_bytes(frame)
    run = _run_options(model)
    watcher = Watcher(WatchConfig(run, str(hot), str(out)), Inspector.from_config(run.session))
    other = bytearray(frame)
    other[-20] ^= 0xFF
    (out / "NG" / "f.png").write_bytes(bytes(other))  # same size, other bytes
    assert watcher._move(_Pending("f.png", "NG/f.png", "NG"))
    assert (out / "NG" / "f.png").read_bytes() == bytes(other) and (
        out / "NG" / "f_1.png"
    ).read_bytes() == frame
    (hot / "g.png").write_bytes(frame)
    (out / "OK" / "g.png").write_bytes(frame)  # the copy a crashed move had placed
    assert watcher._move(_Pending("g.png", "OK/g.png", "OK"))
    assert not (hot / "g.png").exists() and sorted(os.listdir(out / "OK")) == ["g.png"]


def _run_options(model: Path) -> Any:
    """The watch command line's run options for ``model``, as `defectscope watch` parses them."""
    from defectscope.runtime.options import run_options
    from defectscope.runtime.watch import build_parser

    p = build_parser()
    return run_options(p, p.parse_args([str(model), "--in", "x", "--out", "y"]))


def _poll_until_ready(watcher: Any, polls: int = 10) -> list[Any]:
    for _ in range(polls):
        ready = watcher.poll()
        if ready:
            return list(ready)
    return []


def test_log_lines_show_control_characters_of_names_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A file name with a newline or an escape sequence could forge a log line or recolour the terminal."""
    from defectscope.runtime.hotfolder import log

    log("watch: a.png\n2026-01-01 00:00:00 watch: forged -> OK/x.png\x1b[31m")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert err.rstrip("\n").endswith("a.png\\n2026-01-01 00:00:00 watch: forged -> OK/x.png\\x1b[31m")
