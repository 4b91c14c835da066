"""Dataset names to files: a COCO-format dataset under the data root, or the generated shapes data.

The names and relative paths are those of :mod:`det.config.paths_catalog` (the published ones,
``coco_2014_train`` and so on, plus ``shapes_train`` / ``shapes_val``), passed in as a mapping
``name -> {"img_dir": ..., "ann_file": ...}`` relative to the data root, or ``name -> {"split":
"train" | "val"}`` for the embedded shapes data, which is generated into the cache on first use
(:mod:`det.data.shapes`; the data root plays no part).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

from det.config.defaults import DATA_ROOT_ENV
from det.data.shapes import ensure_shapes_dataset
from mabn.utils.errors import UserError

__all__ = ["Catalog", "DatasetFiles", "resolve_dataset"]

Catalog = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    img_dir: str
    ann_file: str
    layout: str  # where the files are expected, for error messages


def resolve_dataset(name: str, root: str, catalog: Catalog, log: Callable[[str], None] = print) -> DatasetFiles:
    """The files of dataset ``name``; :class:`UserError` listing the registered names if unknown."""
    if name not in catalog:
        raise UserError(f"unknown dataset {name!r}; registered: {', '.join(sorted(catalog))}")
    entry = catalog[name]
    if "split" in entry:
        shapes = ensure_shapes_dataset(log=log)
        split = entry["split"]
        return DatasetFiles(name, str(shapes.img_dir(split)), str(shapes.ann_file(split)),
                            f"the generated shapes data in {shapes.root}; delete that folder to regenerate it")
    img_dir, ann_file = entry["img_dir"], entry["ann_file"]
    layout = (f"{img_dir}/<images> and {ann_file} under the data root {os.path.abspath(root)}; "
              f"set DATASETS.ROOT or ${DATA_ROOT_ENV}")
    return DatasetFiles(name, os.path.join(root, img_dir), os.path.join(root, ann_file), layout)
