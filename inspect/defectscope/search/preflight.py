"""Every check that can fail before the first trial: the space against the config and the model
registry, the data, and whether the time and latency budgets can fit even one trial."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SearchConfigError
from .measure import LatencySettings, export_untrained, input_size, measure_latency, native_size
from .space import Param, seed_values

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class DataFacts:
    """What the trials share about the data, read once by a real DataModule set-up."""

    class_names: list[str]
    good_class: str
    channels: int
    mean: list[float]
    std: list[float]
    native: tuple[int, int]  # (h, w) of the representative image, before the loader policy
    n_train: int


def model_kwargs(cfg: Any, values: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(builder name, kwargs) of ``cfg.model`` with ``values`` (``model.*`` parameters) applied."""
    from omegaconf import OmegaConf

    from defectscope.plain import to_plain

    node = OmegaConf.create(to_plain(cfg.model))
    for name, value in (values or {}).items():
        if name.startswith("model."):
            OmegaConf.update(node, name[len("model.") :], value, force_add=True)
    kwargs = dict(to_plain(node))
    builder = str(kwargs.pop("name"))
    if "weights" in kwargs:
        kwargs["weights"] = None  # checks and timings need the architecture only
    return builder, kwargs


def loader_config(cfg: Any, values: Mapping[str, Any] | None = None) -> Any:
    """The trial's :class:`LoaderConfig` (``data.loader.*`` parameters applied)."""
    from defectscope.data.settings import loader_config as checked_loader
    from defectscope.plain import to_plain

    loader = dict(to_plain(cfg.data.loader))
    for name, value in (values or {}).items():
        if name.startswith("data.loader."):
            loader[name[len("data.loader.") :]] = value
    return checked_loader(loader)


def build_model(cfg: Any, values: Mapping[str, Any], num_classes: int, *, check_size: bool = True) -> Any:
    from defectscope.models.registry import create_model

    builder, kwargs = model_kwargs(cfg, values)
    loader = loader_config(cfg, values)
    min_size = int(loader.min_size) if check_size else None
    return create_model(
        builder, num_classes=num_classes, in_chans=int(loader.channels), min_size=min_size, **kwargs
    )


def check_choices(cfg: Any, params: Sequence[Param], num_classes: int = 2) -> None:
    """Build the model (or the loader policy) with every choice and both ends of every range.

    Each value is tried on its own, the rest of the config as composed, so a value the model
    registry rejects (an unknown kwarg such as ``blur`` on models that lack it, an unknown norm or
    activation, a stem that leaves no feature map) stops the search before any trial.
    """
    for p in params:
        if p.model_kwarg is None and not p.name.startswith("data.loader."):
            continue
        for value in p.candidates():
            try:
                if p.model_kwarg is not None:
                    build_model(cfg, {p.name: value}, num_classes)
                else:
                    loader_config(cfg, {p.name: value})
            except Exception as exc:
                where = "the model registry" if p.model_kwarg is not None else "the loader policy"
                raise SearchConfigError(
                    f"{p.key}: {value!r} is rejected by {where}: {_first_line(exc)}"
                ) from None


def data_facts(cfg: Any, image_size: tuple[int, int] | None, needs_test: bool = False) -> DataFacts:
    """Set up the data once (the same DataModule as training): classes, normalisation, sizes."""
    from defectscope.training.train import build_datamodule, ready_datamodule

    dm = build_datamodule(cfg)
    ready_datamodule(dm, needs_test, cfg)
    paths = list(dm.val_paths) or [s.path for s in dm.samples["train"]]
    native = image_size or native_size(paths, int(dm.loader_config.channels))
    return DataFacts(
        class_names=list(dm.class_names),
        good_class=str(dm.good_class),
        channels=int(dm.loader_config.channels),
        mean=[float(m) for m in dm.mean],
        std=[float(s) for s in dm.std],
        native=(int(native[0]), int(native[1])),
        n_train=len(dm.samples["train"]),
    )


def lightest(cfg: Any, params: Sequence[Param], facts: DataFacts) -> dict[str, Any]:
    """The space's lightest corner: each size parameter at its value of fewest FLOPs (others as composed)."""
    from .measure import model_cost

    values = seed_values(cfg, params)
    n = len(facts.class_names)
    for p in params:
        if p.model_kwarg is None and not p.name.startswith("data.loader."):
            continue
        costs = []
        for v in p.candidates():
            trial = {**values, p.name: v}
            h, w = input_size(facts.native, loader_config(cfg, trial))
            try:
                model = build_model(cfg, trial, n, check_size=False)
                costs.append((model_cost(model, facts.channels, h, w)["flops"], repr(v), v))
            except Exception:
                continue
        if costs:
            values[p.name] = min(costs)[2]
    return values


def images_per_epoch(cfg: Any, n_train: int, batch_size: int) -> int:
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(n_train, limit * batch_size)
    if isinstance(limit, float):
        return int(n_train * limit)
    return n_train


def check_time_budget(timeout: float, cfg: Any, light: Mapping[str, Any], facts: DataFacts) -> None:
    """``search.timeout`` must leave room for one trial of the lightest architecture."""
    import torch
    import torch.nn.functional as F

    from ..training.config import use_memory_format

    model = build_model(cfg, light, len(facts.class_names), check_size=False).train()
    use_memory_format(model, cfg.get("memory_format"))  # as the trials train
    batch = int(light.get("data.batch_size", cfg.data.batch_size))
    h, w = input_size(facts.native, loader_config(cfg, light))
    x = torch.randn(batch, facts.channels, h, w)
    target = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), target).backward()
        times.append(time.perf_counter() - t0)
    per_image = min(times[1:]) / batch
    epochs = int(cfg.trainer.max_epochs)
    images = images_per_epoch(cfg, facts.n_train, batch)
    need = per_image * images * epochs
    if timeout < need:
        raise SearchConfigError(
            f"search.timeout={timeout:g} s is too small for one trial: training the lightest architecture in "
            f"the space alone takes about {need:.0f} s ({images} images x {epochs} epochs x "
            f"{per_image * 1000:.1f} ms per image at {h}x{w}); raise search.timeout or lower trainer.max_epochs"
        )


def check_latency_budget(
    budget: float, cfg: Any, light: Mapping[str, Any], facts: DataFacts, settings: LatencySettings, work: Path
) -> float:
    """``search.max_latency_ms`` must admit the lightest architecture; returns its measured latency."""
    model = build_model(cfg, light, len(facts.class_names), check_size=False)
    loader = loader_config(cfg, light)
    info = untrained_info(cfg, facts, loader, light)
    path = export_untrained(model, info, work / "lightest.onnx")
    h, w = input_size(facts.native, loader)
    lat = measure_latency(path, h, w, settings)
    if lat.ms_per_image > budget:
        raise SearchConfigError(
            f"search.max_latency_ms={budget:g} is too small for one trial: the lightest architecture in the space "
            f"measures {lat.ms_per_image:.3f} ms per image (batch {lat.batch}, {h}x{w}, {lat.provider}); "
            "raise the budget or widen the space toward smaller models"
        )
    log.info("lightest architecture in the space: %.3f ms per image (budget %g ms)", lat.ms_per_image, budget)
    return lat.ms_per_image


def untrained_info(cfg: Any, facts: DataFacts, loader: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint info an export needs, for a model that has not been trained yet."""
    builder, _ = model_kwargs(cfg, values)
    return {
        "class_names": list(facts.class_names),
        "good_class": facts.good_class,
        "threshold": 0.5,
        "loader": loader.to_dict(),
        "mean": list(facts.mean),
        "std": list(facts.std),
        "model_name": builder,
        "val_paths": [],
    }
