"""User-facing errors: ``launch.py`` prints their message as one line and exits non-zero.

Every error that the input or the machine can cause (a bad flag value, a missing or wrong checkpoint, a
missing dataset, an unwritable or full disk, a diverging run) is a :class:`KDError` raised where it is
detected, with a message that names the file or field and says what to do. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator


class KDError(Exception):
    """Base class of errors caused by the user's input or environment, not by a bug."""


class CheckpointError(KDError):
    """A checkpoint is missing, unreadable, or for another model."""


class DataError(KDError):
    """A dataset is missing or malformed."""


class ConfigError(KDError):
    """A configuration value is invalid in context (beyond what the type checks)."""


class NonFiniteLossError(KDError):
    """Training produced a NaN/Inf loss, weights or BatchNorm statistics."""


class OutputError(KDError):
    """A file or folder cannot be written: permissions, a read-only file system, a full disk, a name taken."""


# errno values the machine, not the code, is responsible for: reported in one line, never as a traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """``cannot write PATH: no space left on device`` (the path from the error when not given)."""
    where = path if path is not None else exc.filename
    reason = (exc.strerror or type(exc).__name__).lower()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space, then continue with --resume RUN_DIR)"
    return f"cannot write {where}: {reason}" if where is not None else f"cannot write: {reason}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an environment ``OSError`` (full disk, read-only, permission) while writing ``path`` into an
    :class:`OutputError` naming ``path``; a write to an open file descriptor reports no file name itself."""
    try:
        yield
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise OutputError(describe_os_error(exc, path)) from exc
        raise
