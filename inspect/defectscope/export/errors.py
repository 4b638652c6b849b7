"""Export errors: the one every part of export raises (parity and the int8 gate have their own), and
the one-line form of a foreign error."""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint/model cannot be exported as asked; the message says what and why."""


def typed_first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a foreign exception (torch, the quantiser, ORT), for a one-line
    export error; unlike :func:`defectscope.runtime.ortlog.first_line` it names the type."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
