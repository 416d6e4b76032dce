"""Watching, ingest, scheduling, running, publishing: the daemon and its command line."""

from processor.cli import main
from processor.daemon import Daemon

__all__ = ["main", "Daemon"]
