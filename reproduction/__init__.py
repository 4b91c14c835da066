"""The miniature reproduction of the MABN paper's tables and figures on the embedded data.

``python -m reproduction`` (or ``python scripts/reproduce.py``) times ResNet-50 inference with the
benchmarks' interleaved harness while nothing else runs, then trains the classification rows
with ``cls`` over several seeds, records the batch statistics of one BN layer and trains tiny
Mask R-CNNs with ``det``, two runs at a time, and writes one results folder: ``results.md``,
``results.json`` and PNG figures, with verdicts on the paper's claims (:mod:`reproduction.claims`).
"""
