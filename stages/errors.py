"""Errors a stage can raise; the scheduler decides retries from the class alone.

    QieError
     ├── RetryableError      out of memory, disk full, I/O and device errors: retried with backoff
     └── PermanentError      bad input, missing or incompatible model: the job fails at once
          └── ModelNotFoundError
"""

from __future__ import annotations

import errno


class QieError(Exception):
    """Base of every error the daemon raises on purpose."""


class RetryableError(QieError):
    """Worth another try later."""


class PermanentError(QieError):
    """Trying again gives the same result; a person has to act."""


class ModelNotFoundError(PermanentError):
    """A configured model file or folder does not exist."""


_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.EDQUOT,
                     errno.ETIMEDOUT, errno.ESTALE}


def classify(exc: BaseException) -> type[QieError]:
    """Map any exception to RetryableError or PermanentError."""
    if isinstance(exc, QieError):
        return type(exc) if isinstance(exc, (RetryableError, PermanentError)) else PermanentError
    if isinstance(exc, MemoryError):
        return RetryableError
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return RetryableError
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower() or "CUDA error" in text or "OutOfMemoryError" in text:
        return RetryableError
    return PermanentError
