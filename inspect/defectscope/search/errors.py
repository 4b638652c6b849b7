"""The one exception type for bad search settings (exit 2 with its one-line message, no traceback)."""

from __future__ import annotations


class SearchConfigError(ValueError):
    """A ``search.*`` setting is wrong or cannot be met; the message names the key and what was expected."""
