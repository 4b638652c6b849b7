"""The data error every source, scan and cache raises (kept apart so they need not import each other)."""

from __future__ import annotations


class SourceError(ValueError):
    """A source is misconfigured or its listing is inconsistent; the message names the file or key."""


class DataConfigError(ValueError):
    """A ``data.*`` setting cannot work with the images found (a transform that changes their size); the
    message names the key."""
