"""Hydra entry points: ``defectscope train [overrides]`` and ``defectscope evaluate ckpt_path=... [overrides]``.

Every argument goes to Hydra unchanged, so overrides, ``--multirun``, ``--cfg job``, ``-cn``,
``--help`` behave as in any Hydra app.  Configs come from the repository's ``conf/`` (found
relative to this package) or from the folder named by ``DEFECTSCOPE_CONF``.

DDP on one machine: Lightning starts ranks 1..N-1 by re-running *this process's command line*
(``sys.argv``) with a few Hydra overrides appended.  While the job runs, ``sys.argv`` is therefore
set back to the ``defectscope train ...`` form (console script or ``python -m defectscope``), so
the children run the same command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONF_ENV = "DEFECTSCOPE_CONF"


def conf_dir() -> Path:
    """``$DEFECTSCOPE_CONF`` or ``<repo>/conf`` (inspect/defectscope/training -> ../../../conf)."""
    env = os.environ.get(CONF_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "conf"
    return path.resolve()


def _is_own_error(exc: BaseException) -> bool:
    """Errors whose message is the whole story: defectscope's own, and Hydra's instantiation errors."""
    from hydra.errors import InstantiationException

    return isinstance(exc, InstantiationException) or type(exc).__module__.startswith("defectscope")


def _job(command: str, argv: list[str], launch_argv: list[str], fn: Callable[[Any], dict[str, float]]) -> Any:
    def task(cfg: Any) -> Any:
        saved = sys.argv
        # Lightning's DDP launcher re-runs sys.argv for the other ranks (see module docstring).
        sys.argv = launch_argv
        try:
            metrics = fn(cfg)
        except Exception as exc:
            if not _is_own_error(exc):
                raise
            print(f"defectscope {command}: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
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

    conf = conf_dir()
    if not (conf / f"{config_name}.yaml").is_file():
        print(
            f"defectscope {command}: config folder {conf} has no {config_name}.yaml; set {CONF_ENV} to the "
            "conf/ folder of a defectscope checkout",
            file=sys.stderr,
        )
        return 2
    args = list(argv)
    own = sys.argv[1:2] == [command]  # started as `defectscope <command> ...` or `python -m defectscope ...`
    launch_argv = [sys.argv[0], command, *args] if own else list(sys.argv)
    saved = sys.argv
    sys.argv = [f"defectscope {command}", *args]
    main = hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(
        _job(command, args, launch_argv, fn)
    )
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def _train(cfg: Any) -> dict[str, float]:
    from .train import train

    return train(cfg)


def _evaluate(cfg: Any) -> dict[str, float]:
    from .evaluate import evaluate

    return evaluate(cfg)


def train_main(argv: Sequence[str]) -> int:
    """``defectscope train``: every argument is a Hydra argument (overrides, --multirun, --cfg, -cn, --help)."""
    return _run("train", "train", argv, _train)


def evaluate_main(argv: Sequence[str]) -> int:
    """``defectscope evaluate ckpt_path=PATH [data=...]``: test metrics of a checkpoint (Hydra);
    ``defectscope evaluate MODEL.onnx DATA``: an exported model through the runtime (torch-free)."""
    if argv and str(argv[0]).lower().endswith(".onnx"):
        from defectscope.evaluation.cli import main

        return main(argv)
    return _run("evaluate", "evaluate", argv, _evaluate)


if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
