"""`defectscope demo`: the whole product on the built-in synthetic dataset, as a user would run it.

Each step is the real CLI in a subprocess (synth -> train -> export -> inspect), so the demo proves
the commands a quality engineer types, not an in-process shortcut.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .runtime.options import CommandParser, whole_at_least
from .runtime.outputs import OutputError, check_output_folder
from .runtime.results import iter_rows
from .synth_output import check_replaceable


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="defectscope demo", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo"), help="where data, run, model and report go")
    p.add_argument(
        "--holdout", type=whole_at_least(1), default=120, help="held-out synthetic images to inspect"
    )
    p.add_argument("--experiment", default="demo", help="training experiment config (conf/experiment/)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training step")
    return p


def _fail(message: str) -> NoReturn:
    """The demo's one-line error, exit 2 (a step's own error is printed by the step above it)."""
    print(f"defectscope demo: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _run(step: str, cmd: list[str]) -> None:
    print(f"\n== {step}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        if rc == 2:  # the step's own one-line error is above: nothing to add
            raise SystemExit(2)
        _fail(f"step '{step}' failed with exit code {rc}")
    print(f"== {step}: done in {time.perf_counter() - t0:.1f} s", flush=True)


def score_holdout(results: Path, good_class: str = "good") -> dict[str, float | int]:
    """Compare the inspect rows with the held-out set's truth (its class folders).

    The demo must show how good the model it just trained is, not only that the commands ran:
    label accuracy, the OK/NG decision's accuracy, escapes (defects passed as OK) and false rejects.
    """
    n = ok_rows = label_hits = verdict_hits = escapes = false_rejects = defects = goods = 0
    for row in iter_rows(results):
        n += 1
        if row["status"] != "ok":
            continue
        ok_rows += 1
        truth = Path(row["path"]).parent.name
        is_defect = truth != good_class
        defects += is_defect
        goods += not is_defect
        label_hits += row["top_class"] == truth
        called_ng = row["verdict"] == "NG"
        verdict_hits += called_ng == is_defect
        escapes += is_defect and not called_ng
        false_rejects += (not is_defect) and called_ng
    return {
        "images": n,
        "inspected": ok_rows,
        "label_accuracy": label_hits / max(ok_rows, 1),
        "verdict_accuracy": verdict_hits / max(ok_rows, 1),
        "escape_rate": escapes / max(defects, 1),
        "false_reject_rate": false_rejects / max(goods, 1),
    }


def composed_source(train_cmd: list[str]) -> dict[str, Any]:
    """``data.source`` of the training config, composed (not run) before anything is trained.

    The demo draws its held-out images with the generator, so the data must be synthetic; a wrong
    ``--experiment`` or ``data=`` override stops here, not after a long training run.
    """
    import yaml  # PyYAML comes with hydra-core (the train extra)

    proc = subprocess.run([*train_cmd, "--cfg", "job", "--resolve"], capture_output=True, text=True)
    if proc.returncode != 0:  # train's own one-line error says what is wrong
        said = [
            line for line in proc.stderr.splitlines() if "error:" in line
        ] or proc.stderr.strip().splitlines()[-1:]
        _fail(f"the training config does not compose: {said[-1] if said else f'exit code {proc.returncode}'}")
    source = ((yaml.safe_load(proc.stdout) or {}).get("data") or {}).get("source") or {}
    if source.get("kind") != "synthetic":
        _fail(
            f"data.source.kind must be 'synthetic' (the held-out images are generated), "
            f"got {source.get('kind')!r}; use --experiment demo, smoke or synthetic"
        )
    return dict(source)


def holdout_options(source: dict[str, Any]) -> list[str]:
    """synth options that match the training data (sizes, channels, classes).

    Held-out images drawn from another size range or channel count would test a distribution shift,
    not the model the demo just trained.
    """
    return [
        "--min-size",
        str(source["min_size"]),
        "--max-size",
        str(source["max_size"]),
        "--channels",
        str(source["channels"]),
        "--classes",
        ",".join(source["classes"]),
    ]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:  # before any step: each would otherwise fail on it in turn, or resolve() on a loop of links
        check_output_folder(args.workdir, "--workdir")
    except OutputError as exc:
        _fail(str(exc))
    work = args.workdir.resolve()
    exe = [sys.executable, "-m", "defectscope"]
    run_dir = work / "train"
    holdout = work / "holdout"
    model = work / "model.onnx"
    results = work / "results.jsonl"
    report = work / "report.html"

    train_cmd = [
        *exe,
        "train",
        f"experiment={args.experiment}",
        f"paths.data_dir={work / 'data'}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    source = composed_source(train_cmd)
    try:  # the held-out images are drawn after training: a folder synth would refuse stops the demo here
        check_replaceable(holdout)
    except ValueError as exc:
        _fail(f"synth: {exc} (a demo folder from an older version: use a new --workdir)")
    _run("train", train_cmd)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        _fail(f"training finished but {ckpt} is missing")
    _run("export", [*exe, "export", str(ckpt), "-o", str(model)])
    _run(
        "held-out data",
        [
            *exe,
            "synth",
            str(holdout),
            "--n",
            str(args.holdout),
            "--seed",
            "20261125",
            *holdout_options(source),
        ],
    )
    _run(
        "inspect",
        [
            *exe,
            "inspect",
            str(model),
            str(holdout),
            "--recursive",
            "-o",
            str(results),
            "--report",
            str(report),
        ],
    )
    score = score_holdout(results, good_class=str(source.get("good_class", "good")))
    print(
        f"\nHeld-out check ({score['inspected']}/{score['images']} images inspected, truth = class folders):"
        f"\n  label accuracy     {score['label_accuracy']:.1%}"
        f"\n  OK/NG accuracy     {score['verdict_accuracy']:.1%}"
        f"\n  escape rate        {score['escape_rate']:.1%}  (defects passed as OK)"
        f"\n  false-reject rate  {score['false_reject_rate']:.1%}  (good parts called NG)"
    )
    print(f"\nModel:   {model}\nResults: {results}\nReport:  {report}")
    return 0
