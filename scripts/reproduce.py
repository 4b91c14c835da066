#!/usr/bin/env python
"""The miniature reproduction of the MABN paper: ``python scripts/reproduce.py [--full] [--out results]``.

The logic lives in :mod:`reproduction.cli` (also ``python -m reproduction`` from the repository root).
"""
import sys

try:
    from reproduction.cli import main
except ModuleNotFoundError as exc:
    if exc.name not in ("reproduction", "benchmarks"):
        raise
    print(f"error: cannot import {exc.name}; install the repository with `pip install -e .` or run "
          f"`python -m reproduction` from the repository root", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
