"""Optional packages (the ``finegrain[...]`` extras): whether one is installed, without importing it."""

from __future__ import annotations

import importlib.util


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here: found on the path, not run (so checking costs no import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install reads as a missing one
        return False
