"""The ``ordinal.*`` settings: which objective, which grading rule, checked without torch (the objectives'
losses: :mod:`.ordinal`).  Names are looked up in :data:`OBJECTIVES`; nothing is built from a string read
out of a file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..runtime.grading import CUTS_FOR, RULES, GradingError, checked_cuts_for
from .config import config_number


class ObjectiveError(ValueError):
    """The ``ordinal`` settings do not fit the classes (ordinal objective without ordered grades)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    link: str  # how raw outputs become probabilities (defectscope.models.corn.LINKS)
    rule: str  # the grading rule it ships with by default
    ordinal: bool  # needs ordered grades


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "ce": ObjectiveSpec("softmax", "argmax", False),
    "soft": ObjectiveSpec("softmax", "argmax", True),
    "expected": ObjectiveSpec("softmax", "cuts", True),
    "corn": ObjectiveSpec("corn", "median", True),
}
#: ``ordinal.objective: auto`` with ordered grades (the measured best on ELPV, docs/benchmarks.md)
DEFAULT_ORDINAL = "soft"
AUTO = "auto"


@dataclass(frozen=True)
class ObjectiveChoice:
    """The checked ``ordinal.*`` settings: the objective, its grading rule and numbers (its loss: :class:`~.ordinal.Objective`)."""

    name: str = "ce"
    rule: str = "argmax"
    ordered: bool = False
    soft_beta: float = 2.0
    expected_ce: float = 0.5
    label_smoothing: float = 0.0
    cuts_for: str = CUTS_FOR[0]  # what the ``cuts`` rule's cut points maximise on validation

    @property
    def link(self) -> str:
        return OBJECTIVES[self.name].link


def choose_objective(
    spec: Mapping[str, Any] | None, ordered: bool, label_smoothing: float = 0.0
) -> ObjectiveChoice:
    """``ordinal.*`` from the config, checked without torch; errors name the key and the choices."""
    cfg = dict(spec or {})
    name = str(cfg.get("objective") or AUTO)
    if name == AUTO:
        name = DEFAULT_ORDINAL if ordered else "ce"
    if name not in OBJECTIVES:
        raise ObjectiveError(
            f"ordinal.objective must be auto or one of {', '.join(OBJECTIVES)}, got {name!r}"
        )
    if OBJECTIVES[name].ordinal and not ordered:
        raise ObjectiveError(
            f"ordinal.objective={name} needs ordered grades: set data.ordered=true (the class order is then "
            "the grade order, best first) or use ordinal.objective=ce"
        )
    rule = str(cfg.get("rule") or AUTO)
    rule = OBJECTIVES[name].rule if rule == AUTO else rule
    if rule not in RULES:
        raise ObjectiveError(f"ordinal.rule must be auto or one of {', '.join(RULES)}, got {rule!r}")
    if rule != "argmax" and not ordered:
        raise ObjectiveError(f"ordinal.rule={rule} grades ordered classes only: set data.ordered=true")
    beta = config_number(cfg.get("soft_beta", 2.0), "ordinal.soft_beta", "a number > 0", lambda x: x > 0)
    weight = config_number(
        cfg.get("expected_ce", 0.5), "ordinal.expected_ce", "a number >= 0", lambda x: x >= 0
    )
    try:
        given = cfg.get("cuts_for")
        cuts_for = checked_cuts_for(CUTS_FOR[0] if given is None else given, "ordinal.cuts_for")
    except GradingError as exc:
        raise ObjectiveError(str(exc)) from None
    if cuts_for != CUTS_FOR[0] and rule != "cuts":
        raise ObjectiveError(f"ordinal.cuts_for={cuts_for} applies to ordinal.rule=cuts; the rule is {rule}")
    return ObjectiveChoice(name, rule, ordered, beta, weight, float(label_smoothing), cuts_for)
