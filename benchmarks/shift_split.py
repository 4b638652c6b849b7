"""Where do a model's shift-consistency misses come from? (issue 17, docs/benchmarks.md)

    PYTHONPATH=benchmarks python benchmarks/shift_split.py --workdir outputs/ph/base \\
        --regions left,centre --shifts 4,8,16,32 --out outputs/ph/base/shift_split.json

On a position-holdout work folder (model.onnx and test-<region>/<class>/*.png): the protocol's figures
per test region and largest offset, split by true class (good against defect), and the share of images
whose top-1 changed only between defect classes while the OK/NG verdict held. A region whose defects
sit in the middle keeps them in the frame under a shift; one at the border does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.runtime.decision import is_ng
from defectscope.shift_consistency import ShiftProtocol, ShiftRecord, summarise
from position_holdout import ShiftRun, onnx_shift_records


def split_figures(run: ShiftRun) -> dict[str, Any]:
    """The protocol's figures over all images, over good ones and over defects (true class = folder),
    plus: ``ng_to_ok``, the share of images judged NG as they are and OK in some copy (escapes a shift
    makes); ``type_change_only``, the share whose top-1 moved only among NG classes, the verdict held."""
    record, threshold = run.record, run.threshold
    truth = np.array([path.parent.name for path in run.paths])
    out: dict[str, Any] = {"all": summarise(record, threshold), "n": len(truth)}
    for name, mask in (("good", truth == run.good_class), ("defect", truth != run.good_class)):
        part = ShiftRecord(*(getattr(record, f)[mask] for f in ShiftRecord.__dataclass_fields__))
        out[name] = summarise(part, threshold)
    ng, ng_copies = is_ng(record.p_defect, threshold), is_ng(record.p_defect_copies, threshold)
    flipped = (ng_copies != ng[:, None]).any(axis=1)
    out["ng_to_ok"] = float((ng & ~ng_copies.all(axis=1)).mean()) if len(truth) else 0.0
    ng_class = np.isin(record.top1_copies, run.ng_indices) & np.isin(record.top1, run.ng_indices)[:, None]
    changed = record.top1_copies != record.top1[:, None]
    among_ng = (changed.any(axis=1) & ~(changed & ~ng_class).any(axis=1)) & ~flipped
    out["type_change_only"] = float(among_ng.mean()) if len(truth) else 0.0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="a position_holdout.py work folder")
    p.add_argument("--regions", default="left,centre", help="test regions, comma-separated")
    p.add_argument("--shifts", default="4,8,16,32", help="largest offsets (px), comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="result JSON (default WORKDIR/shift_split.json)")
    args = p.parse_args()
    result: dict[str, Any] = {}
    for region in args.regions.split(","):
        images = sorted((args.workdir / f"test-{region}").rglob("*.png"))
        if not images:
            raise SystemExit(f"{args.workdir / f'test-{region}'}: no .png test images")
        shifts = [int(s) for s in args.shifts.split(",")]
        protocols = [ShiftProtocol(max_shift=shift) for shift in shifts]
        runs = onnx_shift_records(args.workdir / "model.onnx", images, args.threads, protocols)
        for shift, run in zip(shifts, runs, strict=True):
            figures = split_figures(run)
            result[f"{region}@{shift}"] = figures
            top1 = {
                k: round(figures[k].get("top1_consistency", float("nan")), 4)
                for k in ("all", "good", "defect")
            }
            print(region, shift, top1, f"flips {figures['all']['verdict_flip_rate']:.4f}",
                  f"NG->OK {figures['ng_to_ok']:.4f}", f"type only {figures['type_change_only']:.4f}", flush=True)  # fmt: skip
    out = args.out or args.workdir / "shift_split.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
