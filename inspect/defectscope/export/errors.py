"""The export error every part of export raises (parity and the int8 gate have their own), and its one-line form."""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint/model cannot be exported as asked; the message says what and why."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a one-line CLI error can carry of a foreign exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
