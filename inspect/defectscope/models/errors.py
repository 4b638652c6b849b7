"""The one exception type for bad model configuration.

It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working, and
its message always names the offending config key and what was expected.
"""

from __future__ import annotations


class ModelConfigError(ValueError):
    """A model name, kwarg or layer option is invalid; the message names key and expectation."""
