"""Old import paths of names that moved: one module ``__getattr__`` that finds the name at its
new home and warns once per name, so code written against an earlier layout keeps working."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def forward_moved(old_module: str, new_homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old_module``: each name in ``new_homes`` maps to the module
    that now holds it (``"*"``: every other name). Reading one warns (DeprecationWarning, one line)."""
    warned: set[str] = set()

    def __getattr__(name: str):
        home = new_homes.get(name, new_homes.get("*"))
        if home is None or name.startswith("__"):
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        if name not in warned:
            warned.add(name)
            warnings.warn(f"{old_module}.{name} moved to {home}.{name}; import it from there",
                          DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
