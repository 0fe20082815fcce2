"""What every command-line entry point does with bad input: one line on stderr and exit status 1
(2 for a malformed command line), no traceback unless asked for with ``HYDRA_FULL_ERROR=1``
(Hydra's own switch; ``fastattn --verbose`` sets it for every command, Hydra's or not)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import NoReturn

VERBOSE_ENV = "HYDRA_FULL_ERROR"


def verbose() -> bool:
    """Whether a failing command should show its traceback."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """An exception's message on one line: its first line, its cause's lines, then its other
    lines, joined; indented lines (details such as ``full_key: ...``) are dropped."""

    def lines(exc: BaseException | None) -> list[str]:
        if exc is None:
            return []
        kept = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip() and not line[:1].isspace()]
        return kept or [type(exc).__name__]

    own = lines(error)
    parts = own[:1] + lines(error.__cause__) + own[1:]
    return "; ".join(dict.fromkeys(parts))  # a cause repeating the message says it once


def storage_error(error: OSError) -> str | None:
    """The one line for a file the machine would not let us write (disk full, read-only file
    system, permission denied), naming the file; None for any other error."""
    where = error.filename or "an output file"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {where}: free some space or choose another output folder"
    if error.errno == errno.EROFS:
        return f"read-only file system: cannot write {where}; choose an output folder on a writable disk"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {where}: make it (or its folder) accessible or choose another output folder"
    return None


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``message`` as the command's only line on stderr and exit."""
    print(" ".join(message.split()), file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``prog: message (see --help)``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)", status=2)
