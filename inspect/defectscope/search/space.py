"""The search space: ``search.space`` in YAML, mirroring the training config it changes.

Each leaf names a config key by its place in the tree and says how to sample it::

    search:
      space:
        optim: {optimizer: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}   # float range, log scale
        model:
          act: {choices: [relu, silu]}                                      # categorical
          widths: [{low: 8, high: 32, step: 8}, {low: 16, high: 64, step: 8}]  # one per list element

``{low, high[, log, step]}`` is an int range when ``low``, ``high`` (and ``step``) are integers, else a
float range; ``{choices: [...]}`` picks one of scalar values (``null`` included); a list gives one
parameter per element of the config list it mirrors; ``null`` leaves a key out. The Optuna parameter
name is the config key (``model.widths[0]``), so a trial's parameters are its overrides.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from .errors import SearchConfigError

SPEC_KEYS = frozenset({"low", "high", "log", "step", "choices"})
MISSING = object()


@dataclass(frozen=True)
class Param:
    """One searched config key and its Optuna distribution."""

    name: str
    distribution: BaseDistribution

    @property
    def key(self) -> str:
        """How the parameter is written in the space (for error messages)."""
        return f"search.space.{self.name}"

    @property
    def model_kwarg(self) -> str | None:
        """``model.widths[0]`` -> ``widths``; None for keys outside ``model``."""
        if not self.name.startswith("model."):
            return None
        return self.name[len("model.") :].split(".")[0].split("[")[0]

    def candidates(self) -> list[Any]:
        """The values that bound this parameter: every choice, or both ends of a range."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        assert isinstance(d, IntDistribution | FloatDistribution)
        return [d.low, d.high]

    def contains(self, value: Any) -> bool:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return value in d.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        assert isinstance(d, IntDistribution | FloatDistribution)
        if isinstance(d, IntDistribution) and value != int(value):
            return False
        return bool(d.low <= value <= d.high)


# ---------------------------------------------------------------------------- parsing


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _range(name: str, spec: Mapping[str, Any]) -> BaseDistribution:
    key = f"search.space.{name}"
    low: Any = spec.get("low")
    high: Any = spec.get("high")
    step: Any = spec.get("step")
    log = bool(spec.get("log", False))
    if not (_is_number(low) and _is_number(high)):
        raise SearchConfigError(f"{key}: low and high must both be numbers, got low={low!r} high={high!r}")
    if low > high:
        raise SearchConfigError(f"{key}: inverted range, low={low} is above high={high}")
    if low == high:
        raise SearchConfigError(
            f"{key}: empty range (low == high == {low}); to fix the value set it as a normal override "
            f"and drop it from the space with ~{key}"
        )
    if step is not None and (not _is_number(step) or step <= 0):
        raise SearchConfigError(f"{key}: step must be a positive number, got {step!r}")
    if log and low <= 0:
        raise SearchConfigError(f"{key}: log: true needs low > 0, got low={low}")
    if log and step is not None:
        raise SearchConfigError(f"{key}: log and step exclude each other (Optuna samples one or the other)")
    if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
        if step is not None and (high - low) % step:
            raise SearchConfigError(f"{key}: high - low = {high - low} is not a multiple of step={step}")
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _choices(name: str, choices: Any) -> BaseDistribution:
    key = f"search.space.{name}"
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise SearchConfigError(f"{key}: choices must be a non-empty list, got {choices!r}")
    bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
    if bad:
        raise SearchConfigError(
            f"{key}: choices must be scalars (number, string, bool or null), got {bad[0]!r}"
        )
    if len(set(map(repr, choices))) != len(choices):
        raise SearchConfigError(f"{key}: choices {list(choices)} repeat a value")
    return CategoricalDistribution(list(choices))


def _leaf(name: str, spec: Mapping[str, Any]) -> Param:
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SearchConfigError(
            f"search.space.{name}: unknown field(s) {', '.join(unknown)}; a parameter is "
            "{low, high[, log, step]} or {choices: [...]}"
        )
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise SearchConfigError(f"search.space.{name}: choices cannot be combined with low/high/log/step")
        return Param(name, _choices(name, spec["choices"]))
    return Param(name, _range(name, spec))


def _walk(node: Any, name: str, out: list[Param]) -> None:
    if node is None:
        return  # a key left out of the space (`search.space.x=null`)
    if isinstance(node, Mapping):
        if node and set(node) & SPEC_KEYS:
            out.append(_leaf(name, node))
            return
        for k, v in node.items():
            _walk(v, f"{name}.{k}" if name else str(k), out)
        return
    if isinstance(node, Sequence) and not isinstance(node, str) and name:
        for i, v in enumerate(node):
            if v is not None and not isinstance(v, Mapping):
                raise SearchConfigError(
                    f"search.space.{name}[{i}]: expected {{low, high}} or {{choices}}, got {v!r}"
                )
            _walk(v, f"{name}[{i}]", out)
        return
    raise SearchConfigError(
        f"search.space.{name or '<root>'}: expected {{low, high[, log, step]}}, {{choices: [...]}}, a list of "
        f"those or a mapping of config keys, got {node!r}"
    )


def parse_space(space: Any) -> list[Param]:
    """``search.space`` (plain data) -> parameters; raises :class:`SearchConfigError` on bad specs."""
    params: list[Param] = []
    _walk(space, "", params)
    if not params:
        raise SearchConfigError(
            "search.space is empty: give at least one parameter (see conf/search/default.yaml)"
        )
    return params


# ---------------------------------------------------------------------------- config access


def split_name(name: str) -> tuple[str, int | None]:
    """``model.widths[2]`` -> (``model.widths``, 2); ``optim.optimizer.lr`` -> (that, None)."""
    if name.endswith("]") and "[" in name:
        base, index = name[:-1].rsplit("[", 1)
        return base, int(index)
    return name, None


def builder_default(model_name: str, kwarg: str) -> Any:
    """The default a registered model builder gives ``kwarg`` (``MISSING`` when it has none)."""
    from defectscope.models.registry import _get

    param = inspect.signature(_get(model_name)).parameters.get(kwarg)
    if param is None or param.default is inspect.Parameter.empty:
        return MISSING
    return param.default


def base_value(cfg: Any, param: Param) -> Any:
    """The composed config's value of a parameter (the model builder's default if the preset omits it)."""
    from omegaconf import OmegaConf

    base, index = split_name(param.name)
    value = OmegaConf.select(cfg, base, default=MISSING)
    if value is MISSING and param.model_kwarg is not None:
        value = builder_default(str(cfg.model.name), param.model_kwarg)
    if value is MISSING:
        return MISSING
    if index is None:
        return value
    return list(value)[index] if value is not None and index < len(value) else MISSING


def check_keys(params: Sequence[Param], cfg: Any) -> None:
    """Every key outside ``model`` must exist in the composed config (``model`` keys are the registry's)."""
    from omegaconf import OmegaConf

    for p in params:
        base, index = split_name(p.name)
        if p.model_kwarg is not None:
            continue  # the model registry decides which kwargs exist (checked by building the model)
        value = OmegaConf.select(cfg, base, default=MISSING)
        if value is MISSING:
            parent = base.rsplit(".", 1)[0] if "." in base else ""
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            keys = ", ".join(sorted(str(k) for k in node)) if OmegaConf.is_dict(node) else "none"
            raise SearchConfigError(
                f"{p.key}: unknown parameter: the config has no key {base!r} (keys under {parent or 'the root'}: {keys})"
            )
        if index is not None and (not OmegaConf.is_list(value) or index >= len(value)):
            raise SearchConfigError(f"{p.key}: {base} is {value!r}, which has no element {index}")
        if index is None and (OmegaConf.is_dict(value) or OmegaConf.is_list(value)):
            raise SearchConfigError(
                f"{p.key}: {base} is a whole {type(value).__name__}; search its elements or keys"
            )


def apply_values(cfg: Any, values: Mapping[str, Any]) -> None:
    """Write sampled values into a composed config (in place); keys the preset omits are added."""
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        for name, value in values.items():
            base, index = split_name(name)
            if index is not None and OmegaConf.select(cfg, base, default=None) is None:
                default = builder_default(str(cfg.model.name), base.split(".")[1])
                OmegaConf.update(cfg, base, list(default), force_add=True)
            OmegaConf.update(cfg, name, value, force_add=True)


def suggest(trial: Any, params: Sequence[Param]) -> dict[str, Any]:
    """Sample every parameter through Optuna's public ``suggest_*`` API."""
    values: dict[str, Any] = {}
    for p in params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            values[p.name] = trial.suggest_categorical(p.name, list(d.choices))
        elif isinstance(d, IntDistribution):
            values[p.name] = trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
        else:
            assert isinstance(d, FloatDistribution)
            values[p.name] = trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)
    return values


def seed_values(cfg: Any, params: Sequence[Param], preset: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameter values of the composed config, with a model preset's values on top."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(cfg, {"model": dict(preset)}) if preset is not None else cfg
    return {p.name: base_value(merged, p) for p in params}


def out_of_space(params: Sequence[Param], values: Mapping[str, Any]) -> list[str]:
    """``name=value`` for each value a parameter's distribution does not contain (or that is missing)."""
    bad = []
    for p in params:
        v = values.get(p.name, MISSING)
        if v is MISSING:
            bad.append(f"{p.name} (not set)")
        elif not p.contains(v):
            bad.append(f"{p.name}={v!r}")
    return bad
