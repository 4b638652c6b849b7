"""The data settings checked before anything is read, each error naming its config key.

Free of torch and Lightning: the rules, apart from the DataModule that applies them, so ``evaluate``
shares them without its own copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..plain import to_plain, whole_number
from ..runtime.image import LoaderConfig
from ..runtime.metadata import check_loader_values
from .errors import DataConfigError

ON_BAD_FILE = ("fail", "skip")
#: what ``evaluate`` scores: "test" = only the test split, "all" = every image of the source (a new lot);
#: None (training) = the train/val/test split
EVALUATE_ON = ("test", "all")


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
    whole_number(batch_size, "data.batch_size", 1)
    whole_number(eval_batch_size, "data.eval_batch_size", 1, allow_none=True)


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


def check_normalisation_length(mean: Any, std: Any, channels: int) -> None:
    """``data.mean``/``data.std`` hold one value or one per channel (``data.loader.channels``)."""
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise DataConfigError(
                f"data.{key} has {len(values)} values; expected 1 or {channels} (data.loader.channels)"
            )
