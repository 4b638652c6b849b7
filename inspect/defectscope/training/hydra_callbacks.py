"""``hydra.callbacks`` checked before Hydra builds them.  Hydra instantiates each entry before the job starts,
so a function named there (``builtins.open`` with ``mode: w`` emptied a file, ``pathlib.Path.mkdir`` made a
folder; attack) ran with the config's arguments before any of the command's own checks.  Each entry must name
a Hydra callback class, as ``callbacks.*`` must name Lightning callbacks (:mod:`.targets`).

The command line is read with Hydra's own parsers (shortened options such as ``--config-d`` included), and the
config is composed as Hydra composes the one it builds its callbacks from: with ``--config-path``/``--config-dir``,
one search path list, and without a multirun's swept keys."""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TrainingConfigError
from .targets import check_target_class

_KEY = "hydra.callbacks"


def parse_command_line(args: Sequence[str], prog: str = "defectscope") -> Namespace:
    """Hydra's own reading of a command line: ``config_dir``, ``config_path``, ``config_name``, ``overrides``
    (a usage error exits as Hydra's would, under ``prog``)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = prog
    known, _ = parser.parse_known_args(list(args))
    return known


def _searchpath_merged(overrides: list[Any], config_dir: str | None) -> list[str]:
    """The overrides as strings with ``--config-dir`` joined to any ``hydra.searchpath`` in one list (two
    ``hydra.searchpath`` overrides would not compose)."""
    extra = [f"file://{Path(config_dir).absolute()}"] if config_dir else []
    out: list[str] = []
    for o in overrides:
        if o.key_or_group == "hydra.searchpath":
            if not isinstance(o.value(), list):
                raise ValueError(
                    f"hydra.searchpath must be a list such as [file:///my/conf], got {o.value()!r}"
                )
            extra += [str(v) for v in o.value()]
        else:
            out.append(o.input_line)
    if extra:
        out.append(f"hydra.searchpath=[{','.join(extra)}]")
    return out


def _initialised(command_line: Namespace, conf: Path) -> Any:
    """Hydra's compose API over the primary config folder: ``--config-path`` as Hydra reads it (``pkg://`` a
    package, a relative path from the folder of the file that defines the task function, ``app.py`` beside this)."""
    from hydra import initialize_config_dir, initialize_config_module

    given = command_line.config_path
    if given and str(given).startswith("pkg://"):
        return initialize_config_module(str(given)[len("pkg://") :].replace("/", "."), version_base="1.3")
    folder = Path(__file__).resolve().parent / given if given else conf
    return initialize_config_dir(str(folder), version_base="1.3")


def check_hydra_callbacks(
    conf: Path, config_name: str, args: Sequence[str], prog: str = "defectscope"
) -> None:
    """Refuse a ``hydra.callbacks`` entry that is not a Hydra callback class, in one line naming its key; a
    command line this cannot compose is refused with Hydra's own reason (Hydra would refuse it too)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.experimental.callback import Callback
    from omegaconf.errors import OmegaConfBaseException

    from .app_errors import composition_error

    command_line = parse_command_line(args, prog)
    try:
        parsed = OverridesParser.create().parse_overrides(list(command_line.overrides or []))
        # a multirun builds its callbacks once, from the config without the swept keys (each job reuses them)
        single = [o for o in parsed if not o.is_sweep_override()]
        run = _searchpath_merged(single, command_line.config_dir)
        with _initialised(command_line, conf):
            composed = compose(
                command_line.config_name or config_name, overrides=run, return_hydra_config=True
            )
    except Exception as exc:
        # HYDRA_FULL_ERROR=1: the user asked for Hydra's own exception, which Hydra's run shows
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return
        raise TrainingConfigError(composition_error(exc, list(args))) from None
    what = "a Hydra callback class (hydra.experimental.callback.Callback)"
    try:
        callbacks = composed.hydra.get("callbacks") or {}
        for key, spec in callbacks.items():
            target = spec.get("_target_") if hasattr(spec, "get") else None
            if target is not None:
                check_target_class(target, f"{_KEY}.{key}", (Callback,), what, spec)
    except OmegaConfBaseException as exc:  # an interpolation that needs Hydra's run (${hydra:...})
        reason = " ".join(str(exc).split("\n")[0].split())
        raise TrainingConfigError(
            f"{_KEY}: a callback's settings cannot be read before the run ({reason})"
        ) from None
