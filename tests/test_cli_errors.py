"""Usage mistakes of a line PC: one clear line, exit 2, no traceback, no stray file, rows intact.

Every case runs the real command in a subprocess (what a user sees on stderr) against a real ONNX
model and real images.  Cases that can be checked before the first image must leave the results
file exactly as it was: a ``--resume`` run over earlier rows is the witness.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_models import build_model, make_image

DEFECTSCOPE = [sys.executable, "-m", "defectscope"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(12):
        make_image(d / f"img_{i:02d}.png", 64, 64 + 8 * (i % 3), bright=i % 3 == 0, seed=i)
    return d


def defectscope(*args: object, cwd: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; ``limit_bytes`` caps every file it writes (a disk filling up)."""

    def cap() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [*DEFECTSCOPE, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap if limit_bytes is not None else None,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> str:
    """Exit ``code``, exactly one line on stderr naming ``words``, and no traceback."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def files_under(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def run_dir(model: Path, images: Path, tmp_path: Path) -> Path:
    """A working folder holding earlier results (``r.jsonl``), a folder and a plain file."""
    proc = defectscope("inspect", model, images, "-o", "r.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


BEFORE_WORK = {
    "report is a folder": (["--report", "a_folder"], ["--report a_folder", "is a folder"]),
    "csv in a folder that is a file": (["--csv", "a_file/r.csv"], ["--csv a_file/r.csv", "is a file"]),
    "csv under /sys": (["--csv", "/sys/r.csv"], ["--csv /sys/r.csv", "kernel file system"]),
    "heatmaps is a file": (["--heatmaps", "a_file"], ["--heatmaps a_file", "is a file, not a folder"]),
    "-o under /proc": (["-o", "/proc/r.jsonl"], ["-o /proc/r.jsonl", "under /proc"]),
    "-o under /sys": (["-o", "/sys/r.jsonl"], ["-o /sys/r.jsonl", "under /sys"]),
    "-o a device": (["-o", "/dev/full"], ["-o /dev/full", "not a regular file"]),
    "-o a folder": (["-o", "a_folder"], ["-o a_folder", "is a folder"]),
    "-o same as --csv": (["--csv", "r.jsonl"], ["-o and --csv", "same file"]),
    # names the file system refuses to look up: OSError tracebacks from is_dir() before
    "-o name too long": (["-o", "a" * 300 + ".jsonl"], ["-o aaa", "cannot be used (File name too long:"]),
    "--report name too long": (["--report", "r" * 300], ["--report rrr", "(File name too long:"]),
    "--heatmaps name too long": (["--heatmaps", "h" * 300], ["--heatmaps hhh", "(File name too long:"]),
}


@pytest.mark.parametrize("case", list(BEFORE_WORK))
def test_output_mistakes_stop_before_any_work(model: Path, images: Path, run_dir: Path, case: str) -> None:
    args, words = BEFORE_WORK[case]
    before = files_under(run_dir)
    output = [] if "-o" in args else ["-o", "r.jsonl"]
    proc = defectscope("inspect", model, images, *output, "--resume", *args, cwd=run_dir)
    one_line_error(proc, *words)
    assert files_under(run_dir) == before  # rows intact, no .tmp, no probe, no half-made folder
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_report_to_a_full_device_is_written_directly_and_fails_cleanly(
    model: Path, images: Path, run_dir: Path
) -> None:
    """A special file is never replaced through temp + rename (as root that would swap /dev/full
    for a regular file); writing into it fails with one line after the rows are safe."""
    proc = defectscope("inspect", model, images, "-o", "new.jsonl", "--report", "/dev/full", cwd=run_dir)
    one_line_error(proc, "--report /dev/full", "No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert (run_dir / "new.jsonl").read_text().count("\n") == 12
    assert not list(run_dir.glob("*.tmp")) and not list(Path("/dev").glob("full.tmp"))


def test_disk_full_mid_run_keeps_every_row_and_resume_finishes(
    model: Path, images: Path, tmp_path: Path
) -> None:
    full = defectscope("inspect", model, images, "-o", "full.jsonl", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    limit = sum(len(line) + 1 for line in (tmp_path / "full.jsonl").read_text().splitlines()[:6])
    proc = defectscope(
        "inspect",
        model,
        images,
        "-o",
        "r.jsonl",
        "--batch-size",
        4,
        "--workers",
        0,
        cwd=tmp_path,
        limit_bytes=limit,
    )
    one_line_error(proc, "cannot write results to r.jsonl", "File too large", "--resume")
    text = (tmp_path / "r.jsonl").read_text()
    assert text.endswith("\n") and 0 < text.count("\n") < 12  # complete rows only, the torn batch cut off
    kept = text.splitlines()
    done = defectscope("inspect", model, images, "-o", "r.jsonl", "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "r.jsonl").read_text().splitlines()
    assert rows[: len(kept)] == kept and len(rows) == 12
    assert len({r.split('"path":')[1].split(",")[0] for r in rows}) == 12  # each image exactly once


def test_input_mistakes(model: Path, images: Path, tmp_path: Path) -> None:
    proc = defectscope("inspect", model, tmp_path / "imgz", "-o", "r.jsonl", cwd=tmp_path)
    one_line_error(proc, "input not found", "imgz")
    classes = tmp_path / "classes"
    for name in ("good", "crack"):
        (classes / name).mkdir(parents=True)
        make_image(classes / name / "a.png", 64, 64, bright=name == "crack")
    proc = defectscope("inspect", model, classes, "-o", "r.jsonl", cwd=tmp_path)
    one_line_error(proc, "crack/, good/", "add --recursive")
    assert not (tmp_path / "r.jsonl").exists()
    assert (
        defectscope("inspect", model, classes, "-o", "r.jsonl", "--recursive", cwd=tmp_path).returncode == 0
    )
    # the model argument comes first: a missing model is named before the inputs' and outputs' mistakes
    for command in (
        ["inspect", "nope.onnx", classes, "-o", "r.jsonl"],
        ["watch", "nope.onnx", "--in", classes],
        ["watch", "nope.onnx", "--in", tmp_path / "nonexistent"],  # --in was named first
    ):
        proc = defectscope(*command, "--out" if command[0] == "watch" else "--csv", "/proc/x", cwd=tmp_path)
        one_line_error(proc, "nope.onnx: model file not found")
    proc = defectscope("inspect", classes, classes, "-o", "r.jsonl", "--recursive", cwd=tmp_path)
    one_line_error(proc, f"{classes} is a folder; expected the exported model file (.onnx)")
    long_name = "m" * 300 + ".onnx"  # a name the file system will not look up: a traceback from is_dir()
    for command in (["inspect", long_name, classes, "-o", "r.jsonl"], ["evaluate", long_name, classes]):
        one_line_error(defectscope(*command, cwd=tmp_path), "model file cannot be read (File name too long:")
    one_line_error(defectscope("evaluate", model, "d" * 300, cwd=tmp_path), "ddd: cannot be read (File name")
    proc = defectscope("watch", model, "--in", classes, "--out", "o" * 300, cwd=tmp_path)
    one_line_error(proc, "--out ooo", "cannot be used (File name too long:")
    one_line_error(defectscope("synth", "s" * 300, cwd=tmp_path), "cannot be used (File name too long:")
    # a loop of links: "not found", a RuntimeError traceback from resolve(), or replaced by a file before
    (tmp_path / "loop_a").symlink_to("loop_b")
    (tmp_path / "loop_b").symlink_to("loop_a")
    loop = "cannot be used (Too many levels of symbolic links)"
    for command, words in (
        (
            ["inspect", "loop_a", classes, "-o", "r.jsonl"],
            ["loop_a: model file cannot be read (Too many levels"],
        ),
        (
            ["inspect", model, classes, "--recursive", "-o", "r.jsonl", "--csv", "loop_a"],
            ["--csv loop_a", loop],
        ),
        (["watch", model, "--in", classes, "--out", "loop_a"], ["--out loop_a", loop]),
        (["demo", "--workdir", "loop_a"], ["--workdir loop_a", loop]),
        (
            ["export", "loop_a", "-o", "m.onnx"],
            ["loop_a: cannot be read (Too many levels of symbolic links)"],
        ),
    ):
        one_line_error(defectscope(*command, cwd=tmp_path), *words)
    assert (tmp_path / "loop_a").is_symlink() and (tmp_path / "loop_b").is_symlink()
    os.mkfifo(tmp_path / "pipe")  # opening it as the model would wait for a writer
    one_line_error(
        defectscope("inspect", "pipe", classes, "-o", "r.jsonl", cwd=tmp_path), "pipe: is not a regular"
    )
    one_line_error(
        defectscope("evaluate", model, "pipe", cwd=tmp_path), "pipe: is not a folder or a CSV file"
    )
    # a line break in a file name is shown as \n: the error stays one line
    proc = defectscope("inspect", "nl\nmodel.onnx", classes, "-o", "r.jsonl", cwd=tmp_path)
    one_line_error(proc, "nl\\nmodel.onnx: model file not found")
    proc = defectscope("export", "nl\nbest.ckpt", "-o", "m.onnx", cwd=tmp_path)
    one_line_error(proc, "nl\\nbest.ckpt: checkpoint file does not exist")


@pytest.mark.parametrize(
    "command",
    [["inspect", "m.onnx", "x", "-o", "r.jsonl"], ["watch", "m.onnx", "--in", "h", "--out", "o"],
     ["evaluate", "m.onnx", "x"], ["export", "c.ckpt", "-o", "m.onnx"], ["synth", "out"], ["scan"], ["demo"]],
)  # fmt: skip
def test_command_line_mistakes_are_one_line(command: list[str], tmp_path: Path) -> None:
    """argparse printed its whole usage block above the error; now one line and where the usage is."""
    prog = f"defectscope {command[0]}" + (" MODEL.onnx" if command[0] == "evaluate" else "")
    for wrong, words in (
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["--threshold", "abc"], ["argument --threshold: expected a number in [0, 1], got 'abc'"]),
    ):
        if "--threshold" in wrong and command[0] not in ("inspect", "watch", "evaluate", "export"):
            continue
        proc = defectscope(*command, *wrong, cwd=tmp_path)
        one_line_error(proc, f"{prog}: error: ", *words, f"(see {prog} --help)")
    assert not any(tmp_path.iterdir())


def open_first(argv: list[str]) -> int:
    """A command that opens its first argument: what any command does with a file no check looked at."""
    with open(argv[0], "rb"):
        return 0


def close_first(argv: list[str]) -> int:
    """A command that closes the descriptor it is given: an OS error that names no file."""
    os.close(int(argv[0]))
    return 0


def test_an_os_error_no_check_foresaw_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    """The console script's last net: an OSError that names a file is the file and the reason on one line."""
    from defectscope import cli

    monkeypatch.setitem(cli.COMMANDS, "open", (f"{__name__}:open_first", "open a file"))
    assert cli.main(["open", str(tmp_path / "nope.bin")]) == 1
    assert cli.main(["open", "n" * 300]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"defectscope open: error: {tmp_path / 'nope.bin'}: No such file or directory",
        f"defectscope open: error: {'n' * 300}: File name too long: at most 255 bytes per file or folder name on "
        "most file systems",
    ]
    monkeypatch.setitem(cli.COMMANDS, "close", (f"{__name__}:close_first", "close a descriptor"))
    with pytest.raises(OSError, match="Bad file descriptor"):  # naming no file: a bug to see whole, not hide
        cli.main(["close", "-1"])


def test_wrong_model_files_say_what_they_are(model: Path, images: Path, tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "best.ckpt"
    torch.save({"defectscope": {"format_version": 1}, "state_dict": {}}, ckpt)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model.read_bytes()[:3000])
    png = sorted(images.glob("*.png"))[0]
    cases = {
        ckpt: ["training checkpoint", f"defectscope export {ckpt}"],
        png: ["is a PNG image, not a model", "defectscope inspect MODEL.onnx"],
        cut: ["is damaged", "copy it again"],
    }
    raw = Path(os.fsdecode(os.fsencode(tmp_path) + b"/m\xff.onnx"))  # ORT's error was a binding's
    raw.write_bytes(model.read_bytes())
    cases[raw] = ["m\\xff.onnx: the model's path is not UTF-8 text", "rename the file"]
    for path, words in cases.items():
        one_line_error(defectscope("inspect", path, images, "-o", "r.jsonl", cwd=tmp_path), *words)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_export_given_an_onnx_model(model: Path, tmp_path: Path) -> None:
    proc = defectscope("export", model, "-o", "x.onnx", cwd=tmp_path)
    one_line_error(proc, "is an exported model (ONNX), not a training checkpoint", "defectscope inspect")
    assert not (tmp_path / "x.onnx").exists()
    # the same file as evaluate's ckpt_path: the checkpoint reader says so too (was "model file not found")
    proc = defectscope("evaluate", f"ckpt_path={model}", cwd=tmp_path)
    one_line_error(proc, "is an exported model (ONNX), not a training checkpoint", "defectscope inspect")


@pytest.mark.slow
def test_evaluate_without_ckpt_path(tmp_path: Path) -> None:
    one_line_error(defectscope("evaluate", cwd=tmp_path), "ckpt_path", "defectscope evaluate ckpt_path=")
    assert not list(tmp_path.rglob("*.json"))  # no metrics file: nothing was evaluated


@pytest.mark.parametrize("value", ["2", "abc"])
def test_evaluate_threshold_names_its_own_key(tmp_path: Path, value: str) -> None:
    """threshold= is checked before the checkpoint is read (it was named threshold.default after reading it)."""
    proc = defectscope(
        "evaluate", f"ckpt_path={tmp_path / 'absent.ckpt'}", f"threshold={value}", cwd=tmp_path
    )
    one_line_error(proc, "threshold must be a number in [0, 1], or null for the checkpoint's own")
    assert "absent.ckpt" not in proc.stderr and "threshold.default" not in proc.stderr


def test_watch_out_is_a_file(model: Path, images: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    proc = defectscope("watch", model, "--in", images, "--out", "out", cwd=tmp_path)
    one_line_error(proc, "--out out", "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "a file"
    assert sorted(p.name for p in images.iterdir()) == [f"img_{i:02d}.png" for i in range(12)]


def test_systemd_unit_does_not_restart_a_configuration_error() -> None:
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "defectscope-watch.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Restart"] == "on-failure"
    assert "2" in settings["RestartPreventExitStatus"].split()


def test_watch_refuses_results_of_another_threshold(model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    made = defectscope(
        "inspect", model, images, "-o", out / "results.jsonl", "--threshold", 0.25, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    before = (out / "results.jsonl").read_bytes()
    hot = tmp_path / "hot"
    hot.mkdir()
    make_image(hot / "a.png", 64, 64, bright=False)
    proc = defectscope("watch", model, "--in", hot, "--out", out, cwd=tmp_path)
    one_line_error(proc, "threshold 0.25 (--threshold)", "uses 0.5 (model)", "--threshold 0.25")
    assert (out / "results.jsonl").read_bytes() == before and (hot / "a.png").exists()


def test_names_that_are_not_utf8_print_on_a_strict_console(model: Path, images: Path, tmp_path: Path) -> None:
    """With a strict UTF-8 stdout (PYTHONIOENCODING=utf-8), the run's last line, ``wrote <-o>``, raised
    after all the work was done: exit 1 and a traceback."""
    out = os.fsdecode(os.fsencode(tmp_path) + b"/r\xff.jsonl")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [*DEFECTSCOPE, "inspect", str(model), str(images), "-o", out],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert b"r\\udcff.jsonl" in proc.stdout  # the name, escaped
    assert len(Path(out).read_text(encoding="utf-8").splitlines()) == 12


@pytest.mark.parametrize("command", [["--help"], ["inspect", "MODEL", "IMAGES", "-o", "r.jsonl"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(
    command: list[str], model: Path, images: Path, tmp_path: Path
) -> None:
    """``defectscope ... | head`` ended in a BrokenPipeError traceback once the reader had gone."""
    args = [str(model) if a == "MODEL" else str(images) if a == "IMAGES" else a for a in command]
    proc = subprocess.Popen(
        [*DEFECTSCOPE, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err and "Broken pipe" not in err, err
    if command[0] == "inspect":  # the work itself was done
        assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"threshold": "0.5x"}, ["r.jsonl:2: 'threshold' must be a number or null, got '0.5x'"]),
        ({"defect_prob": "high"}, ["r.jsonl:2: 'defect_prob' must be a number or null, got 'high'"]),
        ({"top_prob": None}, ["r.jsonl:2: 'top_prob' must be a number in a row with status 'ok'"]),
        ({"probs": [0.1, 0.9]}, ["r.jsonl:2: 'probs' must be an object of class probabilities or null"]),
        ({"path": 7}, ["r.jsonl:2: 'path' must be a string, got 7"]),
    ],
)
def test_resume_over_rows_of_the_wrong_types_is_one_line(
    model: Path, images: Path, tmp_path: Path, edit: dict[str, object], words: list[str]
) -> None:
    """A results file another tool wrote, or a hand edit, is refused naming the line and the field
    before any image is inspected (it was a traceback, once after the whole run)."""
    assert defectscope("inspect", model, images, "-o", "r.jsonl", cwd=tmp_path).returncode == 0
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    assert row["status"] == "ok"
    lines[1] = json.dumps({**row, **edit})
    (tmp_path / "r.jsonl").write_text("\n".join(lines[:6]) + "\n")
    before = (tmp_path / "r.jsonl").read_bytes()
    proc = defectscope(
        "inspect", model, images, "-o", "r.jsonl", "--resume", "--report", "r.html", cwd=tmp_path
    )
    one_line_error(proc, *words)
    assert (tmp_path / "r.jsonl").read_bytes() == before and not (tmp_path / "r.html").exists()
