"""The synthetic generator's output folder (``synth_output.py``): the swap of one set for another is locked
and journalled, a killed or failed swap is finished by the next run, and nothing of the user's is moved over or
deleted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from defectscope import synth
from defectscope.synth_output import (
    CLEARING,
    LOCK,
    MOVING,
    SYNTH_MARKER,
    abandon,
    check_replaceable,
    exclusive,
    partial_folder,
    replace_with,
)


def _files(root: Path) -> dict[str, bytes]:
    """The files of ``root`` and their bytes, without the generator's transient ones (its runs' folders, the lock)."""
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
    transient = (".defectscope-partial-", LOCK)
    return {k: p.read_bytes() for k, p in files.items() if not k.startswith(transient)}


def _set(where: Path, n: int, seed: int) -> Path:
    return synth.generate(where, n=n, seed=seed, size_range=(16, 24), log=lambda _: None)


def _dead_pid() -> int:
    """The pid of a process that has exited (a killed run's)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def _run_folder(root: Path, finished: Path, pid: int | None = None, tag: str | None = None) -> Path:
    """``finished`` (a complete set) made the generation folder of a run on this host (by default one that died)."""
    folder = root / f".defectscope-partial-{socket.gethostname()}-{tag or pid or _dead_pid()}"
    (finished / LOCK).unlink()  # a generation folder has none: it is made fresh, not by generate()
    finished.rename(folder)
    return folder


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _half_moved(root: Path, folder: Path) -> None:
    """The state of a swap stopped after the old set went and the new set's first folder moved in."""
    for path in [*root.glob("[!.]*/*.png"), root / "manifest.csv", root / SYNTH_MARKER]:
        path.unlink()
    (folder / MOVING).touch()
    (root / "crack").rmdir()
    (folder / "crack").rename(root / "crack")


def test_a_run_killed_while_replacing_is_finished_by_the_next(tmp_path: Path) -> None:
    """Killed while removing the old set or renaming its own in, a run left a set without its marker, which
    every later run refused (or, killed mid-removal, a marked set with images missing that training read);
    the next run on the host finishes the swap its journal records."""
    for killed_in in ("removal", "renames"):
        root = _set(tmp_path / killed_in / "s", 8, 0)
        dead = _run_folder(root, _set(tmp_path / killed_in / "new", 8, 1))
        expected = _files(dead)
        if killed_in == "removal":
            (dead / CLEARING).write_text(_digest(root / "manifest.csv") + "\n")
            (root / SYNTH_MARKER).unlink()
            for png in sorted(root.glob("[!.]*/*.png"))[:3]:
                png.unlink()
        else:
            _half_moved(root, dead)
        assert check_replaceable(root)  # before: "is not empty and is not a finished synth output"
        assert _files(root) == expected and not dead.exists()
    (root / ".defectscope-probe-x1").touch()  # another run's writability check at that moment
    assert len(list(_set(root, 5, 2).rglob("*.png"))) == 5  # before: "holds .defectscope-probe-x1, which ..."


def test_only_a_journalled_swap_is_finished(tmp_path: Path) -> None:
    """A killed run that had not begun its swap leaves ``root`` to its owner: a user's files put in since are
    refused, never moved over (review: an unjournalled set overwrote the user's manifest.csv); of two dead
    runs the one whose swap began is finished, and finishing it does not wait on its own lock; a journal
    that a newer finished set outdates is dropped (review: its folders were moved in beside that set)."""
    root = tmp_path / "u"
    root.mkdir()
    _run_folder(root, _set(tmp_path / "a", 6, 1))
    (root / "ok").mkdir()
    (root / "ok" / "a.png").write_bytes(b"mine")
    (root / "manifest.csv").write_text("path,label\nok/a.png,ok\n")
    with pytest.raises(ValueError, match="is not a finished synth output"):
        check_replaceable(root)
    assert (root / "manifest.csv").read_text() == "path,label\nok/a.png,ok\n" and not (root / "good").exists()

    root = _set(tmp_path / "s", 4, 0)
    _run_folder(root, _set(tmp_path / "b", 6, 2))  # not begun
    begun = _run_folder(root, _set(tmp_path / "c", 7, 3))
    _half_moved(root, begun)
    ours = partial_folder(root)  # the run now replacing; it leaves the journalled folder in place
    _set(tmp_path / "d", 5, 4).rename(ours)
    (ours / LOCK).unlink()
    done = threading.Thread(target=replace_with, args=(root, ours), daemon=True)
    done.start()
    done.join(60)
    assert not done.is_alive()  # review: it waited for its own lock, for ever
    assert len(list(root.rglob("*.png"))) == 5 and json.loads((root / SYNTH_MARKER).read_text())["seed"] == 4
    assert not [p for p in root.iterdir() if p.name.startswith(".defectscope-partial-")]

    stale = _run_folder(root, _set(tmp_path / "e", 6, 5))
    (stale / CLEARING).write_text("0" * 64 + "\n")  # began on a set that another run replaced since
    before = _files(root)
    assert check_replaceable(root) and _files(root) == before and not stale.exists()


def test_what_the_user_put_in_is_refused_before_anything_changes(tmp_path: Path) -> None:
    """An image whose row was added to the manifest was deleted with the set (review: the manifest was
    trusted); an empty folder or a link put among the class folders passed the check and stopped the swap
    after the old set was gone (review)."""
    cases = {
        "row": lambda r: (
            (r / "good" / "mine.png").write_bytes((r / "good").iterdir().__next__().read_bytes()),
            (r / "manifest.csv").write_text((r / "manifest.csv").read_text() + "good/mine.png,good\n"),
        ),
        "folder": lambda r: (r / "good" / "later").mkdir(),
        "link": lambda r: (r / "spot").rename(r / "spot.real") or (r / "spot").symlink_to(r / "spot.real"),
        "other": lambda r: (r / "notes").mkdir(),
    }
    for name, put_in in cases.items():
        root = _set(tmp_path / name, 8, 0)
        put_in(root)
        before = _files(root)
        with pytest.raises(ValueError, match="which the synthetic generator did not write"):
            _set(root, 5, 1)
        assert _files(root) == before, name  # nothing removed, nothing moved in
        assert not [p for p in root.iterdir() if p.name.startswith(".defectscope-partial-")], name


def test_a_failed_swap_is_finished_by_the_next_run_in_the_same_process(tmp_path: Path) -> None:
    """A swap that stopped (a file landed in an emptied class folder) is given up as stopped: the next run in
    the same process, or another, finishes it once the file is moved out (review: the folder still named a
    live pid, so nobody would, and the refusal said to choose another folder)."""
    root = _set(tmp_path / "s", 8, 0)
    folder = _run_folder(root, _set(tmp_path / "new", 8, 1), pid=os.getpid())
    expected = _files(folder)
    _half_moved(root, folder)
    (root / "good" / "landed.png").write_bytes(b"x")
    abandon(folder)
    with pytest.raises(ValueError, match=r"stopped at .*good .*move .*good out and run again to finish it"):
        check_replaceable(root)
    (root / "good" / "landed.png").unlink()
    assert check_replaceable(root) and _files(root) == expected


def test_folders_of_another_host_or_a_live_swap_are_left_alone(tmp_path: Path) -> None:
    """A host whose name begins with this one's ("node" and "node-2") had its running generation deleted
    (review); a check during another run's swap waits for it instead of refusing the half-swapped folder."""
    import time

    root = _set(tmp_path / "s", 4, 0)
    other = root / f".defectscope-partial-{socket.gethostname()}-2-{_dead_pid()}"
    other.mkdir()
    partial_folder(root)
    assert other.is_dir()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _run_folder(root, _set(tmp_path / "new", 6, 1), pid=sleeper.pid)
        seen: list[bool] = []
        with exclusive(root / LOCK):  # the live run's swap under way
            _half_moved(root, live)
            check = threading.Thread(target=lambda: seen.append(check_replaceable(root)), daemon=True)
            check.start()
            time.sleep(1.0)
            assert check.is_alive()  # waits, where it refused "not a finished synth output"
            for entry in sorted(live.iterdir(), key=lambda e: e.name == SYNTH_MARKER):
                if entry.name != MOVING:
                    (root / entry.name).rmdir() if (root / entry.name).is_dir() else None
                    entry.rename(root / entry.name)
            (live / MOVING).unlink()
            live.rmdir()
        check.join(30)
        assert seen == [True]
    finally:
        sleeper.kill()


@pytest.mark.slow
def test_runs_into_one_folder_move_their_sets_in_one_at_a_time(tmp_path: Path) -> None:
    """A second `synth` into a folder waits for the renames of another's set to end (their lock), so the folder
    never mixes two sets and neither run is refused; the lock file stays, hidden and empty."""
    import time

    root = synth.generate(tmp_path / "s", n=4, seed=0, size_range=(16, 24))
    before = _files(root)
    args = [sys.executable, "-m", "defectscope", "synth", str(root), "--n", "6", "--seed", "1", "--min-size", "16",
            "--max-size", "24"]  # fmt: skip
    with exclusive(root / LOCK):  # another run's renames under way
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(root.glob(f".defectscope-partial-*/{SYNTH_MARKER}")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        visible = {k: v for k, v in _files(root).items() if not k.startswith(".defectscope-partial-")}
        assert proc.poll() is None and visible == before  # it waits with its finished set; root untouched
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(list(root.rglob("*.png"))) == 6 and json.loads((root / SYNTH_MARKER).read_text())["seed"] == 1
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted([LOCK, SYNTH_MARKER])
