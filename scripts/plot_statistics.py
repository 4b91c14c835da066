#!/usr/bin/env python
"""Plot ``--record_statistics`` runs of ``cls/train.py``: ``plot_statistics.py RUN_A RUN_B --out DIR``.

The logic lives in :mod:`cls.statistics_plot`.
"""
import os
import sys

if __package__ in (None, ""):
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.path.insert(0, _ROOT)

from cls.statistics_plot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
