"""Checks on an ONNX file before ONNX Runtime opens it: a model is data, not a program.

Two things in an ONNX file reach beyond its own bytes, and both are refused unless harmless:

* external data: a tensor may say "my bytes are in file X"; X must be a file inside the model's
  own folder (no absolute path, no ``..``, no symbolic link leading out of it);
* operator domains: a node of a custom domain only runs if a custom-operator library is loaded
  for it; the runtime loads none, so a domain it does not know is refused with its name rather
  than left to a confusing ONNX Runtime error.

The file is read with a small protobuf wire-format walker (numpy/Pillow/onnxruntime only: the
``onnx`` package is not installed on line PCs).  Only the fields that matter are decoded; tensor
payloads are skipped without copying.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from .files import model_load_failure, os_error_reason

#: operator domains ONNX Runtime implements itself ("" and "ai.onnx" are the standard operators)
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")

# field numbers of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ...)
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 4, 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNC_NAME, _FUNC_NODE, _FUNC_DOMAIN = 1, 7, 10
_TRAINING_GRAPHS = (1, 2)
_MAX_DEPTH = 64


class ModelCheckError(ValueError):
    """The ONNX file reaches outside itself or needs code the runtime does not have."""


@dataclass
class _Found:
    external: list[tuple[str, str]] = field(default_factory=list)  # (tensor name, location)
    ops: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type)
    functions: set[tuple[str, str]] = field(default_factory=set)  # local functions (domain, name)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelCheckError("truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one message; length-delimited values are views."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ModelCheckError("truncated protobuf field")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ModelCheckError(f"unsupported protobuf wire type {wire}")


def _text(value: memoryview | int) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in _fields(buf):
        if n == number and wire == 2 and isinstance(value, memoryview):
            yield value


def _tensor(buf: memoryview, found: _Found) -> None:
    name, location, external = "", None, False
    for n, _, value in _fields(buf):
        if n == _TENSOR_NAME:
            name = _text(value)
        elif n == _TENSOR_LOCATION and value == 1:
            external = True
        elif n == _TENSOR_EXTERNAL and isinstance(value, memoryview):
            entry = {k: _text(v) for k, _, v in _fields(value) if k in (1, 2)}
            pair = dict(zip(entry.get(1, "").split("\0"), entry.get(2, "").split("\0")))
            external = True
            location = pair.get("location", location)
    if external:
        found.external.append((name, location or ""))


def _sparse(buf: memoryview, found: _Found) -> None:
    for n, _, value in _fields(buf):
        if n in (_SPARSE_VALUES, _SPARSE_INDICES) and isinstance(value, memoryview):
            _tensor(value, found)


def _node(buf: memoryview, found: _Found, depth: int) -> None:
    op, domain = "", ""
    for n, _, value in _fields(buf):
        if n == _NODE_OP:
            op = _text(value)
        elif n == _NODE_DOMAIN:
            domain = _text(value)
        elif n == _NODE_ATTR and isinstance(value, memoryview):
            _attribute(value, found, depth)
    found.ops.add((domain, op))


def _attribute(buf: memoryview, found: _Found, depth: int) -> None:
    for n, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            continue
        if n in (_ATTR_T, _ATTR_TENSORS):
            _tensor(value, found)
        elif n in (_ATTR_SPARSE, _ATTR_SPARSES):
            _sparse(value, found)
        elif n in (_ATTR_G, _ATTR_GRAPHS):
            _graph(value, found, depth + 1)


def _graph(buf: memoryview, found: _Found, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ModelCheckError(f"subgraphs nested deeper than {_MAX_DEPTH} levels")
    for n, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            continue
        if n == _GRAPH_NODE:
            _node(value, found, depth)
        elif n == _GRAPH_INIT:
            _tensor(value, found)
        elif n == _GRAPH_SPARSE:
            _sparse(value, found)


def _function(buf: memoryview, found: _Found) -> None:
    name, domain = "", ""
    for n, _, value in _fields(buf):
        if n == _FUNC_NAME:
            name = _text(value)
        elif n == _FUNC_DOMAIN:
            domain = _text(value)
        elif n == _FUNC_NODE and isinstance(value, memoryview):
            _node(value, found, 1)
    found.functions.add((domain, name))


def scan_model(data: bytes) -> _Found:
    """External-data references and operators of a serialised ModelProto, subgraphs and functions included."""
    found = _Found()
    buf = memoryview(data)
    for n, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            continue
        if n == _MODEL_GRAPH:
            _graph(value, found, 0)
        elif n == _MODEL_FUNCTIONS:
            _function(value, found)
        elif n == _MODEL_TRAINING:
            for graph in (v for k, _, v in _fields(value) if k in _TRAINING_GRAPHS):
                if isinstance(graph, memoryview):
                    _graph(graph, found, 0)
    return found


def _outside(location: str, folder: Path) -> str | None:
    """Why ``location`` is not a file inside ``folder``, or None."""
    if not location:
        return "names no file"
    for pure in (PurePosixPath(location), PureWindowsPath(location)):
        if pure.is_absolute() or pure.drive or ".." in pure.parts:
            return "is an absolute path or climbs out with '..'"
    resolved = (folder / location).resolve()
    if folder.resolve() not in resolved.parents:
        return f"resolves to {resolved}, outside the model's folder"
    return None


def check_model_file(path: str | os.PathLike[str]) -> None:
    """Refuse external data outside the model's folder and operator domains the runtime does not know."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelCheckError(f"{p}: cannot be read: {os_error_reason(exc)}") from None
    try:
        found = scan_model(data)
    except ModelCheckError as exc:  # ORT could not parse it either; say so as the runtime does
        raise ModelCheckError(model_load_failure(p, str(exc))) from None
    for name, location in found.external:
        why = _outside(location, p.parent)
        if why:
            raise ModelCheckError(
                f"{p}: tensor {name[:100]!r} reads external data from {location[:200]!r}, which {why}; "
                "refused (a model's external data must sit in the model's own folder)"
            )
    unknown = sorted(
        f"{d}::{op}" for d, op in found.ops if d not in KNOWN_DOMAINS and (d, op) not in found.functions
    )
    if unknown:
        raise ModelCheckError(
            f"{p}: uses operator(s) {', '.join(unknown[:5])} of a custom domain this runtime does not know "
            f"(known: {', '.join(repr(d) for d in KNOWN_DOMAINS)}); refused: custom operators would need "
            "code loaded from outside the model"
        )
