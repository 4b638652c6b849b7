"""``hydra.callbacks`` checked before Hydra builds them.  Hydra instantiates each entry before the job starts,
so a function named there (``builtins.open`` with ``mode: w`` emptied a file, ``pathlib.Path.mkdir`` made a
folder; attack) ran with the config's arguments before any of the command's own checks.  Each entry must name
a Hydra callback class, as ``callbacks.*`` must name Lightning callbacks (:mod:`.targets`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TrainingConfigError
from .targets import check_target_class

#: Hydra's own options that take the next word as their value
_VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c",
                "--package", "-p", "--experimental-rerun", "--shell-completion", "-sc")  # fmt: skip
_KEY = "hydra.callbacks"


def _split(args: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """The overrides, the ``--config-dir`` folders and a ``--config-name`` of a command line."""
    overrides: list[str] = []
    dirs: list[str] = []
    name: str | None = None
    words = iter(args)
    for word in words:
        flag, eq, value = word.partition("=")
        if flag in _VALUE_FLAGS and word.startswith("-"):
            value = value if eq else next(words, "")
            if flag in ("--config-dir", "-cd"):
                dirs.append(value)
            elif flag in ("--config-name", "-cn"):
                name = value
        elif not word.startswith("-"):
            overrides.append(word)
    return overrides, dirs, name


def _typed(overrides: Sequence[str]) -> list[str]:
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return [k for k in keys if k == _KEY or k.startswith(_KEY + ".") or k.startswith("hydra/callbacks")]


def _composed_callbacks(conf: Path, config_name: str, args: Sequence[str]) -> Any:
    """``hydra.callbacks`` of the run the command line asks for; raises when Hydra cannot compose it as one run."""
    from hydra import compose, initialize_config_dir

    overrides, dirs, name = _split(args)
    extra = [f"file://{Path(d).absolute()}" for d in dirs]
    if extra:
        overrides = [*overrides, f"hydra.searchpath=[{','.join(extra)}]"]
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose(name or config_name, overrides=overrides, return_hydra_config=True)
    return cfg.hydra.get("callbacks") or {}


def check_hydra_callbacks(conf: Path, config_name: str, args: Sequence[str]) -> None:
    """Refuse a ``hydra.callbacks`` entry that is not a Hydra callback class, in one line naming its key."""
    overrides, dirs, _ = _split(args)
    if (
        not dirs
        and not _typed(overrides)
        and not any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides)
    ):
        return  # the packaged configs alone: they set no Hydra callbacks
    from hydra.experimental.callback import Callback

    try:
        callbacks = _composed_callbacks(conf, config_name, args)
    except Exception:  # a sweep or a broken config: Hydra's own run says what is wrong with it
        typed = _typed(overrides)
        if typed:
            raise TrainingConfigError(
                f"{typed[0]}: Hydra callbacks cannot be set on a command line that is a sweep or does not "
                "compose; set them in a config file"
            ) from None
        return
    for name, spec in callbacks.items():
        target = spec.get("_target_") if hasattr(spec, "get") else None
        if target is not None:
            check_target_class(
                target,
                f"{_KEY}.{name}",
                (Callback,),
                "a Hydra callback class (hydra.experimental.callback.Callback)",
            )
