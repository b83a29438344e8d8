"""The one error every model reader raises: the model cannot be loaded (the message says why and how to fix it)."""

from __future__ import annotations


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says what was wrong and how to fix it."""
