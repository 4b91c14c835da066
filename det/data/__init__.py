"""Data for the detector: COCO-format datasets through pycocotools, the embedded shapes data,
transforms, samplers and the data loaders (see :mod:`det.data.transforms` for where resizing and
normalization happen)."""
from det.data.build import batch_size_per_process, build_test_loaders, build_train_loader, collate
from det.data.catalog import DatasetFiles, resolve_dataset
from det.data.coco import COCODataset
from det.data.samplers import IterationBatchSampler, aspect_ratio_groups
from det.data.shapes import ensure_shapes_dataset
from mabn.utils.data import ShardSampler, load_bgr

__all__ = ["COCODataset", "DatasetFiles", "IterationBatchSampler", "ShardSampler", "aspect_ratio_groups",
           "batch_size_per_process", "build_test_loaders", "build_train_loader", "collate", "ensure_shapes_dataset",
           "load_bgr", "resolve_dataset"]
