"""Mask R-CNN with pluggable normalization (MABN, BRN, SyncBN, BN, FrozenBN, GN) on
``torchvision.models.detection``, configured with maskrcnn-benchmark's yacs keys and files."""
