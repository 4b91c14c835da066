"""torchvision's RPN with maskrcnn-benchmark's training-time proposal budget per batch.

maskrcnn-benchmark keeps the ``FPN_POST_NMS_TOP_N_TRAIN`` best proposals of the whole batch in
training (``FPN_POST_NMS_PER_BATCH``, True by default) and that many per image at test;
torchvision keeps them per image in both modes. :class:`BatchTopNRegionProposalNetwork` restores
the per-batch selection in training and is torchvision's RPN otherwise.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ["BatchTopNRegionProposalNetwork"]


class BatchTopNRegionProposalNetwork(RegionProposalNetwork):
    """In training, keep the ``post_nms_top_n()`` highest-scoring proposals over all images of the
    batch (each image's own per-level NMS first); at test, per image as torchvision does."""

    def __init__(self, *args, per_batch_in_training: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_batch_in_training = per_batch_in_training

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: List[Tuple[int, int]],
                         num_anchors_per_level: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        # An image never contributes more than the batch budget, so the per-image cut of the parent
        # (at the same number) keeps every candidate of the batch-wide selection.
        boxes, scores = super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        if not (self.training and self.per_batch_in_training) or len(scores) < 2:
            return boxes, scores
        counts = [len(s) for s in scores]
        all_scores = torch.cat(scores)
        keep = torch.zeros_like(all_scores, dtype=torch.bool)
        keep[all_scores.topk(min(self.post_nms_top_n(), len(all_scores))).indices] = True
        kept = keep.split(counts)
        return [b[k] for b, k in zip(boxes, kept)], [s[k] for s, k in zip(scores, kept)]
