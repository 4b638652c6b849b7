"""``hydra.callbacks`` checked before Hydra builds them.  Hydra instantiates each entry before the job starts,
so a function named there (``builtins.open`` with ``mode: w`` emptied a file, ``pathlib.Path.mkdir`` made a
folder; attack) ran with the config's arguments before any of the command's own checks.  Each entry must name
a Hydra callback class, as ``callbacks.*`` must name Lightning callbacks (:mod:`.targets`).

The command line is read with Hydra's own parsers (shortened options such as ``--config-d`` included), and the
config is composed as Hydra will compose it: with ``--config-path``/``--config-dir``, one search path list, and
for a sweep each value of each swept key."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TrainingConfigError
from .targets import check_target_class

_KEY = "hydra.callbacks"


def parse_command_line(args: Sequence[str]) -> Namespace:
    """Hydra's own reading of a command line: ``config_dir``, ``config_path``, ``config_name``, ``overrides``."""
    from hydra._internal.utils import get_args_parser

    known, _ = get_args_parser().parse_known_args(list(args))
    return known


def _searchpath_merged(overrides: list[Any], config_dir: str | None) -> tuple[list[str], bool]:
    """The overrides as strings with ``--config-dir`` joined to any ``hydra.searchpath`` in one list (two
    ``hydra.searchpath`` overrides would not compose), and whether a search path was given at all."""
    extra = [f"file://{Path(config_dir).absolute()}"] if config_dir else []
    out: list[str] = []
    for o in overrides:
        if o.key_or_group == "hydra.searchpath" and not o.is_sweep_override():
            extra += [str(v) for v in (o.value() or [])]
        else:
            out.append(o.input_line)
    if extra:
        out.append(f"hydra.searchpath=[{','.join(extra)}]")
    return out, bool(extra)


def _single_runs(overrides: list[Any]) -> list[list[str]]:
    """A sweep as single runs: each value of each swept key once, the other swept keys at their first value
    (every config file a sweep can include is composed once).  Raises where a sweep cannot be listed (glob)."""
    swept = [(i, list(o.sweep_string_iterator())) for i, o in enumerate(overrides) if o.is_sweep_override()]
    base = [o.input_line for o in overrides]
    for i, values in swept:
        base[i] = f"{overrides[i].get_key_element()}={values[0]}"
    runs = [base]
    for i, values in swept:
        for value in values[1:]:
            run = list(base)
            run[i] = f"{overrides[i].get_key_element()}={value}"
            runs.append(run)
    return runs


def _primary(command_line: Namespace, conf: Path, config_name: str) -> tuple[Path, str]:
    """The primary config folder and name; a relative ``--config-path`` is read as Hydra reads it, from the folder
    of the file that defines the task function (``app.py``, beside this one)."""
    folder = Path(__file__).resolve().parent / command_line.config_path if command_line.config_path else conf
    return folder, command_line.config_name or config_name


def _refusal(command_line: Namespace, overrides: list[Any], reason: str) -> TrainingConfigError | None:
    """Where the config could not be composed here: refused when a user's config or a ``hydra.*`` override could
    set Hydra callbacks (else Hydra's own run says what is wrong)."""
    user = command_line.config_dir or command_line.config_path
    hydra_typed = any(
        str(o.key_or_group).startswith("hydra") or str(o.package or "").startswith("hydra") for o in overrides
    )
    if not (user or hydra_typed):
        return None
    return TrainingConfigError(
        f"{_KEY} cannot be checked on this command line ({reason}); list a sweep's values instead of a glob"
    )


def check_hydra_callbacks(conf: Path, config_name: str, args: Sequence[str]) -> None:
    """Refuse a ``hydra.callbacks`` entry that is not a Hydra callback class, in one line naming its key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.experimental.callback import Callback

    command_line = parse_command_line(args)
    try:
        parsed = OverridesParser.create().parse_overrides(list(command_line.overrides or []))
    except Exception:  # a malformed override: Hydra names it itself
        return
    lines, _ = _searchpath_merged(parsed, command_line.config_dir)
    folder, name = _primary(command_line, conf, config_name)
    try:
        runs = _single_runs(OverridesParser.create().parse_overrides(lines))
    except Exception as exc:
        problem = _refusal(command_line, parsed, " ".join(str(exc).split()))
        if problem is not None:
            raise problem from None
        return
    for run in runs:
        try:
            with initialize_config_dir(str(folder), version_base="1.3"):
                callbacks = (
                    compose(name, overrides=run, return_hydra_config=True).hydra.get("callbacks") or {}
                )
        except Exception:  # Hydra's own composition of the same command line fails the same way, and says why
            return
        for key, spec in callbacks.items():
            target = spec.get("_target_") if hasattr(spec, "get") else None
            if target is not None:
                what = "a Hydra callback class (hydra.experimental.callback.Callback)"
                check_target_class(target, f"{_KEY}.{key}", (Callback,), what, spec)
