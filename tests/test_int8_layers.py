"""Which convolutions an int8 export keeps fp32, on hand-built graphs: depth counted from the input on
every path, the CAM head found as the convolution nothing follows, and the default by network depth."""

from __future__ import annotations

import onnx
import pytest

from defectscope.export.int8_step import _gate_failed, try_fp32_counts
from defectscope.export.quantize import (
    Int8Config,
    Int8GateError,
    QuantizationError,
    _exclude,
    conv_depths,
    early_convs,
    fp32_convs_for,
    last_convs,
)


def _graph(nodes: list[onnx.NodeProto], outputs: tuple[str, ...]) -> onnx.GraphProto:
    h = onnx.helper
    w = h.make_tensor("w", onnx.TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    info = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("x", *outputs)]
    return h.make_graph(nodes, "g", info[:1], info[1:], [w])


def _chain(prefix: str, start: str, n: int) -> list[onnx.NodeProto]:
    """``n`` convolutions in a row from tensor ``start``; the last writes ``{prefix}{n}``."""
    names = [start] + [f"{prefix}{i + 1}" for i in range(n)]
    return [
        onnx.helper.make_node("Conv", [names[i], "w"], [names[i + 1]], name=f"{prefix}c{i}") for i in range(n)
    ]


def test_early_convs_counts_convolutions_from_the_input_on_every_path() -> None:
    """Depth is the most convolutions on any path from the input; two copies of a backbone (test-time
    views) each keep their own first layers; a residual join takes its deeper branch; the head (no
    convolution after it, also when a Concat follows, as CORN's) is never among them."""
    h = onnx.helper
    nodes = [
        h.make_node("Conv", ["x", "w"], ["a"], name="stem"),
        h.make_node("Relu", ["a"], ["a_relu"], name="relu"),
        h.make_node("Conv", ["a_relu", "w"], ["b"], name="block1"),
        h.make_node("Conv", ["b", "w"], ["c"], name="block2"),
        h.make_node("Conv", ["x", "w"], ["a2"], name="copy_stem"),
        h.make_node("Add", ["a2", "b"], ["joined"], name="join"),
        h.make_node("Conv", ["joined", "w"], ["d"], name="after_join"),
        h.make_node("Add", ["c", "d"], ["features"], name="merge"),
        h.make_node("Conv", ["features", "w"], ["maps"], name="cam_head"),
        h.make_node("Concat", ["maps", "maps"], ["cam"], name="corn_concat", axis=1),
    ]
    graph = _graph(nodes, ("cam",))
    assert conv_depths(graph) == {
        "stem": 0,
        "block1": 1,
        "block2": 2,
        "copy_stem": 0,
        "after_join": 2,
        "cam_head": 3,
    }
    assert last_convs(graph) == {"cam_head"}
    assert early_convs(graph, 0) == []
    assert early_convs(graph, 1) == ["stem", "copy_stem"]
    assert early_convs(graph, 2) == ["stem", "block1", "copy_stem"]
    assert early_convs(graph, 9) == ["stem", "block1", "block2", "copy_stem", "after_join"]
    assert fp32_convs_for(graph, None) == 0 and fp32_convs_for(graph, 3) == 3
    # kept fp32 whatever N: the CAM head, although only a Concat makes the output
    assert "cam_head" in _exclude(h.make_model(graph), 0)


def test_fp32_convs_default_follows_the_longest_chain_not_the_count() -> None:
    """By default the first 2 convolutions stay fp32 where >= 10 come before the head on one path; two
    test-time passes of a 6-convolution backbone (13 convolutions in all) are still a small network."""
    h = onnx.helper
    deep = _graph([*_chain("t", "x", 11)], ("t11",))  # tc10 is the head, 10 before it
    assert fp32_convs_for(deep, None) == 2 and early_convs(deep, 2) == ["tc0", "tc1"]
    assert sorted(_exclude(h.make_model(deep), None)) == ["tc0", "tc1", "tc10"]
    assert fp32_convs_for(_graph(_chain("t", "x", 10), ("t10",)), None) == 0  # 9 before the head
    views = [*_chain("a", "x", 6), *_chain("b", "x", 6), h.make_node("Add", ["a6", "b6"], ["f"], name="mean")]
    two_passes = _graph([*views, h.make_node("Conv", ["f", "w"], ["cam"], name="head")], ("cam",))
    assert fp32_convs_for(two_passes, None) == 0
    assert early_convs(two_passes, 2) == ["ac0", "ac1", "bc0", "bc1"]  # each pass keeps its own
    nameless = _graph([h.make_node("Conv", ["x", "w"], ["y"])], ("y",))
    with pytest.raises(QuantizationError, match="a convolution without a name"):
        fp32_convs_for(nameless, None)


def _gate_error(agreement: float) -> Int8GateError:
    return Int8GateError(
        f"int8 gate failed on 128 held-back images: ng_agreement = {agreement} < 0.95",
        {"ng_agreement": agreement, "failed": ["ng_agreement"]},
    )


def test_a_failed_default_gate_keeps_more_convolutions_fp32_twice_then_names_what_it_tried() -> None:
    """ELPV's case: Lite models passed the gate with 2, 5 or 8 convolutions fp32, by seed. Where the
    default kept some (a deep network), a failed gate is retried with 3 more, at most twice; the refusal
    then lists every count tried and the next one to ask for."""
    deep = _graph([*_chain("t", "x", 20)], ("t20",))
    auto = Int8Config()
    assert _gate_failed(_gate_error(0.93), deep, auto, {}, [2])[0] == 5
    assert _gate_failed(_gate_error(0.94), deep, auto, {}, [2, 5])[0] == 8
    stop, error = _gate_failed(_gate_error(0.94), deep, auto, {}, [2, 5, 8])
    assert stop is None and error.numbers["fp32_convs_tried"] == [2, 5, 8]
    assert error.numbers["fp32_convs"] == 8 and error.numbers["fp32_conv_nodes"] == 8
    text = str(error)
    assert text.startswith("int8 gate failed on 128 held-back images: ng_agreement = 0.94 < 0.95; ")
    assert "tried keeping the first 2, 5, 8 convolution(s) fp32" in text and "--fp32-convs 11" in text


def test_an_asked_or_small_default_count_is_tried_alone() -> None:
    """--fp32-convs N is what the user chose: one try. A small network's default (0) stays too: there
    the first convolutions are a large share of the compute. Nor is a count retried that keeps no more."""
    deep = _graph([*_chain("t", "x", 20)], ("t20",))
    stop, error = _gate_failed(_gate_error(0.9), deep, Int8Config(fp32_convs=2), {}, [2])
    assert stop is None and "fp32_convs_tried" not in error.numbers and "--fp32-convs 5" in str(error)
    small = _graph([*_chain("t", "x", 3)], ("t3",))
    stop, error = _gate_failed(_gate_error(0.9), small, Int8Config(), {}, [0])
    assert stop is None and "--fp32-convs 3" in str(error)
    stop, error = _gate_failed(_gate_error(0.9), deep, Int8Config(), {}, [2, 5, 8, 19])
    assert stop is None and "more may pass" not in str(error)  # nothing left to keep fp32 after 19
    stop, error = _gate_failed(_gate_error(0.9), deep, Int8Config(), {}, [2, 19])
    assert stop is None and error.numbers["fp32_convs_tried"] == [2, 19]  # 22 would keep no more than 19
    text = str(error)
    assert "tried keeping the first 2, 19 convolution(s) fp32" in text and "more may pass" not in text


def test_the_retry_loop_returns_the_count_that_passed_with_its_own_result() -> None:
    """The quantiser's outcome stands in for a graph that fails the gate below 5 fp32 convolutions
    (ELPV's 30-epoch student of seed 2): the result shipped is the passing try's, one log line per retry."""
    deep = _graph([*_chain("t", "x", 20)], ("t20",))
    lines: list[str] = []

    def attempt(kept: int) -> dict[str, float]:
        if kept < 5:
            raise _gate_error(0.9385)
        return {"threshold": 0.1 + kept}

    tried, earned = try_fp32_counts(2, attempt, deep, Int8Config(), {}, lines.append)
    assert tried == [2, 5] and earned == {"threshold": 5.1}
    assert lines == [
        "int8: the gate failed with the first 2 convolution(s) fp32 (int8 gate failed on 128 held-back "
        "images: ng_agreement = 0.9385 < 0.95); trying 5"
    ]
    lines.clear()
    never = lambda kept: attempt(kept // 10)  # noqa: E731 - a graph no count up to 49 lets pass
    with pytest.raises(Int8GateError, match="tried keeping the first 2, 5, 8") as refused:
        try_fp32_counts(2, never, deep, Int8Config(), {}, lines.append)
    assert len(lines) == 2 and refused.value.numbers["fp32_convs"] == 8
    with pytest.raises(Int8GateError) as alone:  # asked for: one try, no log line
        try_fp32_counts(2, never, deep, Int8Config(fp32_convs=2), {}, lines.append)
    assert len(lines) == 2 and "fp32_convs_tried" not in alone.value.numbers
