"""Atomic file writes: a reader never sees half a file, an interrupted run leaves none. And
:func:`read_json`, the checked reader of the JSON files a run takes as input."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image atomically; the format comes from the file suffix."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    image.save(buf, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return atomic_write_bytes(path, buf.getvalue())


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | os.PathLike, what: str, max_bytes: int):
    """The JSON value in ``path``, whose size is checked against ``max_bytes`` before it is read.
    ``what`` names the kind of file (``plan``, ``latency table``) in one-line errors naming the
    file: not found, too large, truncated or corrupt, or holding NaN / Infinity (not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size / 2**20:.1f} MiB, more than a {what} file may hold "
                         f"({max_bytes / 2**20:g} MiB): not read")
    try:
        return json.loads(path.read_bytes(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a valid {what} JSON file ({e})") from None
