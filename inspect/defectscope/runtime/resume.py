"""``--resume``: which inputs already have a row, and a results file whose rows name the inputs another way.

Rows and inputs are matched by :func:`~.files.absolute_path` of the path as typed.  A run resumed from another
folder, or through a link to the image folder, names the same files differently: every image would get a
second row.  :func:`resume_spelling_problem` finds that on the first inputs, before any is inspected.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .files import absolute_path
from .results import RunStamp, check_same_run, iter_rows

#: inputs looked at before the run for a results file that names them another way
PEEK_INPUTS = 64


def load_done(path: str | os.PathLike[str], stamp: RunStamp) -> Counter[str]:
    """How many rows each input already has; refuses a file of another model or threshold.

    Rows and inputs are matched by :func:`absolute_path` (``..`` kept, so two files never share a key):
    ``./a.png`` and ``a.png``, or a list given as ``@./l.txt`` and ``@l.txt``, are one input.  A string
    rule: a file that vanished since still matches its row."""
    done: Counter[str] = Counter()
    for lineno, row in enumerate(iter_rows(path), 1):
        check_same_run(row, stamp, f"{path} (row {lineno})")
        done[absolute_path(row["path"])] += 1
    return done


def skip_done(paths: Iterator[str], done: Counter[str]) -> Iterator[str]:
    """Drop inputs that already have a row; a path listed k times is skipped at most k times."""
    for p in paths:
        key = absolute_path(p)
        if done.get(key, 0) > 0:
            done[key] -= 1
            continue
        yield p


def resume_spelling_problem(
    paths: Iterator[str], done: Counter[str], out: str | os.PathLike[str]
) -> tuple[Iterator[str], str | None]:
    """The inputs (unchanged) and why resuming them would give files second rows, or None.

    When none of the first inputs has a row, each is compared with the rows whose files do not exist from
    here: the same file through a link, or an input path that ends with a row's relative path (the first
    run was started in another folder)."""
    head = list(itertools.islice(paths, PEEK_INPUTS))
    rest = itertools.chain(head, paths)
    if not head or not done or any(absolute_path(p) in done for p in head):
        return rest, None
    here = absolute_path(".") + os.sep
    real = {os.path.realpath(k): k for k in done if os.path.exists(k)}
    tails = {k[len(here) :]: k for k in done if k.startswith(here) and not os.path.exists(k)}
    for p in head:
        resolved = os.path.realpath(absolute_path(p))
        row = real.get(resolved) or next((tails[t] for t in _tails(resolved) if t in tails), None)
        if row is not None:
            return rest, (
                f"--resume: {out} has a row for this image under another name (row {row}, input {p}): every "
                "image would get a second row; resume from the folder and with the input spelling of the first "
                "run, or leave out --resume to start the file over"
            )
    return rest, None


def _tails(path: str) -> Iterator[str]:
    """``a/b/c.png`` -> ``c.png``, ``b/c.png``, ``a/b/c.png`` (without the leading separator)."""
    parts = Path(path).parts[1:]
    for start in range(len(parts) - 1, -1, -1):
        yield os.path.join(*parts[start:])
