"""The miniature reproduction of the MABN paper's tables and figures on the embedded data.

``python scripts/reproduce.py`` (or ``python -m reproduction``) trains the classification rows
with ``cls``, times ResNet-50 inference with the benchmarks' interleaved harness, records the
batch statistics of one BN layer, trains a tiny Mask R-CNN with ``det`` and writes one results
folder: ``results.md``, ``results.json`` and PNG figures.
"""
