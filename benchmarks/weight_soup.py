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

from defectscope.checkpoint import (
    INFO_KEY,
    STATE_PREFIX,
    CheckpointError,
    build_model,
    model_state,
    read_info,
    run_data_config,
)
from defectscope.runtime.image import ImageLoadError, load_image, normalize_batch
from defectscope.runtime.metadata import parse_loader

#: what the members must share for their average to be one model of the same task
SHARED = ("model_name", "model_kwargs", "class_names", "good_class", "ng_classes", "loader", "mean", "std",
          "val_paths")  # fmt: skip
#: how the soup's outputs become grades: the first member's rule, so every member must have it
GRADING_SHARED = ("link", "rule", "cuts")
#: what the written soup keeps of its first member (no optimizer, loop or callback state of that one run)
KEPT = ("hyper_parameters", "pytorch-lightning_version")


def member_problem(path: str, info: dict[str, Any], first: dict[str, Any]) -> str | None:
    """Why the member ``path`` cannot be averaged with the first one, or ``None``."""
    differ = [key for key in SHARED if info.get(key) != first.get(key)]
    grading, first_grading = info.get("grading") or {}, first.get("grading") or {}
    differ += [f"grading.{k}" for k in GRADING_SHARED if grading.get(k) != first_grading.get(k)]
    return (
        f"{path}: differs from the first member in {', '.join(differ)}; cannot be averaged"
        if differ
        else None
    )


def averaged_state(states: list[dict[str, torch.Tensor]], paths: list[str]) -> dict[str, torch.Tensor]:
    """The members' mean of every floating-point tensor (in float64, then their dtype); counters from the first."""
    for path, state in zip(paths[1:], states[1:]):
        if state.keys() != states[0].keys():
            raise SystemExit(f"{path}: its network's tensors are not the first member's; cannot be averaged")
        shapes = [k for k, v in state.items() if v.shape != states[0][k].shape]
        if shapes:
            raise SystemExit(
                f"{path}: {shapes[0]} has shape {tuple(state[shapes[0]].shape)}, not the first's"
            )
    soup = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            soup[key] = torch.stack([s[key].double() for s in states]).mean(dim=0).to(first.dtype)
        else:
            soup[key] = first.clone()
    return soup


def training_paths(ckpt: dict[str, Any], info: dict[str, Any], source: str) -> list[str]:
    """The training split's images, from the data config the checkpoint records (read as evaluate reads it)."""
    from defectscope.data.datamodule import DefectDataModule
    from defectscope.data.rebuild import datamodule_kwargs

    where = f"{source}: hyper_parameters.run_config.data"
    try:
        kwargs = datamodule_kwargs(run_data_config(ckpt, source), where, from_file=True)
        kwargs.update(loader=info["loader"], mean=info["mean"], std=info["std"])
        dm = DefectDataModule(**kwargs)
        dm.setup("fit")
        paths = list(dm.dataset("train").paths)
    except Exception as exc:  # the config's own errors, or its data not on this machine
        raise SystemExit(f"{where}: cannot list the training images: {str(exc).splitlines()[0]}") from None
    if not paths:
        raise SystemExit(f"{where}: its training split is empty; BatchNorm cannot be re-estimated")
    return paths


def reestimate_bn(soup: dict[str, torch.Tensor], info: dict[str, Any], paths: list[str], source: str) -> None:
    """Replace the soup's BatchNorm running statistics by their cumulative average over ``paths``."""
    model = build_model(info, source)
    model.load_state_dict(soup)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch
    loader = parse_loader(info["loader"])
    model.train()
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            try:
                images = [load_image(p, loader) for p in paths[start : start + 16]]
            except ImageLoadError as exc:
                raise SystemExit(str(exc)) from None  # names the file
            model(torch.from_numpy(normalize_batch(images, info["mean"], info["std"])))
    soup.update({key: value.clone() for key, value in model.state_dict().items()})


def read_members(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each member checkpoint and its checked entry, by the one checkpoint reader; one line on the first problem."""
    try:
        read = [read_info(path) for path in paths]
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    for path, (_, info) in zip(paths[1:], read[1:]):
        problem = member_problem(path, info, read[0][1])
        if problem:
            raise SystemExit(problem)
    return [ckpt for ckpt, _ in read], [info for _, info in read]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
    if args.bn_images < 0:
        raise SystemExit(f"--bn-images: expected a whole number >= 0, got {args.bn_images}")
    torch.set_num_threads(args.threads)
    ckpts, infos = read_members(args.members)
    try:
        states = [model_state(ckpt, path) for ckpt, path in zip(ckpts, args.members)]
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    soup = averaged_state(states, args.members)
    if args.bn_images > 0:
        paths = training_paths(ckpts[0], infos[0], args.members[0])
        random.Random(args.seed).shuffle(paths)
        reestimate_bn(soup, infos[0], paths[: args.bn_images], args.members[0])
        print(f"BatchNorm statistics re-estimated on {min(args.bn_images, len(paths))} training images")
    entry = {**infos[0], "mlflow_run_id": None, "mlflow_tracking_uri": None}
    kept = {key: ckpts[0][key] for key in KEPT if key in ckpts[0]}
    state = {STATE_PREFIX + key: value for key, value in soup.items()}
    torch.save({**kept, "state_dict": state, INFO_KEY: entry}, args.out)
    print(f"wrote {args.out}: the mean of {len(args.members)} checkpoints")


if __name__ == "__main__":
    main()
