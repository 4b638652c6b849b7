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

import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..runtime.files import error_line
from .app_errors import (
    ComposeErrorsRaised,
    composition_error,
    escape_in_job_log,
    is_own_error,
    no_such_option,
    record_in_job_log,
    refuse,
)
from .config import TrainingConfigError
from .hydra_callbacks import check_hydra_callbacks, parse_command_line

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


def _config_dirs(args: Sequence[str], prog: str) -> list[Path]:
    """The ``--config-dir`` folder of a command line (searched before the packaged configs), as Hydra reads it
    (``-cd``, ``--config-dir=``, a shortened ``--config-d``)."""
    folder = parse_command_line(args, prog).config_dir
    return [Path(folder)] if folder else []


def run_dir_problem(args: Sequence[str]) -> str | None:
    """The run folder typed on the command line (``hydra.run.dir``, or ``hydra.sweep.dir`` with ``--multirun``)
    that cannot be a folder: Hydra makes it before the job and would fail with an OSError that names no key
    ("File exists" for a file).  Not checked where Hydra makes no folder (``--cfg``, ``--help``, ``--info``)."""
    from ..runtime.outputs import OutputError, check_output_folder

    if any(a.split("=")[0] in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") for a in args):
        return None
    multirun = any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)
    used = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # Hydra's quoting
        if key == used and value and "${" not in value:
            try:
                check_output_folder(value, key)
            except OutputError as exc:
                return str(exc)
    return None


#: how each Hydra app continues what ``--resume`` continues in inspect (a user carries the option over)
_RESUME_HINTS = {
    "train": "a run resumes with ckpt_path=last and the same hydra.run.dir=RUN_FOLDER as the run to continue "
    "(or ckpt_path=RUN_FOLDER/checkpoints/last.ckpt)",
    "search": "a search continues its study when the same command runs again (the same search.study_name and "
    "search.storage)",
    "evaluate": "evaluate has nothing to resume: run it again",
}


def option_problem(command: str, args: Sequence[str]) -> str | None:
    """``--resume`` (inspect's option) given to a Hydra app, which takes ``key=value`` overrides: one line with
    the app's way (Hydra printed its usage and "unrecognized arguments")."""
    if any(arg.split("=")[0] == "--resume" for arg in args):
        return (
            f"--resume is not an option of defectscope {command}: {_RESUME_HINTS.get(command, 'see --help')}"
        )
    return None


def recipe_problem(args: Sequence[str], prog: str = "defectscope") -> str | None:
    """A ``model_recipe=NAME`` on the command line (a sweep's values too) that names no recipe, found
    before Hydra runs anything: the group is optional, so Hydra would skip it silently and train
    without the recipe asked for.  Not checked when ``hydra.searchpath`` adds folders this cannot see."""
    typed = _typed_options(args, "model_recipe")
    if not typed or any(a.startswith("hydra.searchpath") for a in args):
        return None
    folders = [conf_dir() / "model_recipe", *(d / "model_recipe" for d in _config_dirs(args, prog))]
    options = {f.stem for d in folders if d.is_dir() for f in d.glob("*.yaml")}
    wrong = next((o for o in typed if o not in options), None)
    if wrong is None:
        return None
    hint = " (a model's recipe follows model= by itself; ~model_recipe trains without it)"
    return no_such_option("model_recipe", wrong, options) + hint


def _job(
    command: str, launch_argv: list[str], fn: Callable[[Any], dict[str, float]], errors: ComposeErrorsRaised
) -> Any:
    def task(cfg: Any) -> Any:
        errors.job_started()
        escape_in_job_log()
        try:
            missing = _missing_keys(cfg)
        except Exception as exc:  # a value that cannot be resolved (data.loader=5 under an interpolation)
            if not is_own_error(exc):
                raise
            refuse(command, exc)
        if missing:
            example = " ".join(f"{k}={EXAMPLE_VALUES.get(k, '...')}" for k in missing)
            line = (
                f"defectscope {command}: error: config key(s) {', '.join(missing)} must be given, e.g. "
                f"defectscope {command} {example}"
            )
            print(line, file=sys.stderr, flush=True)
            record_in_job_log(line)
            raise SystemExit(2)
        saved = sys.argv
        # Lightning's DDP launcher re-runs sys.argv for the other ranks (see module docstring).
        sys.argv = launch_argv
        try:
            metrics = fn(cfg)
        except Exception as exc:
            if not is_own_error(exc):
                raise
            refuse(command, exc)
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


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def _quiet_third_party() -> None:
    """Lines every run printed that ask nothing of the user: Lightning's advertisement for its cloud logger and
    the deprecation warning its own code raises under torch 2.13 (``isinstance(treespec, LeafSpec)``). Both
    calls are idempotent (one filter object; an equal warnings filter replaces its twin), so commands run
    again in one process (tests, notebooks) do not pile filters up."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_a_tip)


def _run(command: str, config_name: str, argv: Sequence[str], fn: Callable[[Any], dict[str, float]]) -> int:
    import hydra
    from hydra.errors import HydraException
    from yaml import YAMLError

    conf = conf_dir()
    if not (conf / f"{config_name}.yaml").is_file():
        print(
            f"defectscope {command}: config folder {conf} has no {config_name}.yaml; this installation "
            "is incomplete (reinstall defectscope)",
            file=sys.stderr,
        )
        return 2
    _register_resolvers()
    _quiet_third_party()
    args = list(argv)
    prog = f"defectscope {command}"
    problem = option_problem(command, args) or recipe_problem(args, prog) or run_dir_problem(args)
    if problem:
        print(error_line(f"defectscope {command}", problem), file=sys.stderr)
        return 2
    try:
        check_hydra_callbacks(conf, config_name, args, prog)
    except TrainingConfigError as exc:
        print(error_line(f"defectscope {command}", str(exc)), file=sys.stderr)
        return 2
    own = sys.argv[1:2] == [command]  # started as `defectscope <command> ...` or `python -m defectscope ...`
    launch_argv = [sys.argv[0], command, *args] if own else list(sys.argv)
    saved = sys.argv
    sys.argv = [f"defectscope {command}", *args]
    errors = ComposeErrorsRaised()
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
    except (HydraException, ValueError, YAMLError) as exc:
        # before the job: a composition error, Hydra's "only one of --multirun, --cfg ..." (a ValueError), or a
        # config file that is not YAML
        if errors.started or errors.user == "1":
            raise
        print(error_line(f"defectscope {command}", composition_error(exc, args)), file=sys.stderr)
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


def evaluate_checkpoint_main(argv: Sequence[str]) -> int:
    """``defectscope evaluate ckpt_path=PATH [data=...]`` (the command is told apart in
    :mod:`defectscope.evaluation.command`, which a line PC without the training stack can import)."""
    return _run("evaluate", "evaluate", argv, _evaluate)


if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
