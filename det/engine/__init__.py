"""Inference (and, in det 2/2, training and evaluation) around the detector."""
