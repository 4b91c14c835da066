"""torchvision's RPN with three rules of maskrcnn-benchmark's.

* Straddling anchors: maskrcnn-benchmark ignores (label -1) the anchors that cross the image
  border by more than ``STRADDLE_THRESH`` pixels when it samples RPN targets; torchvision uses
  every anchor. A negative threshold keeps every anchor.
* Per-level budget: maskrcnn-benchmark keeps at most ``POST_NMS_TOP_N_TRAIN`` / ``_TEST``
  proposals per FPN level and image after NMS (the ``max_proposals`` of its NMS); torchvision has
  no such cut.
* Proposal budget over all levels: maskrcnn-benchmark keeps the ``FPN_POST_NMS_TOP_N_TRAIN`` best
  proposals of the whole batch in training (``FPN_POST_NMS_PER_BATCH``, True by default) and
  ``FPN_POST_NMS_TOP_N_TEST`` per image at test; torchvision keeps them per image in both modes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

__all__ = ["BenchmarkRegionProposalNetwork"]


def first_per_level(keep: Tensor, levels: Tensor, limit: int, num_levels: int) -> Tensor:
    """The first ``limit`` entries of each level in ``keep`` (indices into ``levels``), in the order
    of ``keep``."""
    one_hot = F.one_hot(levels[keep], num_levels)
    rank = (one_hot.cumsum(0) * one_hot).sum(1)  # 1 for the first entry of its level, 2 for the next...
    return keep[rank <= limit]


class BenchmarkRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN that ignores straddling anchors (``straddle_thresh >= 0``), keeps at most
    ``post_nms_top_n_per_level[mode]`` proposals per level and image after NMS (None: no such cut)
    and, in training, the ``post_nms_top_n()`` best proposals over all images of the batch
    (``per_batch_in_training``)."""

    def __init__(self, *args, straddle_thresh: float = 0.0, per_batch_in_training: bool = True,
                 post_nms_top_n_per_level: Optional[Dict[str, int]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.straddle_thresh = float(straddle_thresh)
        self.per_batch_in_training = per_batch_in_training
        self._post_nms_top_n_per_level = post_nms_top_n_per_level
        self._image_sizes: Optional[List[Tuple[int, int]]] = None

    def post_nms_top_n_per_level(self) -> Optional[int]:
        """The per-level cut after NMS in the current mode (None: none)."""
        if self._post_nms_top_n_per_level is None:
            return None
        return self._post_nms_top_n_per_level["training" if self.training else "testing"]

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
        """Per image: the ``pre_nms_top_n()`` best anchors of each level, clipped, small and
        low-scoring boxes dropped, NMS per level, at most ``post_nms_top_n_per_level()`` per level,
        then the ``post_nms_top_n()`` best over all levels; in training with
        ``per_batch_in_training``, the ``post_nms_top_n()`` best of the whole batch."""
        num_images, num_levels = proposals.shape[0], len(num_anchors_per_level)
        device = proposals.device
        scores = objectness.detach().reshape(num_images, -1)
        level_of_anchor = torch.repeat_interleave(torch.arange(num_levels, device=device),
                                                  torch.as_tensor(num_anchors_per_level, device=device))
        top = self._get_top_n_idx(scores, num_anchors_per_level)
        rows = torch.arange(num_images, device=device)[:, None]
        scores, levels, candidates = scores[rows, top].sigmoid(), level_of_anchor[top], proposals[rows, top]
        per_level = self.post_nms_top_n_per_level()
        boxes, kept_scores = [], []
        for image_boxes, image_scores, image_levels, shape in zip(candidates, scores, levels, image_shapes):
            image_boxes = box_ops.clip_boxes_to_image(image_boxes, shape)
            keep = box_ops.remove_small_boxes(image_boxes, self.min_size)
            keep = keep[image_scores[keep] >= self.score_thresh]
            keep = keep[box_ops.batched_nms(image_boxes[keep], image_scores[keep], image_levels[keep],
                                            self.nms_thresh)]  # in decreasing score order
            if per_level is not None:
                keep = first_per_level(keep, image_levels, per_level, num_levels)
            keep = keep[:self.post_nms_top_n()]
            boxes.append(image_boxes[keep])
            kept_scores.append(image_scores[keep])
        if not (self.training and self.per_batch_in_training) or num_images < 2:
            return boxes, kept_scores
        # No image keeps more than the batch budget above, so the batch-wide selection sees every
        # candidate it could choose.
        counts = [len(s) for s in kept_scores]
        all_scores = torch.cat(kept_scores)
        selected = torch.zeros_like(all_scores, dtype=torch.bool)
        selected[all_scores.topk(min(self.post_nms_top_n(), len(all_scores))).indices] = True
        chosen = selected.split(counts)
        return [b[c] for b, c in zip(boxes, chosen)], [s[c] for s, c in zip(kept_scores, chosen)]
