"""Output names from data: a name built from a file's contents or a config value becomes one safe
file-name component (:func:`slug`), and the path it makes is checked to stay inside the folder
it is meant for (:func:`path_inside`) before anything is written there."""

from __future__ import annotations

import os
import re
from pathlib import Path

# anything but letters, digits and ._+- (no separators, no spaces, no shell or URL characters)
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME_CHARS = 150  # well under the 255 bytes of a file name, leaving room for suffixes


def slug(text, replacement: str = "_") -> str:
    """``text`` as one file-name component: each run of other characters than letters, digits and
    ``._+-`` becomes ``replacement``; leading dots are dropped (no hidden file, never ``..``); never
    empty. Names already made of those characters come back unchanged."""
    name = _UNSAFE_RUN.sub(replacement, str(text)).lstrip(".")[:MAX_NAME_CHARS]
    return name or "_"


def path_inside(folder: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """``folder / parts...``, refused with a ValueError naming both when it resolves outside
    ``folder`` (a ``..``, an absolute part, a link leading out)."""
    folder = Path(folder)
    path = folder.joinpath(*parts)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{path}: resolves outside {folder}; not written")
    return path
