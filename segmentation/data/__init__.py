"""Datasets of the incremental protocol: readers, split files, label mapping and transforms.

Entry point: :func:`build_dataset`. See ``protocol.py`` (filtering and label mapping),
``splits.py`` (split files and their cache), ``transforms.py`` and ``synthetic.py``.
"""

from .classes import CLASS_NAMES
from .dataset import IncrementalSegmentationDataset, build_dataset, sample_generator
from .palette import color_palette, colorize
from .readers import DatasetError

__all__ = [
    "CLASS_NAMES",
    "DatasetError",
    "IncrementalSegmentationDataset",
    "build_dataset",
    "color_palette",
    "colorize",
    "sample_generator",
]
