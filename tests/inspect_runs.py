"""Test helper: `defectscope inspect` run in-process, and the rows it wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defectscope.runtime.cli import main


def rows_of(path: Path) -> list[dict[str, Any]]:
    """The JSONL rows of a results file, in file order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(*argv: object) -> int:
    """``defectscope inspect ARGV`` in this process; its exit status."""
    return main([str(a) for a in argv])
