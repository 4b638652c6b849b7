"""The ONNX opset an export may ask for: checked by the CLI before torch is imported, and by the export."""

from __future__ import annotations

MIN_OPSET = 18


def opset_problem(opset: int) -> str | None:
    """Why ``--opset`` cannot be exported, or None: the exporter needs 18, the onnx package knows up to
    its own latest (the version converter fails past it, after the export's work)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        return f"--opset {opset} is too old: defectscope exports need opset >= {MIN_OPSET}"
    if opset > newest:
        return f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows (at most {newest})"
    return None
