"""A :class:`DefectDataModule` from a data config that may have been read from a file, without Hydra.

Evaluation rebuilds the training data from the config recorded in the checkpoint.  That config is
data: its ``_target_`` is compared with the one class it may name (never imported), its source is
chosen by ``source.kind`` from the source registry, its transforms must name only an exact
allow-list (:mod:`.transforms`; checked, then left out: evaluation applies none), and every other
value must be plain.  Anything else is refused, with the key,
before a single file is listed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..plain import PlainDataError, check_plain
from ..synth import DEFAULT_CLASSES
from .settings import DATAMODULE_TARGET, check_data_keys, data_settings
from .transforms import check_transform_spec

#: DefectDataModule arguments evaluation sets itself, whatever the config says
EVALUATION_KEYS = ("loader", "mean", "std", "rejects_path", "evaluate_on")


def datamodule_kwargs(spec: Any, where: str, *, from_file: bool) -> dict[str, Any]:
    """Checked ``DefectDataModule`` keyword arguments from a plain data config (``where`` names it).

    ``from_file``: the config was read from a checkpoint, so it may not make evaluation write
    anything: a synthetic source is read as the folder it was generated into, never regenerated.
    """
    if not isinstance(spec, Mapping):
        raise PlainDataError(f"{where}: expected a data config mapping, got {type(spec).__name__}")
    kwargs = dict(spec)
    target = kwargs.pop("_target_", DATAMODULE_TARGET)
    if target != DATAMODULE_TARGET:
        raise PlainDataError(
            f"{where}._target_ is {str(target)[:200]!r}; a data config is always rebuilt as "
            f"{DATAMODULE_TARGET} (a name read from a file is never imported)"
        )
    if (
        kwargs.pop("_recursive_", False) is not False
    ):  # the data configs' own `false`: nothing is built by Hydra
        raise PlainDataError(
            f"{where}._recursive_ must be false or absent (a data config is rebuilt without Hydra)"
        )
    transforms = {k: kwargs.pop(k, None) for k in ("train_transform", "eval_transform")}
    for key, value in transforms.items():
        check_transform_spec(value, f"{where}.{key}")
    check_plain(kwargs, where)
    check_data_keys(kwargs, where, PlainDataError)
    for key in EVALUATION_KEYS:
        kwargs.pop(key, None)
    if from_file:  # a runtime setting of the machine it was trained on: at most this machine's cores here
        for key in ("num_workers", "scan_workers"):
            value = kwargs.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > (os.cpu_count() or 1):
                kwargs[key] = os.cpu_count() or 1
    try:  # training's own rules, so a run's recorded config is never refused for what training accepted
        settings = data_settings(**kwargs, evaluate_on="test", rejects_path=None)  # evaluation sets its own
    except ValueError as exc:
        message = str(exc)
        named = message.startswith(("data.", "data:")) and where != "data"
        raise PlainDataError(f"{where}{message[len('data') :]}" if named else message) from None
    if from_file and settings.source["kind"] == "synthetic":
        kwargs["source"] = generated_folder(settings.source, f"{where}.source")
    return kwargs  # transforms stay unset: evaluation sees images as the line PC does


def generated_folder(source: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The folder a synthetic source generated its images into, as a folder source (same listing)."""
    root = source.get("root")
    if not isinstance(root, str) or not root:
        raise PlainDataError(f"{where}.root: expected the folder the synthetic images were generated into")
    spec: dict[str, Any] = {"kind": "folder", "root": root, "extensions": [".png"]}
    spec["classes"] = list(
        source.get("classes") or DEFAULT_CLASSES
    )  # the generator's order, not sorted names
    if source.get("good_class") is not None:
        spec["good_class"] = source["good_class"]
    return spec
