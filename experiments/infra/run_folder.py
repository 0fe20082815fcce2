"""One run at a time in a run folder: an exclusive lock held for the run's lifetime.

The lock is ``fcntl.flock`` on ``<folder>/.run.lock`` (released by the kernel when the process
dies, so a killed run never leaves its folder locked). A second run into a held folder stops with
one line instead of overwriting the first run's samples and records. Under torchrun the ranks
share one folder: rank 0 holds the lock for all of them.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import distributed
from .app import ConfigError

LOCK_NAME = ".run.lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


def acquire(folder: Path) -> int:
    """The descriptor of ``folder``'s lock file, locked; :class:`FolderBusy` when another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise FolderBusy(f"{folder}: another run ({holder}) holds this folder; wait for it to finish "
                             f"or run into another folder (hydra.run.dir=...)") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder released and removed the file between our open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def release(fd: int, folder: Path) -> None:
    """Remove the lock file while still holding it (so a folder a failed config made can be cleaned up), then unlock."""
    (folder / LOCK_NAME).unlink(missing_ok=True)
    os.close(fd)


@contextmanager
def exclusive(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock for the duration; ConfigError (one line) when another run holds it.
    Ranks of one job share the folder: rank 0 holds the lock, and every rank stops when it cannot."""
    folder, fd, busy = Path(folder), None, None
    if distributed.is_main():
        try:
            fd = acquire(folder)
        except FolderBusy as error:
            busy = str(error)
    busy = distributed.broadcast(busy)
    if busy:
        raise ConfigError(busy)
    try:
        yield
    finally:
        if fd is not None:
            release(fd, folder)
