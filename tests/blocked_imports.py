"""A child interpreter in which chosen top-level modules cannot be imported (a sitecustomize on
PYTHONPATH installs a meta-path finder that refuses them): how tests prove what a command does not load."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_SITECUSTOMIZE = """
import sys
BLOCKED = {blocked!r}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def blocking_env(
    folder: Path, blocked: Sequence[str], env: Mapping[str, str] | None = None, keep_path: bool = True
) -> dict[str, str]:
    """``env`` (default: this process's) with ``blocked`` unimportable; the sitecustomize goes in
    ``folder/site``.  ``keep_path=False`` drops the rest of PYTHONPATH."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=tuple(blocked)))
    out = dict(os.environ if env is None else env)
    rest = out.get("PYTHONPATH", "") if keep_path else ""
    out["PYTHONPATH"] = os.pathsep.join([str(site), rest]).rstrip(os.pathsep)
    return out
