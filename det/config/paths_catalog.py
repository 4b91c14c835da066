"""Dataset names (as in the published configs) to their files under ``DATASETS.ROOT``.

The published layout of maskrcnn-benchmark: ``<root>/coco/train2014`` with
``<root>/coco/annotations/instances_train2014.json`` and so on. Nothing is downloaded; the data
pipeline checks that the files exist and names the expected layout when they do not. The embedded
``shapes_*`` datasets are generated into a cache on first use by the data pipeline; their entries
here only name the split.
"""
from __future__ import annotations

import os
from typing import Dict, List

from mabn.utils.errors import UserError

__all__ = ["DATASETS", "dataset_paths", "registered_names"]

DATASETS: Dict[str, Dict[str, str]] = {
    "coco_2014_train": {"img_dir": "coco/train2014", "ann_file": "coco/annotations/instances_train2014.json"},
    "coco_2014_val": {"img_dir": "coco/val2014", "ann_file": "coco/annotations/instances_val2014.json"},
    "coco_2014_minival": {"img_dir": "coco/val2014", "ann_file": "coco/annotations/instances_minival2014.json"},
    "coco_2014_valminusminival": {"img_dir": "coco/val2014",
                                  "ann_file": "coco/annotations/instances_valminusminival2014.json"},
    "coco_2017_train": {"img_dir": "coco/train2017", "ann_file": "coco/annotations/instances_train2017.json"},
    "coco_2017_val": {"img_dir": "coco/val2017", "ann_file": "coco/annotations/instances_val2017.json"},
    "shapes_train": {"split": "train"},
    "shapes_val": {"split": "val"},
}


def registered_names() -> List[str]:
    return sorted(DATASETS)


def dataset_paths(name: str, root: str) -> Dict[str, str]:
    """The entry of ``name`` with ``img_dir`` and ``ann_file`` joined to ``root``."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; registered: {', '.join(registered_names())}")
    return {key: os.path.join(root, value) if key in ("img_dir", "ann_file") else value
            for key, value in DATASETS[name].items()}
