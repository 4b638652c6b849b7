"""``search.*`` (conf/search/default.yaml) read into one checked, typed object."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..plain import expect, whole_number
from .errors import SearchConfigError
from .measure import LatencySettings

SAMPLERS = ("tpe", "nsga2", "random")
#: optional third objective (minimised) -> the trial user attribute it reads
EXTRA_OBJECTIVES = ("params", "flops", "onnx_bytes")
LATENCY = "latency_ms"


def _whole(key: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    return whole_number(value, f"search.{key}", minimum, allow_none)


def _positive(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise SearchConfigError(f"search.{key} must be null or a number > 0, got {value!r}")
    return float(value)


def _at_least_zero(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise SearchConfigError(f"search.{key} must be a number >= 0, got {value!r}")
    return float(value)


def _section(key: str, value: Any) -> dict[str, Any]:
    """A nested settings block (``search.stopping``); null is the defaults."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SearchConfigError(f"search.{key} must be a mapping of settings, got {value!r}")
    return dict(value)


def _list(key: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise SearchConfigError(f"search.{key} must be a list, got {value!r}")
    return list(value)


def _names(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SearchConfigError(f"search.{key} must be a list of names, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Stopping:
    """Early stopping at rung epochs (see :mod:`.stopping`); no rungs = off."""

    rungs: tuple[int, ...] = (2, 4)
    min_delta: float = 0.0


@dataclass(frozen=True)
class SearchSettings:
    study_name: str
    storage: str
    n_trials: int
    timeout: float | None
    metric: str
    direction: str
    extra_objective: str | None
    max_latency_ms: float | None
    sampler: str
    startup_trials: int
    population: int
    sampler_seed: int | None
    presets: tuple[str, ...]
    test_trials: bool
    parity_images: int
    heartbeat_s: int
    grace_s: int
    retry_interrupted: int
    latency: LatencySettings = field(default_factory=LatencySettings)
    stopping: Stopping = field(default_factory=Stopping)

    @property
    def objectives(self) -> list[str]:
        """Objective names in study order: the metric, latency, then the optional extra one."""
        return [self.metric, LATENCY] + ([self.extra_objective] if self.extra_objective else [])

    @property
    def directions(self) -> list[str]:
        return [self.direction] + ["minimize"] * (len(self.objectives) - 1)

    @classmethod
    def from_config(cls, spec: Any) -> SearchSettings:
        s = dict(spec or {})
        known = {f.name for f in fields(cls)} | {"space"}
        unknown = sorted(set(s) - known)
        if unknown:
            raise SearchConfigError(
                f"search: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}"
            )
        metric = str(s.get("metric") or "")
        if not metric.startswith("val/"):
            raise SearchConfigError(
                f"search.metric must be a validation metric such as val/bal_acc, got {metric!r} "
                "(test metrics must not choose models)"
            )
        direction = str(s.get("direction", "maximize"))
        if direction not in ("maximize", "minimize"):
            raise SearchConfigError(f"search.direction must be maximize or minimize, got {direction!r}")
        extra = s.get("extra_objective")
        if extra is not None and extra not in EXTRA_OBJECTIVES:
            raise SearchConfigError(
                f"search.extra_objective must be null or one of {', '.join(EXTRA_OBJECTIVES)}"
            )
        sampler = str(s.get("sampler", "tpe"))
        if sampler not in SAMPLERS:
            raise SearchConfigError(f"search.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        stop = _section("stopping", s.get("stopping"))
        if set(stop) - {"rungs", "min_delta"}:
            raise SearchConfigError(
                f"search.stopping: unknown key(s) {sorted(set(stop) - {'rungs', 'min_delta'})}"
            )
        rungs = tuple(
            _whole("stopping.rungs[]", r, 1) or 1 for r in _list("stopping.rungs", stop.get("rungs"))
        )
        storage = str(s.get("storage") or "")
        if storage.split("?")[0] in ("sqlite://", "sqlite:///:memory:"):
            raise SearchConfigError(
                f"search.storage={storage!r} is an in-memory database: the study would vanish with this process "
                "(no resuming, no second worker) and Optuna's heartbeat cannot use it; give a file such as "
                "sqlite:///search.db"
            )
        if not storage:
            raise SearchConfigError(
                "search.storage is empty; give a database URL such as sqlite:///search.db"
            )
        return cls(
            study_name=str(s.get("study_name") or "defectscope"),
            storage=storage,
            n_trials=int(_whole("n_trials", s.get("n_trials", 20), 1) or 1),
            timeout=_positive("timeout", s.get("timeout")),
            metric=metric,
            direction=direction,
            extra_objective=extra,
            max_latency_ms=_positive("max_latency_ms", s.get("max_latency_ms")),
            sampler=sampler,
            startup_trials=int(_whole("startup_trials", s.get("startup_trials", 6), 0) or 0),
            population=int(_whole("population", s.get("population", 16), 2) or 2),
            sampler_seed=_whole("sampler_seed", s.get("sampler_seed"), 0, allow_none=True),
            presets=_names("presets", s.get("presets")),
            test_trials=expect(s.get("test_trials", False), bool, "search.test_trials", "true or false"),
            parity_images=int(_whole("parity_images", s.get("parity_images", 8), 0) or 0),
            heartbeat_s=int(_whole("heartbeat_s", s.get("heartbeat_s", 20), 1) or 1),
            grace_s=int(_whole("grace_s", s.get("grace_s", 60), 1) or 1),
            retry_interrupted=int(_whole("retry_interrupted", s.get("retry_interrupted", 1), 0) or 0),
            latency=LatencySettings.from_config(_section("latency", s.get("latency"))),
            stopping=Stopping(
                rungs=rungs, min_delta=_at_least_zero("stopping.min_delta", stop.get("min_delta", 0.0))
            ),
        )
