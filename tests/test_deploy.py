"""deploy/: the systemd unit's command line must be one the real watch parser accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from defectscope.runtime.watch import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "defectscope-watch.service"
ENV_EXAMPLE = DEPLOY / "watch.env.example"


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file (repeated keys allowed, '#'/';' comments, '\\' continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad EnvironmentFile line: {line}"
        env[key] = shlex.split(value)[0] if value.strip() else ""
    return env


def expand_exec(line: str, env: dict[str, str]) -> list[str]:
    """systemd rules: ${VAR} is one argument, a lone $VAR splits on whitespace (empty -> nothing)."""
    argv: list[str] = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env[m.group(1)].split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda g: env[g.group(1)], word))
    return argv


def test_unit_file_settings() -> None:
    s = unit_settings(UNIT.read_text())
    svc = s["Service"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["KillSignal"] == ["SIGTERM"]
    assert int(svc["TimeoutStopSec"][0]) >= 10
    assert svc["User"][0] not in {"root", "0"}
    assert svc["EnvironmentFile"] == ["/etc/defectscope/watch.env"]
    assert svc["RestartPreventExitStatus"] == ["2"]  # watch's "bad configuration" code
    assert s["Install"]["WantedBy"] == ["multi-user.target"]


def test_execstart_is_a_valid_watch_command_line() -> None:
    svc = unit_settings(UNIT.read_text())["Service"]
    (exec_start,) = svc["ExecStart"]
    env = env_file(ENV_EXAMPLE.read_text())
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", exec_start))
    assert used == set(env), "every variable used must be documented, every documented one used"
    argv = expand_exec(exec_start, env)
    assert Path(argv[0]).name == "defectscope" and argv[1] == "watch"
    args = build_parser().parse_args(argv[2:])  # the real parser: exits (fails the test) on bad options
    assert args.model.endswith(".onnx") and args.hot != args.out
    assert args.provider == "auto" and args.batch_size >= 1 and args.interval > 0 and args.stable_polls >= 1
    # optional extra args are split on whitespace as systemd does
    extra = expand_exec(exec_start, {**env, "DEFECTSCOPE_EXTRA_ARGS": "--threshold 0.4 --heatmaps /srv/hm"})
    parsed = build_parser().parse_args(extra[2:])
    assert parsed.threshold == 0.4 and parsed.heatmaps == "/srv/hm"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # point ExecStart at this venv's real console script so the executable check can pass
    real = Path(sys.executable).parent / "defectscope"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/defectscope/venv/bin/defectscope", str(real)))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if UNIT.name in ln or "ignoring" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_readme_covers_the_line_pc_topics() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "whl[gpu]",
        "onnxruntime-gpu[cuda,cudnn]",
        "--provider",
        "TensorRT",
        "--trt-cache",
        "NSSM",
        "Task Scheduler",
        "defectscope-watch.service",
        "watch.env",
    ):
        assert needle in text, needle


def test_every_result_field_is_documented_once() -> None:
    """The README's "Result rows" table names every field a row can have, inspect's and watch's."""
    from defectscope.runtime.results import ROW_KEYS

    text = (DEPLOY / "README.md").read_text()
    table = text.split("### Result rows", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for line in table.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])
    }
    watch_fields = {
        "moved_to",
        "source_size",
        "source_mtime_ns",
        "source_ctime_ns",
        "source_inode",
        "source_sha256",
        "time",
    }
    assert documented == set(ROW_KEYS) | watch_fields
    assert text.count("### Result rows") == 1
