"""Fold eval-mode BatchNorm into the convolution that feeds it.

A BatchNorm after a convolution is an affine map per channel once its statistics are frozen, so it
can be absorbed into the conv's weight and bias: the exported graph then has one op fewer per
block and nothing the line runtime has to get right about BN's epsilon.

Conv -> BN edges are found on the data-flow graph, not by module order: a BN is only folded when
its input is the output of a plain ``nn.Conv2d`` *and* that output has no other user (otherwise a
residual branch that reads the pre-BN tensor would change).  The graph comes from a
``torch.fx`` symbolic trace; models that fx cannot trace (shape checks in ``forward``, ...) are
traced by running one example input through them instead.  Folding happens on a deep copy and the
BN module is swapped for ``nn.Identity`` in place, so the result keeps its class and every method
(``forward_features``, ``cam``, ...).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "ChannelAffine",
    "FuseReport",
    "fold_bn_into_conv",
    "fuse_conv_bn",
    "fuse_conv_bn_report",
    "replace_bn_with_affine",
]


@dataclass
class FuseReport:
    """What the pass did: folded (conv, bn) pairs and the BNs it had to keep, with the reason."""

    fused: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    method: str = "fx"

    def summary(self) -> str:
        text = f"folded {len(self.fused)} BatchNorm layer(s) into convolutions (graph: {self.method})"
        if self.kept:
            text += "; kept " + ", ".join(f"{bn} ({why})" for bn, why in self.kept)
        return text


def _is_plain_conv(m: nn.Module) -> bool:
    """A Conv2d whose forward is the stock one: weight-standardised or otherwise custom convs
    recompute their effective weight every call, so folding into ``weight`` would be wrong."""
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and type(m)._conv_forward is nn.Conv2d._conv_forward
    )


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))


def _foldable_bn(bn: nn.Module) -> str | None:
    """Why this BN cannot be folded, or None when it can."""
    if type(bn).forward not in (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return "custom BatchNorm forward"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False uses batch statistics)"
    return None


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """W' = γ·W/σ, b' = γ·(b−μ)/σ + β with σ = sqrt(var+eps); computed in float64, in place."""
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = conv.weight.dtype
    mean = bn.running_mean.double()
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / sigma
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight.copy_(weight.to(dtype))
    new_bias = ((bias - mean) * scale + beta).to(dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


# -- graph discovery ------------------------------------------------------------------------------


@dataclass
class _Edges:
    """Candidate conv -> bn pairs plus per-module call counts from one trace."""

    pairs: list[tuple[str, str]]
    shared_output: set[str]  # BNs whose conv input also feeds something else
    calls: Counter[str]
    used_bns: set[str]


def _edges_fx(model: nn.Module, report: FuseReport) -> _Edges:
    """Symbolic trace of ``forward`` (falling back to ``forward_features``)."""
    import torch.fx

    tracer = torch.fx.Tracer()
    prefix = ""
    try:
        graph = tracer.trace(model)
    except Exception:
        if not hasattr(model, "forward_features"):
            raise
        graph = tracer.trace(_FeaturesOnly(model))
        prefix = "m."  # module paths under the wrapper
        report.method = "fx (forward_features)"
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter()
    pairs: list[tuple[str, str]] = []
    shared: set[str] = set()
    used_bns: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)[len(prefix) :]
        calls[target] += 1
        if not _is_batchnorm(modules[target]):
            continue
        used_bns.add(target)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        src_target = str(src.target)[len(prefix) :]
        if not _is_plain_conv(modules[src_target]):
            continue
        if len(src.users) != 1:
            shared.add(target)
            continue
        pairs.append((src_target, target))
    return _Edges(pairs, shared, calls, used_bns)


class _FeaturesOnly(nn.Module):
    """Traces ``forward_features`` when ``forward`` itself is not fx-traceable."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> Any:
        m: Any = self.m
        return m.forward_features(x)


class _UseCounter(TorchFunctionMode):
    """Counts how often each recorded conv output is read by any torch op outside BN internals."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self.uses: Counter[int] = Counter()
        self.inside_bn = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.inside_bn:
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.outputs:
                    self.uses[id(leaf)] += 1
        return func(*args, **(kwargs or {}))


def _edges_run(model: nn.Module, example: torch.Tensor) -> _Edges:
    """Data-flow edges observed while running ``example`` through the model (hooks + op counting)."""
    counter = _UseCounter()
    calls: Counter[str] = Counter()
    bn_inputs: list[tuple[str, int]] = []
    handles = []

    def conv_hook(name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                counter.outputs[id(out)] = (name, out)  # keeps `out` alive so ids stay unique

        return hook

    def bn_pre(name: str) -> Any:
        def hook(_m: nn.Module, inp: Any) -> None:
            calls[name] += 1
            src = inp[0] if inp else None
            if isinstance(src, torch.Tensor) and id(src) in counter.outputs:
                counter.uses[id(src)] += 1  # the BN itself is one user
                bn_inputs.append((name, id(src)))
            counter.inside_bn += 1

        return hook

    def bn_post(_m: nn.Module, _inp: Any, _out: Any) -> None:
        counter.inside_bn -= 1

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif _is_batchnorm(m):
            handles.append(m.register_forward_pre_hook(bn_pre(name)))
            handles.append(m.register_forward_hook(bn_post))
        elif len(list(m.children())) == 0:
            handles.append(m.register_forward_pre_hook(lambda *_a, _n=name: calls.update([_n])))
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    shared: set[str] = set()
    for bn_name, tid in bn_inputs:
        conv_name = counter.outputs[tid][0]
        if not _is_plain_conv(modules[conv_name]):
            continue
        if counter.uses[tid] != 1:
            shared.add(bn_name)
            continue
        pairs.append((conv_name, bn_name))
    return _Edges(pairs, shared, calls, {n for n in calls if _is_batchnorm(modules[n])})


def _example_input(model: nn.Module) -> torch.Tensor:
    chans = int(getattr(model, "in_chans", 3))
    size = max(int(getattr(model, "min_input_size", 32)), 32)
    p = next(iter(model.parameters()), None)
    return torch.randn(1, chans, size, size, dtype=p.dtype if p is not None else torch.float32)


# -- the pass -------------------------------------------------------------------------------------


def fuse_conv_bn_report(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> tuple[nn.Module, FuseReport]:
    """Deep-copy ``model``, put it in eval mode and fold every conv-fed BN; returns (copy, report).

    ``example_input`` is only used when fx cannot trace the model (default: one random image of
    ``model.min_input_size`` with ``model.in_chans`` channels).
    """
    fused = copy.deepcopy(model).eval()
    report = FuseReport()
    try:
        edges = _edges_fx(fused, report)
    except Exception as exc:  # not fx-traceable: observe the data flow on a real input instead
        report.method = f"run (fx trace failed: {type(exc).__name__})"
        edges = _edges_run(fused, example_input if example_input is not None else _example_input(fused))

    modules = dict(fused.named_modules())
    for conv_name, bn_name in edges.pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        why = _foldable_bn(bn)
        if why is None and (edges.calls[conv_name] != 1 or edges.calls[bn_name] != 1):
            why = "conv or BN is called more than once per forward"
        if why is not None:
            report.kept.append((bn_name, why))
            continue
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
        fold_bn_into_conv(conv, bn)
        _set_submodule(fused, bn_name, nn.Identity())
        report.fused.append((conv_name, bn_name))

    done = {bn for _, bn in report.fused} | {bn for bn, _ in report.kept}
    for name, m in fused.named_modules():
        if not _is_batchnorm(m) or name in done:
            continue
        if name in edges.shared_output:
            why = "its conv's output has other users"
        elif name in edges.used_bns:
            why = "not preceded by a plain Conv2d"
        else:
            why = "not reached by forward"
        report.kept.append((name, why))
    return fused, report


def fuse_conv_bn(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """Eval-mode copy of ``model`` with BatchNorm folded into preceding convs (original untouched).

    BNs that cannot be folded are kept and reported with a :class:`UserWarning`.
    """
    fused, report = fuse_conv_bn_report(model, example_input)
    if report.kept:
        warnings.warn(report.summary(), stacklevel=2)
    return fused


class ChannelAffine(nn.Module):
    """Frozen eval-mode BatchNorm as ``x * scale + shift`` (exports as Mul/Add, not BatchNormalization)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            mean = bn.running_mean.double()
            scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -mean * scale + (bn.bias.double() if bn.bias is not None else 0.0)
        dtype = bn.running_var.dtype
        self.register_buffer("scale", scale.to(dtype).reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.to(dtype).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def replace_bn_with_affine(model: nn.Module) -> list[str]:
    """Turn every remaining (unfoldable) BatchNorm into a :class:`ChannelAffine`, in place.

    Used by export after fusion, so the graph has no BatchNormalization node even when a BN has no
    conv to fold into.  BNs without running statistics cannot be frozen and raise ``ValueError``.
    """
    replaced = []
    for name, m in list(model.named_modules()):
        if not _is_batchnorm(m):
            continue
        why = _foldable_bn(m)
        if why is not None:
            raise ValueError(f"BatchNorm {name!r} cannot be frozen for export: {why}")
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        _set_submodule(model, name, ChannelAffine(m))
        replaced.append(name)
    return replaced
