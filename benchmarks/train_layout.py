"""Training step speed per memory layout: `memory_format=contiguous` against `channels_last`.

One training step (forward, cross-entropy, backward, AdamW) of a model preset on a random batch, timed
with the shared loop (:func:`bench_common.measure`) in each layout, alternating the layouts so a change
in machine load hits both. Other processes' CPU use over each row is recorded (``foreign_cores``):
figures taken beside a training run are not speed figures.

    python benchmarks/train_layout.py --out docs/bench/train_layout.json
    python benchmarks/train_layout.py --case efficientnet_lite0:300:1 --seconds 5 --out /tmp/l.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inspect"))

from bench_common import ForeignLoad, machine_info, measure, preset_config

#: preset:side:channels — the ELPV recipe's networks at 300 px, the default network, AlexNet/LeNet-style stacks
CASES = (
    "efficientnet_lite0:300:1",
    "efficientnet_lite1:300:1",
    "efficientnet_lite2:300:1",
    "resnet_small:128:1",
    "resnet_small:256:3",
    "nf_resnet:128:1",
    "alexnet:224:1",
    "tiny:128:1",
    "lenet:64:1",
)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_timer(case: str, layout: str, batch: int, seed: int) -> Any:
    """A closure running one training step of the case's network in ``layout``."""
    from defectscope.models import model_from_config

    preset, side, channels = case.split(":")
    torch.manual_seed(seed)
    model = model_from_config(preset_config(preset), num_classes=4, in_chans=int(channels))
    model.to(memory_format=LAYOUTS[layout])  # type: ignore[call-overload]
    model.train()
    x = torch.randn(batch, int(channels), int(side), int(side))
    y = torch.randint(0, 4, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def run_case(case: str, batch: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Both layouts, ``rounds`` times each, alternating; the best round of each is its figure."""
    steps = {layout: step_timer(case, layout, batch, seed=0) for layout in LAYOUTS}
    rates: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    load = ForeignLoad()
    for _ in range(rounds):
        for layout, step in steps.items():
            rates[layout].append(measure(step, batch, seconds, warmup_seconds=1.0)["images_per_s"])
    best = {layout: max(values) for layout, values in rates.items()}
    return {
        "case": case,
        "batch": batch,
        "images_per_s": best,
        "rounds": rates,
        "channels_last_speedup": round(best["channels_last"] / best["contiguous"], 3),
        "foreign_cores": load.cores(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="preset:side:channels (repeatable); default: all")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per layout and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.case or CASES:
        row = run_case(case, args.batch, args.seconds, args.rounds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"machine": machine_info(args.threads), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
