"""Benchmarks of the mabn layers against native BatchNorm and the other norms (outside the core package).

Run from the repository root: ``python -m benchmarks.bench [--quick] [--json PATH]``.
"""
