#!/usr/bin/env python
"""Plot ``--record_statistics`` runs of ``cls/train.py``: ``plot_statistics.py RUN_A RUN_B --out DIR``.

The logic lives in :mod:`cls.statistics_plot` (the package is installed: ``pip install -e .``).
"""
import sys

from cls.statistics_plot import main

if __name__ == "__main__":
    sys.exit(main())
