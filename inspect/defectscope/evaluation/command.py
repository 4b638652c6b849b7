"""``defectscope evaluate``: which of its two commands an argument list is, told without the training stack.

``evaluate MODEL.onnx DATA`` audits an exported model through the runtime (numpy, Pillow and ONNX Runtime
only, so it runs on a line PC); ``evaluate ckpt_path=CHECKPOINT [data=...]`` is a Hydra app of the training
stack, imported only for it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from ..runtime.files import checkpoint_file_problem, error_line

#: a Hydra override's key (``ckpt_path=``, ``+data.x=``, ``data@y=``): what stands before its first '='
_OVERRIDE_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][\w.]*(@[\w.]*)?=")


def _is_override(arg: str) -> bool:
    """A Hydra override (``key=value``, ``+key=value``, ``~key``) rather than a file's path."""
    return bool(_OVERRIDE_KEY.match(arg)) or arg.startswith("~")


def _names_onnx_model(arg: str) -> bool:
    """An argument that is an ONNX file's path, not an override (``ckpt_path=m.onnx``): paths may hold
    '=' (``runs/seed=1/m.onnx``), and one that reads like an override is a path when that file exists."""
    return arg.lower().endswith(".onnx") and (not _is_override(arg) or os.path.isfile(arg))


def evaluate_main(argv: Sequence[str]) -> int:
    """``defectscope evaluate ckpt_path=PATH [data=...]``: test metrics of a checkpoint (Hydra);
    ``defectscope evaluate MODEL.onnx DATA``: an exported model through the runtime (torch-free).  A first
    argument that is neither an option nor an override is a path: a checkpoint there is pointed to
    ``ckpt_path=``, anything else goes to the exported-model evaluation, which says what it is."""
    first = str(argv[0]) if argv else ""
    a_path_first = bool(first) and not first.startswith("-") and not _is_override(first)
    usage = "defectscope evaluate MODEL.onnx DATA, or defectscope evaluate ckpt_path=CHECKPOINT [data=...]"
    problem = None
    if a_path_first and (first.lower().endswith(".ckpt") or checkpoint_file_problem(first) is None):
        problem = checkpoint_file_problem(first) or (
            f"{first} is a training checkpoint: defectscope evaluate ckpt_path={first} scores its own test split "
            "(add data=folder data.source.root=LOT for a new lot)"
        )
    elif a_path_first and not first.lower().endswith(".onnx") and not os.path.lexists(first):
        problem = f"{first}: no such file; expected {usage}"
    if problem:
        print(error_line("defectscope evaluate", problem), file=sys.stderr)
        return 2
    if a_path_first or any(_names_onnx_model(str(arg)) for arg in argv):
        from defectscope.evaluation.cli import main

        return main(argv)
    from ..training.app import evaluate_checkpoint_main

    return evaluate_checkpoint_main(argv)
