"""Torch -> ONNX conversion with dynamic batch/height/width, the checks every exported graph must pass,
and the embedding of the defectscope metadata."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import onnx
import torch

from defectscope.runtime.metadata import INPUT_NAME, METADATA_KEY, ModelMetadata

from .errors import ExportError
from .wrapper import ExportWrapper


def to_onnx(wrapper: ExportWrapper, channels: int, min_side: int, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch, height and width."""
    from torch.export import Dim

    side = max(int(min_side), 32)
    example = torch.randn(2, channels, side + 3, side + 11)
    dims = {
        0: Dim("batch", min=1),
        2: Dim("height", min=int(min_side)),
        3: Dim("width", min=int(min_side)),
    }
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=wrapper.output_names,
                dynamic_shapes={"x": dims},
                external_data=False,
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


def all_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node, including those in local functions and control-flow subgraphs."""
    out: list[onnx.NodeProto] = []

    def walk(nodes: Any) -> None:
        for n in nodes:
            out.append(n)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(proto.graph.node)
    for fn in proto.functions:
        walk(fn.node)
    return out


def check_graph(proto: onnx.ModelProto, outputs: list[str], channels: int, opset: int) -> None:
    """ONNX checker (full), no BatchNormalization left, the I/O the runner expects."""
    onnx.checker.check_model(proto, full_check=True)
    bn = [n.name or n.op_type for n in all_nodes(proto) if n.op_type == "BatchNormalization"]
    if bn:
        raise ExportError(f"exported graph still has {len(bn)} BatchNormalization node(s): {bn[:5]}")
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default or default[0] < opset:
        raise ExportError(f"exported graph has opset {default}, expected >= {opset}")
    ins = [i.name for i in proto.graph.input]
    if ins != [INPUT_NAME]:
        raise ExportError(f"exported graph inputs are {ins}, expected [{INPUT_NAME!r}]")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(shape) != 4 or shape[1] != channels or any(isinstance(s, int) for s in (shape[0], *shape[2:])):
        raise ExportError(f"exported input shape is {shape}, expected (batch, {channels}, height, width)")
    got = [o.name for o in proto.graph.output]
    if got != outputs:
        raise ExportError(f"exported graph outputs are {got}, expected {outputs}")


def set_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Embed (or replace) the defectscope JSON in ``metadata_props``."""
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    proto.doc_string = f"defectscope {meta.model_name}: classes {', '.join(meta.class_names)}"


def with_metadata(data: bytes, meta: ModelMetadata) -> bytes:
    """The serialised model ``data`` with ``meta`` embedded (the graph is unchanged)."""
    proto = onnx.load_from_string(data)
    set_metadata(proto, meta)
    return proto.SerializeToString()
