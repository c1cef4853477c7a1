"""The incremental protocol as pure functions: which images a step uses, and how labels are mapped.

Image filtering (reference ``filter_images``), with ``current`` = foreground labels of the step:

- *overlapped*: keep an image that contains at least one ``current`` label;
- *disjoint*: additionally, every label in it must be current, old, 0 or 255, so images showing
  a future class are dropped.

The train split filters with the step's labels and the run's ``overlap`` flag. Val always uses
the overlapped filter on the current labels; test the overlapped filter on all seen labels.

Label mapping at step t (``mask`` = 0 for train, 255 for val/test); seen labels go to their
channel index in ``channel_order`` = ``[0] + old + current``:

==================  =================  ==========  ===========
original label      train              val         test
==================  =================  ==========  ===========
current class       channel            channel     channel
old class           0                  255         channel
future class        0                  255         255
VOC 0 background    0                  0           0
VOC 255 void        **0**              255         255
ADE 0 "other"       0                  255         255
==================  =================  ==========  ===========

The mapping is a 256-entry lookup table applied to whole label tensors. Values that are not
classes of the dataset map to -1 (:data:`INVALID`) so that they can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import numpy as np

from ..tasks import NUM_LABELS, channel_order, labels_of_step, old_labels
from .readers import VOID_LABEL, check_split_name, label_family

IGNORE_INDEX = 255
INVALID = -1


@dataclass(frozen=True)
class SplitFilter:
    """Filter of one split at one step: ``current``/``old`` foreground labels and the overlap flag."""

    current: Tuple[int, ...]
    old: Tuple[int, ...]
    overlap: bool


def split_filter(dataset: str, task: str, step: int, split: str, overlap: bool) -> SplitFilter:
    """The image filter of ``split`` ("train", "val", "test") at ``step``."""
    check_split_name(split)
    current = [label for label in labels_of_step(dataset, task, step) if label != 0]
    old = old_labels(dataset, task, step)
    if split == "train":
        return SplitFilter(tuple(current), tuple(old), overlap)
    if split == "val":
        return SplitFilter(tuple(current), tuple(old), True)
    seen = [label for label in old if label != 0] + current
    return SplitFilter(tuple(seen), (), True)


def keep_image(present: Iterable[int], current: Iterable[int], old: Iterable[int], overlap: bool) -> bool:
    """Whether an image whose label file contains the values ``present`` passes the filter."""
    present = set(int(v) for v in present)
    current = set(current)
    if not present & current:
        return False
    if overlap:
        return True
    allowed = current | set(old) | {0, VOID_LABEL}
    return present <= allowed


def filter_presence(presence: np.ndarray, split_filter: SplitFilter) -> np.ndarray:
    """Vectorised :func:`keep_image` over a (N, 256) boolean presence matrix -> kept indices (int64)."""
    current = np.zeros(256, dtype=bool)
    current[list(split_filter.current)] = True
    keep = (presence & current).any(axis=1)
    if not split_filter.overlap:
        allowed = current.copy()
        allowed[list(split_filter.old)] = True
        allowed[[0, VOID_LABEL]] = True
        keep &= ~(presence & ~allowed).any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def label_lut(dataset: str, task: str, step: int, split: str, mask_old: bool = True) -> np.ndarray:
    """Lookup table (256 int64 entries) from original label value to training/eval target.

    ``mask_old=False`` (``--no_mask``): the train and val splits keep old classes at their
    channel instead of mapping them to background (train) or ignoring them (val), as the original
    built both with the same masking switch.
    """
    check_split_name(split)
    order = channel_order(dataset, task, step)
    current = set(labels_of_step(dataset, task, step)) - {0}
    old = set(old_labels(dataset, task, step)) - {0}
    mask = 0 if split == "train" else IGNORE_INDEX

    lut = np.full(256, INVALID, dtype=np.int64)
    lut[: NUM_LABELS[dataset]] = mask  # old and future classes unless kept below
    kept = current | old if split == "test" or not mask_old else current
    for label in kept:
        lut[label] = order.index(label)
    if label_family(dataset) == "voc":
        lut[0] = 0
        lut[VOID_LABEL] = mask  # void/boundary pixels are trained as background
    else:
        lut[0] = mask  # ADE "other" is background in training, ignored in evaluation
    return lut


def apply_lut(lut: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Map a uint8 label array; returns (mapped int64 array, sorted invalid original values)."""
    mapped = lut[label]
    if (mapped == INVALID).any():
        return mapped, np.unique(label[mapped == INVALID])
    return mapped, np.empty(0, dtype=np.uint8)
