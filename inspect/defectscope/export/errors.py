"""The export error every part of export raises (parity and the int8 gate have their own)."""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint/model cannot be exported as asked; the message says what and why."""
