"""The data settings checked before anything is read, each error naming its config key.

Free of torch and Lightning: the rules, apart from the DataModule that applies them, so ``evaluate``
shares them without its own copy.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..plain import expect, to_plain, whole_number
from ..runtime.image import LoaderConfig
from ..runtime.metadata import NORMALISATION_RANGE, check_loader_values
from ..runtime.outputs import OutputError, check_not_input, check_output_file
from .errors import DataConfigError, SourceError
from .sources import SOURCES, input_paths, source_arguments

ON_BAD_FILE = ("fail", "skip")
#: what ``evaluate`` scores: "test" = only the test split, "all" = every image of the source (a new lot);
#: None (training) = the train/val/test split
EVALUATE_ON = ("test", "all")
#: the class ``data._target_`` names (Hydra builds it from ``cfg.data``)
DATAMODULE_TARGET = "defectscope.data.datamodule.DefectDataModule"
#: the largest data.multi_scale factor accepted (4x the pixels per side is already 16x the compute)
MAX_SCALE = 4.0
#: the most images per batch and loader/scan processes a data config may ask for (one rule for a config
#: typed by the user and one read from a checkpoint: a file must not make evaluation start 10,000 processes)
MAX_BATCH = 1 << 14
MAX_WORKERS = 256


def check_evaluate_on(value: str | None) -> None:
    """``evaluate_on`` is one of :data:`EVALUATE_ON` or None."""
    if value is not None and value not in EVALUATE_ON:
        raise DataConfigError(f"evaluate_on must be one of {', '.join(EVALUATE_ON)} or null, got {value!r}")


def check_settings(
    evaluate_on: str | None,
    eval_transform: Any,
    on_bad_file: str,
    batch_size: int,
    eval_batch_size: int | None,
) -> None:
    """The data settings that need nothing read yet, each named by its config key."""
    check_evaluate_on(evaluate_on)
    if eval_transform is not None:
        raise DataConfigError(
            "data.eval_transform is not supported: validation (where the threshold is chosen) and "
            "test must see images exactly as the line PC does, which applies no transform; remove it"
        )
    if on_bad_file not in ON_BAD_FILE:
        raise DataConfigError(
            f"data.on_bad_file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}"
        )
    whole_number(batch_size, "data.batch_size", 1, most=MAX_BATCH)
    whole_number(eval_batch_size, "data.eval_batch_size", 1, allow_none=True, most=MAX_BATCH)


def loader_config(loader: Mapping[str, Any] | LoaderConfig | None) -> LoaderConfig:
    """``data.loader`` as the runtime's typed loader settings, checked by the rule a model file's loader
    meets (:func:`check_loader_values`), so a value no model could carry is refused before training, not after;
    an error names the key."""
    if isinstance(loader, LoaderConfig):
        return loader
    given = to_plain(loader or {})
    if not isinstance(given, dict):
        raise DataConfigError(f"data.loader must be a mapping of loader settings, got {given!r}")
    valid = LoaderConfig().to_dict()
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise DataConfigError(f"data.loader: unknown key(s) {unknown}; valid: {', '.join(valid)}")
    try:
        check_loader_values(given)
        return LoaderConfig(**{**valid, **given})
    except ValueError as exc:
        message = str(exc)
        if message.startswith("loader."):
            raise DataConfigError(f"data.{message}") from None
        raise DataConfigError(f"data.loader: {message}") from None


def split_config(split: Mapping[str, Any] | None, training: bool = True) -> dict[str, Any]:
    """``data.split`` as plain data; unknown keys are refused (a typo would silently split differently).

    Fractions are numbers in [0, 1) or null: the test part is taken first and ``val_fraction`` is of the
    rest, so training always keeps images (evaluation may put every image in the test split:
    ``test_fraction: 1``)."""
    split_cfg: dict[str, Any] = to_plain(split or {})
    if not isinstance(split_cfg, dict):
        raise DataConfigError(
            f"data.split must be a mapping of val_fraction, test_fraction and seed, got {split!r}"
        )
    unknown = set(split_cfg) - {"val_fraction", "test_fraction", "seed"}
    if unknown:
        raise DataConfigError(
            f"data.split: unknown key(s) {sorted(unknown)}; valid: val_fraction, test_fraction, seed"
        )
    what = "[0, 1)" if training else "[0, 1]"
    for key in ("val_fraction", "test_fraction"):
        v = split_cfg.get(key)
        if v is None:
            continue
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not (0 <= v < 1 or (v == 1 and not training))
        ):
            raise DataConfigError(f"data.split.{key} must be a number in {what} or null, got {v!r}")
    whole_number(split_cfg.get("seed"), "data.split.seed", 0, allow_none=True)
    return split_cfg


def normalisation_values(values: Any, key: str) -> list[float] | None:
    """``data.mean``/``data.std``: null, or a list of numbers in the range an exported model accepts."""
    if values is None:
        return None
    low, high = NORMALISATION_RANGE[key]
    items = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    if not items or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and low <= v <= high for v in items
    ):
        raise DataConfigError(
            f"data.{key} must be null or a list of numbers in [{low:g}, {high:g}], got {values!r}"
        )
    return [float(v) for v in items]


def check_normalisation_length(mean: Any, std: Any, channels: int) -> None:
    """``data.mean``/``data.std`` hold one value or one per channel (``data.loader.channels``)."""
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise DataConfigError(
                f"data.{key} has {len(values)} values; expected 1 or {channels} (data.loader.channels)"
            )


def check_scales(value: Any) -> tuple[float, ...]:
    """``data.multi_scale`` -> the factors (empty = off); a one-line error names the key otherwise."""
    if value is None:
        return ()
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    ok = items is not None and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_SCALE
        for v in items
    )
    if not ok or not items:
        raise DataConfigError(
            f"data.multi_scale must be null or a non-empty list of scale factors in (0, {MAX_SCALE:g}] "
            f"such as [0.75, 1.0, 1.25], got {value!r}"
        )
    return tuple(float(v) for v in items)


@dataclass(frozen=True)
class DataSettings:
    """Every ``data.*`` setting of :class:`~.datamodule.DefectDataModule`, checked (see :func:`data_settings`)."""

    source: dict[str, Any]
    loader: LoaderConfig
    split: dict[str, Any]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool | None
    persistent_workers: bool
    train_transform: Any
    mean: list[float] | None
    std: list[float] | None
    on_bad_file: str
    rejects_path: str | None
    scan_workers: int
    seed: int
    drop_last: bool
    ordered: bool
    dihedral: bool
    multi_scale: tuple[float, ...]
    evaluate_on: str | None


def data_settings(
    source: Mapping[str, Any] | None = None,
    loader: Mapping[str, Any] | LoaderConfig | None = None,
    split: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    train_transform: Any = None,
    eval_transform: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    on_bad_file: str = "fail",
    rejects_path: str | None = "rejects.csv",
    scan_workers: int = 2,
    seed: int = 0,
    drop_last: bool = False,
    ordered: bool = False,
    dihedral: bool = False,
    multi_scale: Sequence[float] | None = None,
    evaluate_on: str | None = None,
) -> DataSettings:
    """The data config checked without torch or reading a file, each error naming its key: the
    DataModule's keywords (their meaning: :class:`~.datamodule.DefectDataModule`), so ``train`` can refuse a
    mistake before it imports Lightning."""
    check_settings(evaluate_on, eval_transform, on_bad_file, batch_size, eval_batch_size)
    source_spec: dict[str, Any] = to_plain(source)
    if not isinstance(source_spec, dict) or "kind" not in source_spec:
        raise SourceError(f"data.source.kind is required ({', '.join(SOURCES)})")
    source_arguments(source_spec)  # the kind and its keys, before any file is read
    loader_cfg = loader_config(loader)
    if rejects_path is not None and (not isinstance(rejects_path, str) or not rejects_path):
        raise DataConfigError(f"data.rejects_path must be null or a file path, got {rejects_path!r}")
    if on_bad_file == "skip" and rejects_path:  # written after the scan: a bad path is told before it
        try:
            check_output_file(rejects_path, "data.rejects_path")
            check_not_input(rejects_path, "data.rejects_path", input_paths(source_spec))
        except OutputError as exc:
            raise DataConfigError(str(exc)) from None
    means, stds = normalisation_values(mean, "mean"), normalisation_values(std, "std")
    check_normalisation_length(means, stds, loader_cfg.channels)
    return DataSettings(
        source=source_spec,
        loader=loader_cfg,
        split=split_config(split, training=evaluate_on is None),
        batch_size=int(batch_size),
        eval_batch_size=int(eval_batch_size or batch_size),
        num_workers=int(whole_number(num_workers, "data.num_workers", 0, most=MAX_WORKERS) or 0),
        pin_memory=expect(pin_memory, (bool, type(None)), "data.pin_memory", "true, false or null"),
        persistent_workers=expect(persistent_workers, bool, "data.persistent_workers", "true or false"),
        train_transform=train_transform,
        mean=means,
        std=stds,
        on_bad_file=on_bad_file,
        rejects_path=rejects_path,
        scan_workers=int(whole_number(scan_workers, "data.scan_workers", 0, most=MAX_WORKERS) or 0),
        seed=int(whole_number(seed, "data.seed", 0) or 0),
        drop_last=expect(drop_last, bool, "data.drop_last", "true or false"),
        ordered=expect(ordered, bool, "data.ordered", "true or false"),
        dihedral=expect(dihedral, bool, "data.dihedral", "true or false"),
        multi_scale=check_scales(multi_scale),
        evaluate_on=evaluate_on,
    )


def check_data_keys(kwargs: Mapping[str, Any], where: str, error: type[ValueError] = DataConfigError) -> None:
    """Only the DataModule's keywords (:func:`data_settings`'s), or ``error`` naming ``where`` and the valid ones."""
    valid = list(inspect.signature(data_settings).parameters)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")


def config_data_settings(data: Mapping[str, Any]) -> DataSettings | None:
    """``data`` (the plain config Hydra will build the DataModule from) checked without building it;
    ``None`` when ``_target_`` names another class, whose keywords are its own."""
    kwargs = dict(data)
    if kwargs.pop("_target_", DATAMODULE_TARGET) != DATAMODULE_TARGET:
        return None
    for key in ("_recursive_", "_convert_", "_partial_"):
        kwargs.pop(key, None)
    check_data_keys(kwargs, "data")
    try:
        return data_settings(**kwargs)
    except TypeError as exc:  # a value of a type no check expected (a list where a name belongs)
        raise DataConfigError(f"data: {exc}") from None
