"""Atomic file writes: a reader never sees half a file. A killed writer can leave its temporary
(``.<name>.<random>.tmp`` beside the file), never a half-written file under the real name;
:func:`remove_orphaned_temporaries` clears those on the next run. And :func:`read_json`, the
checked reader of the JSON files a run takes as input."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
TEMPORARY_GLOB = ".*.tmp"  # what atomic_write_bytes names its temporaries


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed into place. An OSError
    (disk full, read-only folder, ...) names ``path`` itself, not the temporary file, and leaves no
    temporary file behind."""
    path = Path(path)
    try:
        _write_through_temporary(path, data)
    except OSError as error:
        if error.errno is None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    return path


def _write_through_temporary(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # TEMPORARY_GLOB
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image atomically; the format comes from the file suffix."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    image.save(buf, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return atomic_write_bytes(path, buf.getvalue())


def remove_orphaned_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed atomic writes left in ``folder`` (not below it) and
    return them. Only call it while nothing else writes there (e.g. under the run folder's lock)."""
    orphans = [p for p in Path(folder).glob(TEMPORARY_GLOB) if p.is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    if orphans:
        log.warning("removed %d orphaned temporary file(s) from %s (left by an interrupted run)", len(orphans), folder)
    return orphans


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
