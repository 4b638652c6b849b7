"""A uniform weight soup of fine-tuned checkpoints: one served model from several runs, at one model's speed.

    python benchmarks/weight_soup.py soup.ckpt a/best.ckpt b/best.ckpt [--bn-images 800] [--threads 2]
    defectscope export soup.ckpt -o soup.onnx && python benchmarks/elpv.py soup.onnx --out soup.json

Averages the networks' weights tensor by tensor (Wortsman et al. 2022, "model soups") and writes a
checkpoint that ``defectscope export`` reads like any other: the first member's ``defectscope`` entry
(classes, loader, validation images, so export re-derives the threshold on the soup's own graph) with
no MLflow run (the soup is not any member's run). The members must be the same network with the same
classes and validation images. BatchNorm statistics of averaged weights are not the average of the
members' statistics, so ``--bn-images N`` re-estimates them on N training images (the checkpoint's data
config, read as ``defectscope evaluate`` reads it; the runtime loader and normalisation; a cumulative
average in train mode, no gradient). It measures the ``distillation from a seed ensemble`` lever without
a training run: a soup is worth a command only if it beats its members.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inspect"))

from defectscope.checkpoint import INFO_KEY, STATE_PREFIX, build_model, read_info, run_data_config
from defectscope.runtime.image import load_image, normalize_batch
from defectscope.runtime.metadata import parse_loader

#: what the members must share for their average to be one model of the same task
SHARED = ("model_name", "model_kwargs", "class_names", "good_class", "loader", "mean", "std", "val_paths")


def averaged_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The members' mean of every floating-point tensor (in float64, then their dtype); counters from the first."""
    soup = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            soup[key] = torch.stack([s[key].double() for s in states]).mean(dim=0).to(first.dtype)
        else:
            soup[key] = first.clone()
    return soup


def training_paths(ckpt: dict[str, Any], info: dict[str, Any], source: str) -> list[str]:
    """The training split's images, from the data config the checkpoint records."""
    from defectscope.data.datamodule import DefectDataModule
    from defectscope.data.rebuild import datamodule_kwargs

    kwargs = datamodule_kwargs(run_data_config(ckpt, source), source, from_file=True)
    kwargs.update(loader=info["loader"], mean=info["mean"], std=info["std"])
    dm = DefectDataModule(**kwargs)
    dm.setup("fit")
    return list(dm.dataset("train").paths)


def reestimate_bn(soup: dict[str, torch.Tensor], info: dict[str, Any], paths: list[str], source: str) -> None:
    """Replace the soup's BatchNorm running statistics by their cumulative average over ``paths``."""
    model = build_model(info, source)
    model.load_state_dict({k[len(STATE_PREFIX) :]: v for k, v in soup.items() if k.startswith(STATE_PREFIX)})
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch
    loader = parse_loader(info["loader"])
    model.train()
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            images = [load_image(p, loader) for p in paths[start : start + 16]]
            model(torch.from_numpy(normalize_batch(images, info["mean"], info["std"])))
    for key, value in model.state_dict().items():
        soup[STATE_PREFIX + key] = value.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the soup checkpoint to write")
    ap.add_argument(
        "members", nargs="+", help="checkpoints of the same network, classes and validation images"
    )
    ap.add_argument(
        "--bn-images", type=int, default=0, help="re-estimate BatchNorm on this many training images"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="which training images --bn-images draws")
    args = ap.parse_args()
    if len(args.members) < 2:
        raise SystemExit("a soup needs at least two member checkpoints")
    torch.set_num_threads(args.threads)
    read = [read_info(path) for path in args.members]
    (first, info), others = read[0], read[1:]
    for path, (_, other) in zip(args.members[1:], others):
        differ = [key for key in SHARED if other.get(key) != info.get(key)]
        if differ:
            raise SystemExit(
                f"{path}: differs from {args.members[0]} in {', '.join(differ)}; cannot be averaged"
            )
    soup = averaged_state([ckpt["state_dict"] for ckpt, _ in read])
    if args.bn_images > 0:
        paths = training_paths(first, info, args.members[0])
        random.Random(args.seed).shuffle(paths)
        reestimate_bn(soup, info, paths[: args.bn_images], args.members[0])
        print(f"BatchNorm statistics re-estimated on {min(args.bn_images, len(paths))} training images")
    entry = {**info, "mlflow_run_id": None, "mlflow_tracking_uri": None}
    torch.save({**first, "state_dict": soup, INFO_KEY: entry}, args.out)
    print(f"wrote {args.out}: the mean of {len(args.members)} checkpoints")


if __name__ == "__main__":
    main()
