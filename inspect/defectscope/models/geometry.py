"""Spatial geometry derived from the layers themselves: minimum input size and total stride.

Every conv and pool on the feature path changes the spatial size by

    output = ⌊(x + 2p − d(f−1) − 1)/s⌋ + 1      (= ⌊(x + 2p − f)/s⌋ + 1 when d = 1)

so walking those layers in dataflow order gives the total stride (product of s) and, run
backwards from "one output pixel", the smallest input that still yields a non-empty map.  A layer
that pads by reflection also needs an input larger than its padding (``SizeOp.min_input``).
Blocks with parallel branches (residual blocks) implement ``size_ops(prefix)`` and report
their main path only; the branch agreement is checked when the block is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

from .errors import ModelConfigError

FORMULA = "output = ⌊(x + 2p − d(f−1) − 1)/s⌋ + 1  (= ⌊(x + 2p − f)/s⌋ + 1 for dilation d = 1)"


@dataclass(frozen=True)
class SizeOp:
    """One size-changing layer: kernel f, stride s, padding p, dilation d (square only).

    ``min_input``: the smallest input length the layer runs on at all (reflection padding of p
    pixels needs more than p); a smaller input counts as an empty output.
    """

    name: str
    kind: str
    kernel: int
    stride: int
    padding: int
    dilation: int = 1
    min_input: int = 1

    def out_size(self, x: int) -> int:
        """Output length for input length ``x``; <= 0 means the map is empty (or cannot be padded)."""
        if x < self.min_input:
            return 0
        return (x + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def min_in_size(self, out: int) -> int:
        """Smallest input length giving at least ``out`` output positions."""
        need = (out - 1) * self.stride + self.dilation * (self.kernel - 1) + 1 - 2 * self.padding
        return max(1, self.min_input, need)

    def describe(self) -> str:
        text = f"{self.kind} f={self.kernel} s={self.stride} p={self.padding} d={self.dilation}"
        return text + (f" in>={self.min_input}" if self.min_input > 1 else "")


def padding_min_input(padding: int, mode: str) -> int:
    """Smallest input side a padding of ``padding`` px accepts: reflection needs padding < side."""
    return padding + 1 if mode == "reflect" and padding > 0 else 1


@runtime_checkable
class HasSizeOps(Protocol):
    def size_ops(self, prefix: str) -> list[SizeOp]: ...


def _square(value: object, what: str, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    raise ModelConfigError(
        f"{name}: non-square or symbolic {what} {value!r} is not supported by the geometry walk"
    )


def _leaf_op(name: str, module: nn.Module) -> SizeOp | None:
    if isinstance(module, nn.Conv2d):
        padding = _square(module.padding, "padding", name)
        return SizeOp(
            name,
            "conv",
            _square(module.kernel_size, "kernel", name),
            _square(module.stride, "stride", name),
            padding,
            _square(module.dilation, "dilation", name),
            min_input=padding_min_input(padding, module.padding_mode),
        )
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode:
            raise ModelConfigError(f"{name}: ceil_mode pooling is not supported by the geometry walk")
        return SizeOp(
            name,
            "maxpool",
            _square(module.kernel_size, "kernel", name),
            _square(module.stride, "stride", name),
            _square(module.padding, "padding", name),
            _square(module.dilation, "dilation", name),
        )
    if isinstance(module, nn.AvgPool2d):
        if module.ceil_mode:
            raise ModelConfigError(f"{name}: ceil_mode pooling is not supported by the geometry walk")
        return SizeOp(
            name,
            "avgpool",
            _square(module.kernel_size, "kernel", name),
            _square(module.stride, "stride", name),
            _square(module.padding, "padding", name),
        )
    return None


def collect_size_ops(module: nn.Module, prefix: str = "") -> list[SizeOp]:
    """Size-changing layers of ``module`` in dataflow order (children in registration order)."""
    if isinstance(module, HasSizeOps) and not isinstance(module, nn.Conv2d):
        return module.size_ops(prefix)
    leaf = _leaf_op(prefix or type(module).__name__, module)
    if leaf is not None:
        return [leaf]
    ops: list[SizeOp] = []
    for child_name, child in module.named_children():
        ops.extend(collect_size_ops(child, f"{prefix}.{child_name}" if prefix else child_name))
    return ops


def total_stride(ops: Iterable[SizeOp]) -> int:
    stride = 1
    for op in ops:
        stride *= op.stride
    return stride


def min_input_size(ops: list[SizeOp], min_output: int = 1) -> int:
    """Smallest square input side whose feature map is at least ``min_output``×``min_output``."""
    need = min_output
    for op in reversed(ops):
        need = op.min_in_size(need)
    return need


def trace_sizes(ops: list[SizeOp], size: int) -> list[tuple[SizeOp, int, int]]:
    """(layer, input length, output length) for each layer; stops after the first empty output."""
    rows = []
    x = size
    for op in ops:
        out = op.out_size(x)
        rows.append((op, x, out))
        if out < 1:
            break
        x = out
    return rows


def format_trace(rows: list[tuple[SizeOp, int, int]]) -> str:
    lines = []
    for op, x, out in rows:
        mark = "   <- EMPTY" if out < 1 else ""
        formula = f"⌊({x} + 2·{op.padding} − {op.dilation}·({op.kernel}−1) − 1)/{op.stride}⌋ + 1"
        lines.append(f"  {op.name:<32} {op.describe():<28} {x:>5} -> {max(out, 0):<5} {formula}{mark}")
    return "\n".join(lines)


def branch_sizes_agree(main: list[SizeOp], branch: list[SizeOp], upto: int = 97) -> bool:
    """True when both paths give equal output sizes for every input 1..upto that the main path accepts."""
    for x in range(1, upto + 1):
        a = b = x
        for op in main:
            a = op.out_size(a)
        for op in branch:
            b = op.out_size(b)
        if a >= 1 and a != b:
            return False
    return True


def check_input_size(model: nn.Module, size: int) -> None:
    """Raise ``ModelConfigError`` with the layer-by-layer sizes if a ``size``×``size`` input empties the map."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelConfigError(f"min_size must be a positive integer, got {size!r}")
    ops = getattr(model, "size_ops_cache", None)
    if ops is None:
        ops = collect_size_ops(getattr(model, "features", model))
    rows = trace_sizes(ops, size)
    need_out = int(getattr(model, "min_feature_size", 1))
    if rows and 1 <= rows[-1][2] < need_out:
        need = min_input_size(ops, need_out)
        raise ModelConfigError(
            f"min_size={size}: a {size}×{size} input leaves a {rows[-1][2]}×{rows[-1][2]} feature map in "
            f"{type(model).__name__}, whose InstanceNorm layers need at least {need_out}×{need_out} to normalise "
            f"over (its min_input_size is {need}).\nLayer-by-layer sizes, {FORMULA}:\n{format_trace(rows)}\n"
            f"Raise the loader's min_size to >= {need}, or use another norm."
        )
    if rows and rows[-1][2] < 1:
        need = min_input_size(ops)
        raise ModelConfigError(
            f"min_size={size}: a {size}×{size} input leaves an empty feature map in {type(model).__name__} "
            f"(its min_input_size is {need}).\nLayer-by-layer sizes, {FORMULA}:\n{format_trace(rows)}\n"
            f"Raise the loader's min_size to >= {need}, or use smaller kernels/strides or 'same' padding."
        )
