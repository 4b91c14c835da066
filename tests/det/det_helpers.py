"""Helpers for the ``det`` tests: tiny configs, small images with boxes and masks, norm counts, and
scripts run in a fresh interpreter (for worker processes and exits that a test process must not share)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from det.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "det"
ALL_CONFIGS = sorted(str(path.relative_to(REPO)) for path in CONFIG_DIR.rglob("*.yaml"))
TINY_NORMS = ("bn", "brn", "gn", "syncbn", "mabn")
# Smaller still than the tiny configs: 64-pixel short side, few proposals, for fast CPU forwards.
FAST = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "112", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "112", "MODEL.RPN.PRE_NMS_TOP_N_TRAIN", "200", "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "100",
        "MODEL.RPN.PRE_NMS_TOP_N_TEST", "100", "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]
# The tools (train_net, test_net) on the MABN tiny config, as run from det/, with 64-pixel images,
# few proposals, no loader worker, and the dataset names of the COCO layout the tests write.
TINY_CONFIG = "configs/shapes/mask_rcnn_mabn_tiny.yaml"
TOOL_OPTIONS = ["DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
                "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.PRE_NMS_TOP_N_TRAIN", "200",
                "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "100", "MODEL.RPN.PRE_NMS_TOP_N_TEST", "100",
                "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                "DATASETS.TRAIN", '("coco_2017_train",)', "DATASETS.TEST", '("coco_2017_val",)']
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_config(norm: str = "mabn", *opts: str, fast: bool = True):
    return load_config(str(CONFIG_DIR / "shapes" / f"mask_rcnn_{norm}_tiny.yaml"), (FAST if fast else []) + list(opts))


def images_and_targets(sizes: Sequence[Tuple[int, int]] = ((90, 120), (80, 100)), seed: int = 0
                       ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """RGB [0, 1] images with two filled rectangles each (boxes, labels 1 and 2, binary masks)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for height, width in sizes:
        image = torch.rand(3, height, width, generator=generator) * 0.2
        boxes = torch.tensor([[8.0, 6.0, width * 0.5, height * 0.6], [width * 0.4, height * 0.3, width - 6.0, height - 4.0]])
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        for index, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[index, y1:y2, x1:x2] = 1
            image[index, y1:y2, x1:x2] += 0.7
        images.append(image.clamp(0, 1))
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def type_counts(module: nn.Module) -> Counter:
    return Counter(type(m).__name__ for m in module.modules())


def run_script(folder: Path, name: str, source: str, timeout: int) -> str:
    """Run ``source`` (dedented) as ``folder/name`` in a new single-threaded interpreter; its stdout,
    after checking that it exited with 0."""
    path = folder / name
    path.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
