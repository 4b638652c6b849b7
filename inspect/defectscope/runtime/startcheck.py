"""Prove a fresh session at start-up and report where its nodes run.

A session that exists can still fail at its first run: TensorRT builds or loads its engine then,
a kernel can be missing for a size, fp16 can overflow.  :func:`exercise` runs the session once at
each edge of the input range the runner will feed it, so such a failure falls back (or stops the
command) before the first image, not in the middle of a lot.

Where the nodes run comes from ONNX Runtime's own record (``get_provider_graph_assignment_info``,
onnxruntime >= 1.24) or, on older versions, from a profiling trace of that same start-up run, in
which a TensorRT subgraph appears as one kernel.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metadata import INPUT_NAME
from .ortlog import first_line
from .providers import short_name

#: Warn when fewer than this share of the nodes run on the provider the session was opened for.
PLACEMENT_WARN_SHARE = 0.9


class StartCheckError(RuntimeError):
    """The session failed its start-up run."""


class OutputWidthError(StartCheckError):
    """The graph gives another number of probabilities than the metadata names classes: a problem of the
    model file on every provider, not one to fall back from."""


@dataclass(frozen=True)
class Placement:
    """Nodes (or profiled kernels) per provider, short names, for one session."""

    primary: str
    counts: dict[str, int]
    unit: str  # "nodes": ORT's assignment record; "kernels": a profiling trace

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def share(self) -> float:
        return self.counts.get(self.primary, 0) / self.total if self.total else 0.0

    @property
    def text(self) -> str:
        """E.g. ``tensorrt (41 of 43 nodes; cuda 2)``."""
        rest = "".join(f"; {k} {n}" for k, n in sorted(self.counts.items()) if k != self.primary)
        return f"{self.primary} ({self.counts.get(self.primary, 0)} of {self.total} {self.unit}{rest})"

    def warning(self) -> str | None:
        if self.total == 0 or self.share >= PLACEMENT_WARN_SHARE:
            return None
        note = (
            " (onnxruntime < 1.24: a TensorRT subgraph counts as one kernel)"
            if self.unit == "kernels"
            else ""
        )
        return (
            f"only {self.share:.0%} of the model runs on {self.primary}: {self.text}{note}; "
            "the rest is slower, and a result row still says " + repr(self.primary)
        )


def placement_from_assignment(session: Any, primary: str) -> Placement | None:
    """ORT's record of the nodes each provider took; None where this ORT lacks it or did not record."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return None
    counts: Counter[str] = Counter()
    for sub in session.get_provider_graph_assignment_info():
        counts[short_name(sub.ep_name)] += len(sub.get_nodes())
    return Placement(primary, dict(counts), "nodes") if counts else None


def placement_from_profile(path: str, primary: str) -> Placement:
    """Distinct kernels per provider in an ORT profiling trace (the file is deleted)."""
    try:
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    seen: dict[str, str] = {}
    for ev in events:
        args = ev.get("args") or {}
        if (
            ev.get("cat") == "Node"
            and str(ev.get("name", "")).endswith("_kernel_time")
            and args.get("provider")
        ):
            seen[ev["name"]] = short_name(args["provider"])
    return Placement(primary, dict(Counter(seen.values())), "kernels")


def probe_batch(shape: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """A deterministic normalised-looking input (standard normal) of ``shape``."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def exercise(
    session: Any,
    shapes: Sequence[tuple[int, int, int, int]],
    reference: Any | None = None,
    classes: int | None = None,
) -> float | None:
    """Run ``session`` once per shape; returns the largest |probability difference| to ``reference``.

    ``reference`` (a CPU session of the same file) runs the first image of each probe, so the
    figure says how far this provider's numbers are from the shipped graph's on the CPU.  Raises
    :class:`StartCheckError` naming the shape when a run fails, gives non-finite outputs, or gives
    other than ``classes`` probabilities per image.
    """
    worst: float | None = None
    for shape in shapes:
        batch = probe_batch(shape)
        label = "x".join(map(str, shape))
        try:
            outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: batch})))
        except Exception as exc:
            raise StartCheckError(f"start-up run at {label} failed: {first_line(exc, 200)}") from None
        bad = [k for k, v in outs.items() if not np.all(np.isfinite(v))]
        if bad:
            raise StartCheckError(f"start-up run at {label} gave non-finite {', '.join(bad)}")
        width = outs["probs"].shape[-1] if "probs" in outs else None
        if classes is not None and width != classes:
            raise OutputWidthError(
                f"start-up run at {label} gave {width} probabilities per image for {classes} classes"
            )
        if reference is not None and "probs" in outs:
            ref = reference.run(["probs"], {INPUT_NAME: batch[:1]})[0]
            diff = float(np.max(np.abs(outs["probs"][:1].astype(np.float64) - ref)))
            worst = diff if worst is None else max(worst, diff)
    return worst
