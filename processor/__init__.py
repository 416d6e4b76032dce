"""Watching, ingest, scheduling, running, publishing: the daemon and its command line.

``main`` (the command line) and ``Daemon`` are what other packages use; they are imported when
first asked for, so that importing one module of this package (``processor.files``) does not
import the daemon and everything it needs.
"""

from typing import Any

__all__ = ["main", "Daemon"]


def __getattr__(name: str) -> Any:
    if name == "main":
        from processor.cli import main
        return main
    if name == "Daemon":
        from processor.daemon import Daemon
        return Daemon
    raise AttributeError(f"module 'processor' has no attribute {name!r}")
