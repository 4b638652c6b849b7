"""How the Hydra apps (train, evaluate, search, scan) tell a refusal: one line naming the config key, on stderr
and in the run folder's job log, instead of Hydra's multi-line wrappers and tracebacks."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from ..hints import did_you_mean
from ..runtime.files import error_line, os_error_line


def is_own_error(exc: BaseException) -> bool:
    """Errors whose message is the whole story: defectscope's own, Hydra's instantiation errors and
    OmegaConf's (a value that cannot be read or resolved, e.g. ``data.loader=5`` under an interpolation)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    own = (InstantiationException, OmegaConfBaseException)
    named_file = isinstance(exc, OSError) and exc.filename is not None  # a name too long, a full disk
    return isinstance(exc, own) or named_file or type(exc).__module__.startswith("defectscope")


def one_line(exc: BaseException) -> str:
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


def _unknown_key(cause: BaseException | None, overrides: Sequence[str] = ()) -> str | None:
    """An override of a key its config node does not have (Hydra: "Could not override 'data.source.rot'. To
    append to your config use +data.source.rot=..."): the close keys first, then how to add one. When the
    missing key is a node on the way (``data.sourc.root=x``), the line names the typed key and the node,
    and leaves out the advice to add it: that would add the misspelt node."""
    parent, key, full = (getattr(cause, name, None) for name in ("parent_node", "key", "full_key"))
    if not (cause is not None and "not in struct" in str(cause) and key and full and hasattr(parent, "keys")):
        return None
    prefix = str(full)[: -len(str(key))]
    known = [str(k) for k in parent]  # type: ignore[union-attr]  # a DictConfig: its keys
    hint = did_you_mean(str(key), known, prefix)
    typed = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    deeper = next((t for t in typed if t.startswith(f"{full}.")), None)
    if deeper and str(full) not in typed:
        return f"{deeper}: no such setting: {prefix.rstrip('.') or 'the config'} has no {str(key)!r}{hint}"
    case_only = str(key).lower() in (k.lower() for k in known)
    add = f" (a new key is added with +{full}=VALUE)" if "[" not in str(full) and not case_only else ""
    return f"{full}: no such setting{hint}{add}"


def composition_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra's composition errors on one line (Hydra's own text spans lines and lists the search path).

    A missing group option names its group, the valid options and, when no command-line override
    (``overrides``) chose it, that a config's defaults list did; the rest keep their words and cause."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from yaml import MarkedYAMLError

    if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{mark.name}: not valid YAML ({exc.problem}, line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, UnicodeDecodeError):
        return f"a config file is not UTF-8 text ({exc}); config files (conf/, --config-dir) must be UTF-8"
    text = str(exc).split("\nConfig search path:")[0]
    group = re.search(r"Available options in '([^']+)'", text)
    missing = str(getattr(exc, "missing_cfg_file", None) or "")
    if isinstance(exc, MissingConfigException) and exc.options is not None and group and missing:
        name = group.group(1)
        option = missing[len(name) + 1 :] if missing.startswith(name + "/") else missing
        typed = re.compile(rf"[+~]*{re.escape(name)}(@[^=]*)?=")
        where = "" if any(typed.match(o) for o in overrides) else " (chosen by a config's defaults list)"
        return no_such_option(name, option, exc.options, where)
    unknown = _unknown_key(exc.__cause__, overrides)
    if unknown:
        return unknown
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        lines.insert(0, f"{exc.override}:")
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.insert(1, f"({str(cause).strip().splitlines()[0]})")
    return " ".join(lines)


class ComposeErrorsRaised:
    """``HYDRA_FULL_ERROR=1`` while Hydra parses and composes, so its errors reach :func:`_run` as exceptions
    (it would print them over many lines and exit 1); the user's setting is back before the job runs, so
    the job's own errors, and DDP ranks started from it, see what the user set."""

    def __init__(self) -> None:
        self.user = os.environ.get("HYDRA_FULL_ERROR")
        self.started = False  # the job ran: errors from here on are not composition errors
        self._set = False

    def __enter__(self) -> ComposeErrorsRaised:
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


def leave_if_distributed(code: int) -> None:
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


def escape_in_job_log() -> None:
    """The job log escapes what UTF-8 cannot hold (a file name that is not UTF-8) instead of printing a
    ``--- Logging error ---`` traceback per such line; whatever ``hydra/job_logging`` configured."""
    import logging

    for handler in logging.getLogger().handlers:
        reconfigure = getattr(getattr(handler, "stream", None), "reconfigure", None)
        if isinstance(handler, logging.FileHandler) and reconfigure is not None:
            reconfigure(errors="backslashreplace")


def record_in_job_log(line: str) -> None:
    """Write the error to Hydra's job log file (``train.log`` in the run folder) only, so a run folder left by
    a refused configuration says why; the console already has the line."""
    import logging

    record = logging.LogRecord("defectscope", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def refuse(command: str, exc: BaseException) -> NoReturn:
    """One line on stderr and in the job log, exit status 2 (every rank leaves)."""
    line = error_line(f"defectscope {command}", one_line(exc))
    print(line, file=sys.stderr, flush=True)
    record_in_job_log(line)
    leave_if_distributed(2)
    raise SystemExit(2) from None
