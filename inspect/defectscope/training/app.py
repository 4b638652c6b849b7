"""Hydra entry points: ``defectscope train [overrides]`` and ``defectscope evaluate ckpt_path=... [overrides]``.

Every argument goes to Hydra unchanged, so overrides, ``--multirun``, ``--cfg job``, ``-cn``,
``--help`` and ``--config-dir`` (a folder of the user's own configs, searched first) behave as in
any Hydra app.  The configs ship inside the package (``defectscope/conf`` in a wheel, built from
the repository's ``conf/``, which a source checkout uses directly); see :func:`conf_dir`.

DDP on one machine: Lightning starts ranks 1..N-1 by re-running *this process's command line*
(``sys.argv``) with a few Hydra overrides appended.  While the job runs, ``sys.argv`` is therefore
set back to the ``defectscope train ...`` form (console script or ``python -m defectscope``), so
the children run the same command.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..runtime.files import os_error_line

#: config groups the app chooses itself (``optional model_recipe: ${model}``); ``hydra`` is Hydra's own
INTERNAL_GROUPS = frozenset({"hydra", "model_recipe"})
#: groups that only one command composes, listed in that command's --help only (conf/search.yaml)
COMMAND_GROUPS = {"search": "search"}
HELP_GROUPS_RESOLVER = "defectscope_help_groups"
HELP_EXAMPLES_RESOLVER = "defectscope_help_examples"
#: the first lines of each command's --help (conf/hydra/default.yaml's header)
HELP_EXAMPLES = {
    "train": [
        "defectscope train experiment=smoke",
        "defectscope train model=nf_resnet trainer.max_epochs=30 data=folder data.source.root=/data/parts",
        "defectscope train --multirun model=resnet_small,lenet seed=1,2",
        "defectscope train --cfg job          (print the composed config and exit)",
    ],
    "evaluate": [
        "defectscope evaluate ckpt_path=outputs/DATE/TIME/checkpoints/best.ckpt   (its own test split)",
        "defectscope evaluate ckpt_path=best.ckpt data=folder data.source.root=/data/lot42   (every image)",
        "defectscope evaluate model.onnx /data/lot42 --out audit/   (an exported model, no Hydra: see README)",
    ],
    "search": [
        "defectscope search experiment=smoke model=resnet_small search=smoke   (a first try)",
        "defectscope search experiment=synthetic search.n_trials=40 search.max_latency_ms=3.3",
        "defectscope search --cfg job experiment=synthetic   (print the composed config and exit)",
    ],
}
#: what a required (``???``) key looks like, for the one-line error that names it
EXAMPLE_VALUES = {"ckpt_path": "outputs/<date>/<time>/checkpoints/best.ckpt"}


def conf_dir() -> Path:
    """The packaged configs (``defectscope/conf``, present in a wheel install), else the source
    checkout's ``conf/`` beside ``inspect/`` (setup.py maps that folder into the wheel)."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "conf"
    return shipped if shipped.is_dir() else package.parents[1] / "conf"


def _user_groups(loader: Any, parent: str = "", task: str = "") -> Iterator[str]:
    """``group: option, ...`` lines for groups a user chooses: no internal group, no ``_`` option."""
    for name in sorted(loader.list_groups(parent)):
        group = f"{parent}/{name}" if parent else name
        top = group.split("/")[0]
        if name.startswith("_") or top in INTERNAL_GROUPS or COMMAND_GROUPS.get(top, task) != task:
            continue
        options = sorted(o for o in loader.get_group_options(group) if not o.startswith("_"))
        if options:
            yield f"{group}: {', '.join(options)}"
        yield from _user_groups(loader, group, task)


def help_groups(task: str = "") -> str:
    """The help page's group list (``${defectscope_help_groups:${task_name}}`` in conf/hydra/default.yaml).

    Hydra's own ``$APP_CONFIG_GROUPS`` lists every folder, including ``data/_base`` and the
    recipe group that follows ``model``; this lists the same search path, user folders included.
    """
    from hydra.core.global_hydra import GlobalHydra

    return "\n".join(_user_groups(GlobalHydra.instance().config_loader(), task=str(task)))


def help_examples(task: str = "") -> str:
    """The example command lines for ``task``'s --help, indented under the header."""
    return "\n".join(f"  {line}" for line in HELP_EXAMPLES.get(str(task), HELP_EXAMPLES["train"]))


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(HELP_GROUPS_RESOLVER, help_groups, replace=True, use_cache=False)
    OmegaConf.register_new_resolver(HELP_EXAMPLES_RESOLVER, help_examples, replace=True, use_cache=False)


def _missing_keys(cfg: Any) -> list[str]:
    from omegaconf import OmegaConf

    return sorted(OmegaConf.missing_keys(cfg))


def _is_own_error(exc: BaseException) -> bool:
    """Errors whose message is the whole story: defectscope's own, Hydra's instantiation errors and
    OmegaConf's (a value that cannot be read or resolved, e.g. ``data.loader=5`` under an interpolation)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    own = (InstantiationException, OmegaConfBaseException)
    named_file = isinstance(exc, OSError) and exc.filename is not None  # a name too long, a full disk
    return isinstance(exc, own) or named_file or type(exc).__module__.startswith("defectscope")


def _one_line(exc: BaseException) -> str:
    """The message on one line: an instantiation error is its cause's message (which names the key),
    with the config node Hydra names (``full_key``), not Hydra's three-line wrapper."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OmegaConfBaseException):  # its text goes on with full_key/object_type lines
        key = getattr(exc, "full_key", None)
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0] + (
            f" (config key {key})" if key else ""
        )
    if isinstance(exc, OSError):
        return os_error_line(exc)
    cause = exc.__cause__
    if not isinstance(exc, InstantiationException) or cause is None:
        return " ".join(str(exc).split("\n"))
    node = [line[len("full_key: ") :] for line in str(exc).splitlines() if line.startswith("full_key: ")]
    where = f" (config node {node[0]})" if node and node[0] and node[0] not in str(cause) else ""
    return " ".join(f"{cause}{where}".split("\n"))


def no_such_option(group: str, option: str, options: Iterable[str], where: str = "") -> str:
    """The one message for an option its group does not have, with the valid ones (internal ``_`` ones left out)."""
    valid = ", ".join(sorted(o for o in options if not o.startswith("_")))
    return f"{group}={option}: no such option in config group {group!r}{where}; valid: {valid}"


def composition_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra's composition errors on one line (Hydra's own text spans lines and lists the search path).

    A missing group option names its group, the valid options and, when no command-line override
    (``overrides``) chose it, that a config's defaults list did; the rest keep their words and cause."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc).split("\nConfig search path:")[0]
    group = re.search(r"Available options in '([^']+)'", text)
    missing = str(getattr(exc, "missing_cfg_file", None) or "")
    if isinstance(exc, MissingConfigException) and exc.options is not None and group and missing:
        name = group.group(1)
        option = missing[len(name) + 1 :] if missing.startswith(name + "/") else missing
        typed = re.compile(rf"[+~]*{re.escape(name)}(@[^=]*)?=")
        where = "" if any(typed.match(o) for o in overrides) else " (chosen by a config's defaults list)"
        return no_such_option(name, option, exc.options, where)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        lines.insert(0, f"{exc.override}:")
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.insert(1, f"({str(cause).strip().splitlines()[0]})")
    return " ".join(lines)


class _ComposeErrorsRaised:
    """``HYDRA_FULL_ERROR=1`` while Hydra parses and composes, so its errors reach :func:`_run` as exceptions
    (it would print them over many lines and exit 1); the user's setting is back before the job runs, so
    the job's own errors, and DDP ranks started from it, see what the user set."""

    def __init__(self) -> None:
        self.user = os.environ.get("HYDRA_FULL_ERROR")
        self.started = False  # the job ran: errors from here on are not composition errors
        self._set = False

    def __enter__(self) -> _ComposeErrorsRaised:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        self._set = True
        return self

    def _restore(self) -> None:
        if self._set:
            self._set = False
            if self.user is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = self.user

    def job_started(self) -> None:
        self.started = True
        self._restore()

    def __exit__(self, *exc: object) -> None:
        self._restore()


def _typed_options(args: Sequence[str], group: str) -> list[str]:
    """The options a command line gives ``group``, every value of a sweep included, as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    typed = [a for a in args if a.startswith(f"{group}=")]
    try:
        overrides = OverridesParser.create().parse_overrides(typed)
        options: list[str] = []
        for o in overrides:
            if o.is_sweep_override():
                options += list(o.sweep_string_iterator())
            elif isinstance(o.value(), str):
                options.append(str(o.value()))
    except HydraException:  # Hydra names a malformed override itself, in composition_error
        return []
    return options


def _config_dirs(args: Sequence[str]) -> list[Path]:
    """The ``--config-dir`` / ``-cd`` folders of a command line (searched before the packaged configs)."""
    dirs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    dirs += [a.split("=", 1)[1] for a in args if a.startswith("--config-dir=")]
    return [Path(d) for d in dirs]


def recipe_problem(args: Sequence[str]) -> str | None:
    """A ``model_recipe=NAME`` on the command line (a sweep's values too) that names no recipe, found
    before Hydra runs anything: the group is optional, so Hydra would skip it silently and train
    without the recipe asked for.  Not checked when ``hydra.searchpath`` adds folders this cannot see."""
    typed = _typed_options(args, "model_recipe")
    if not typed or any(a.startswith("hydra.searchpath") for a in args):
        return None
    folders = [conf_dir() / "model_recipe", *(d / "model_recipe" for d in _config_dirs(args))]
    options = {f.stem for d in folders if d.is_dir() for f in d.glob("*.yaml")}
    wrong = next((o for o in typed if o not in options), None)
    if wrong is None:
        return None
    hint = " (a model's recipe follows model= by itself; ~model_recipe trains without it)"
    return no_such_option("model_recipe", wrong, options) + hint


def _leave_if_distributed(code: int) -> None:
    """End a DDP process that failed with its one-line error now, without interpreter finalisation.

    The error has been printed and the MLflow run closed.  Finalising would tear down the process group
    and its C++ worker threads while the other ranks leave too; that can abort the process and print
    ``terminate called without an active exception`` after the error line.  A plain run returns."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import logging

    logging.shutdown()  # Hydra's job log file
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _record_in_job_log(line: str) -> None:
    """Write the error to Hydra's job log file (``train.log`` in the run folder) only, so a run folder left by
    a refused configuration says why; the console already has the line."""
    import logging

    record = logging.LogRecord("defectscope", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _refuse(command: str, exc: BaseException) -> NoReturn:
    """One line on stderr and in the job log, exit status 2 (every rank leaves)."""
    line = f"defectscope {command}: error: {_one_line(exc)}"
    print(line, file=sys.stderr, flush=True)
    _record_in_job_log(line)
    _leave_if_distributed(2)
    raise SystemExit(2) from None


def _job(
    command: str, launch_argv: list[str], fn: Callable[[Any], dict[str, float]], errors: _ComposeErrorsRaised
) -> Any:
    def task(cfg: Any) -> Any:
        errors.job_started()
        try:
            missing = _missing_keys(cfg)
        except Exception as exc:  # a value that cannot be resolved (data.loader=5 under an interpolation)
            if not _is_own_error(exc):
                raise
            _refuse(command, exc)
        if missing:
            example = " ".join(f"{k}={EXAMPLE_VALUES.get(k, '...')}" for k in missing)
            line = (
                f"defectscope {command}: error: config key(s) {', '.join(missing)} must be given, e.g. "
                f"defectscope {command} {example}"
            )
            print(line, file=sys.stderr, flush=True)
            _record_in_job_log(line)
            raise SystemExit(2)
        saved = sys.argv
        # Lightning's DDP launcher re-runs sys.argv for the other ranks (see module docstring).
        sys.argv = launch_argv
        try:
            metrics = fn(cfg)
        except Exception as exc:
            if not _is_own_error(exc):
                raise
            _refuse(command, exc)
        finally:
            sys.argv = saved
        key = cfg.get("optimized_metric")
        if key:
            if key not in metrics:
                raise SystemExit(
                    f"defectscope {command}: optimized_metric {key!r} not among {sorted(metrics)}"
                )
            return metrics[key]
        return None

    return task


def _run(command: str, config_name: str, argv: Sequence[str], fn: Callable[[Any], dict[str, float]]) -> int:
    import hydra
    from hydra.errors import HydraException

    conf = conf_dir()
    if not (conf / f"{config_name}.yaml").is_file():
        print(
            f"defectscope {command}: config folder {conf} has no {config_name}.yaml; this installation "
            "is incomplete (reinstall defectscope)",
            file=sys.stderr,
        )
        return 2
    _register_resolvers()
    args = list(argv)
    recipe = recipe_problem(args)
    if recipe:
        print(f"defectscope {command}: error: {recipe}", file=sys.stderr)
        return 2
    own = sys.argv[1:2] == [command]  # started as `defectscope <command> ...` or `python -m defectscope ...`
    launch_argv = [sys.argv[0], command, *args] if own else list(sys.argv)
    saved = sys.argv
    sys.argv = [f"defectscope {command}", *args]
    errors = _ComposeErrorsRaised()
    main = hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(
        _job(command, launch_argv, fn, errors)
    )
    try:
        with errors:
            main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    except (HydraException, ValueError) as exc:
        # before the job: a composition error, or Hydra's "only one of --multirun, --cfg ..." (a ValueError)
        if errors.started or errors.user == "1":
            raise
        print(f"defectscope {command}: error: {composition_error(exc, args)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def _train(cfg: Any) -> dict[str, float]:
    from .preflight import check_train_config

    check_train_config(cfg)  # before torch and Lightning are imported: a mistake is told in about a second
    from .train import train

    return train(cfg)


def _evaluate(cfg: Any) -> dict[str, float]:
    from .preflight import check_evaluate_config

    check_evaluate_config(cfg)  # the threshold and the checkpoint's path before torch is imported
    from .evaluate import evaluate

    return evaluate(cfg)


def train_main(argv: Sequence[str]) -> int:
    """``defectscope train``: every argument is a Hydra argument (overrides, --multirun, --cfg, -cn, --help)."""
    return _run("train", "train", argv, _train)


#: a Hydra override's key (``ckpt_path=``, ``+data.x=``, ``data@y=``): what stands before its first '='
_OVERRIDE_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][\w.]*(@[\w.]*)?=")


def _names_onnx_model(arg: str) -> bool:
    """An argument that is an ONNX file's path, not an override (``ckpt_path=m.onnx``): paths may hold
    '=' (``runs/seed=1/m.onnx``), and one that reads like an override is a path when that file exists."""
    return arg.lower().endswith(".onnx") and (not _OVERRIDE_KEY.match(arg) or os.path.isfile(arg))


def evaluate_main(argv: Sequence[str]) -> int:
    """``defectscope evaluate ckpt_path=PATH [data=...]``: test metrics of a checkpoint (Hydra);
    ``defectscope evaluate MODEL.onnx DATA``: an exported model through the runtime (torch-free)."""
    if any(_names_onnx_model(str(arg)) for arg in argv):
        from defectscope.evaluation.cli import main

        return main(argv)
    return _run("evaluate", "evaluate", argv, _evaluate)


if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
