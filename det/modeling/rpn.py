"""torchvision's RPN with two rules of maskrcnn-benchmark's.

* Straddling anchors: maskrcnn-benchmark ignores (label -1) the anchors that cross the image
  border by more than ``STRADDLE_THRESH`` pixels when it samples RPN targets; torchvision uses
  every anchor. A negative threshold keeps every anchor.
* Proposal budget: maskrcnn-benchmark keeps the ``FPN_POST_NMS_TOP_N_TRAIN`` best proposals of
  the whole batch in training (``FPN_POST_NMS_PER_BATCH``, True by default) and that many per
  image at test; torchvision keeps them per image in both modes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ["BenchmarkRegionProposalNetwork"]


class BenchmarkRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN that ignores straddling anchors (``straddle_thresh >= 0``) and, in
    training, keeps the ``post_nms_top_n()`` best proposals over all images of the batch
    (``per_batch_in_training``)."""

    def __init__(self, *args, straddle_thresh: float = 0.0, per_batch_in_training: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.straddle_thresh = float(straddle_thresh)
        self.per_batch_in_training = per_batch_in_training
        self._image_sizes: Optional[List[Tuple[int, int]]] = None

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        self._image_sizes = images.image_sizes  # the unpadded sizes, for the straddle rule
        try:
            return super().forward(images, features, targets)
        finally:
            self._image_sizes = None

    def assign_targets_to_anchors(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]
                                  ) -> Tuple[List[Tensor], List[Tensor]]:
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        if self.straddle_thresh < 0 or self._image_sizes is None:
            return labels, matched_gt_boxes
        margin = self.straddle_thresh
        for labels_per_image, anchors_per_image, (height, width) in zip(labels, anchors, self._image_sizes):
            straddling = ((anchors_per_image[:, 0] < -margin) | (anchors_per_image[:, 1] < -margin)
                          | (anchors_per_image[:, 2] > width + margin) | (anchors_per_image[:, 3] > height + margin))
            labels_per_image[straddling] = -1.0  # neither positive nor negative: never sampled
        return labels, matched_gt_boxes

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
