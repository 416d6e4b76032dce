#!/usr/bin/env python3
"""qie-hotfolder: ``python run.py --help``."""

from processor.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
