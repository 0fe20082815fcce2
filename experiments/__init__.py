"""The harness's command-line jobs (Hydra apps) and their stages.

In a checkout they run as top-level packages from its root (``python -m experiments.run``);
installed, the same files are ``fastattn.experiments`` beside ``fastattn.analysis`` and
``fastattn.conf`` (see setup.py) and run as ``fastattn run``. :func:`harness_module` imports a
sibling module under whichever of the two names this package has.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# "" in a checkout, "fastattn." when installed: what precedes "experiments" in this package's name
PREFIX = __name__[: -len("experiments")]


def harness_module(name: str) -> ModuleType:
    """A harness module by its checkout name (``analysis.heatmaps``), from the same layout as this package."""
    return importlib.import_module(PREFIX + name)
