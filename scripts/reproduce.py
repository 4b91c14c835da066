#!/usr/bin/env python
"""The miniature reproduction of the MABN paper: ``python scripts/reproduce.py [--full] [--out results]``.

The logic lives in :mod:`reproduction.cli`; run from the repository root (or ``python -m reproduction``).
"""
import sys

from reproduction.cli import main

if __name__ == "__main__":
    sys.exit(main())
