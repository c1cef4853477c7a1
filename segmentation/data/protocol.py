"""The incremental protocol as pure functions: which images a step uses, and how labels are mapped.

Image filtering (reference ``filter_images``), with ``current`` = foreground labels of the step:

- *overlapped*: keep an image that contains at least one ``current`` label;
- *disjoint*: additionally, every label in it must be current, old, 0 or 255, so images showing
  a future class are dropped.

The train split filters with the step's labels and the run's ``overlap`` flag. Val always uses
the overlapped filter on the current labels; test the overlapped filter on all seen labels.
PLOP's ``--test_on_val`` (:func:`shuffled_80_20_part`) then keeps part of the train and test
images.

Label mapping at step t, for MiB's and PLOP's ``protocol`` ("mib" / "plop", where they differ;
PLOP's values in bold); seen labels go to their channel index in ``channel_order`` =
``[0] + old + current``, 255 is ignored:

==================  =================  ==============  ==============
original label      train              val             test
==================  =================  ==============  ==============
current class       channel            channel         channel
old class           0                  255 / **0**     channel
future class        0                  255 / **0**     255 / **0**
VOC 0 background    0                  0               0
VOC 255 void        0 / **255**        255             255
ADE 0 "other"       0                  255 / **0**     255 / **0**
==================  =================  ==============  ==============

The synthetic dataset follows VOC. Options that change the table:

- ``mask_old=False`` (``--no_mask``): old classes keep their channel in train and val.
- ``data_masking`` (PLOP's VOC masking, plop protocol only, train and val; ADE ignores it):
  ``"current"`` is the table, ``"current+old"`` keeps old classes at their channel (an oracle),
  ``"new"`` maps every label but 0 and the current classes to 255 (old, future and void).
- ``ignore_test_bg`` (ADE test): label 0 and the future classes become 255, as MiB's test does.

The mapping is a 256-entry lookup table applied to whole label tensors. Values that are not
classes of the dataset map to -1 (:data:`INVALID`) so that they can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import numpy as np

from ..tasks import NUM_LABELS, channel_order, future_labels, labels_of_step, old_labels
from .readers import VOID_LABEL, check_split_name, label_family

IGNORE_INDEX = 255
INVALID = -1

# ``--label_protocol`` and ``--data_masking`` values (the option parser, which must not import
# this module's numpy and torch neighbours, lists them again; a test compares).
LABEL_PROTOCOLS = ("mib", "plop")
DATA_MASKINGS = ("current", "current+old", "new")


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


def label_lut(
    dataset: str,
    task: str,
    step: int,
    split: str,
    mask_old: bool = True,
    *,
    protocol: str = "mib",
    data_masking: str = "current",
    ignore_test_bg: bool = False,
) -> np.ndarray:
    """Lookup table (256 int64 entries) from original label value to training/eval target.

    ``protocol``, ``mask_old`` (``--no_mask``: the train and val splits keep old classes at their
    channel, as the original built both with the same masking switch), ``data_masking`` and
    ``ignore_test_bg``: see the module's table.
    """
    check_split_name(split)
    if protocol not in LABEL_PROTOCOLS:
        raise ValueError(f"unknown label protocol {protocol!r}; valid: {', '.join(LABEL_PROTOCOLS)}")
    if data_masking not in DATA_MASKINGS:
        raise ValueError(f"unknown data masking {data_masking!r}; valid: {', '.join(DATA_MASKINGS)}")
    if data_masking != "current" and protocol != "plop":
        raise ValueError(f"data masking {data_masking!r} belongs to the plop label protocol")
    voc = label_family(dataset) == "voc"
    masking = data_masking if voc and split != "test" else "current"
    if protocol == "mib":
        masked = 0 if split == "train" else IGNORE_INDEX
    elif split == "test":
        masked = IGNORE_INDEX if ignore_test_bg and not voc else 0
    else:
        masked = IGNORE_INDEX if masking == "new" else 0

    order = channel_order(dataset, task, step)
    current = set(labels_of_step(dataset, task, step)) - {0}
    old = set(old_labels(dataset, task, step)) - {0}
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[: NUM_LABELS[dataset]] = masked  # old and future classes unless kept below
    kept = current | old if split == "test" or not mask_old or masking == "current+old" else current
    for label in kept:
        lut[label] = order.index(label)
    if voc:
        lut[0] = 0
        # MiB trains void/boundary pixels as background; PLOP ignores them.
        lut[VOID_LABEL] = 0 if protocol == "mib" and split == "train" else IGNORE_INDEX
    else:
        lut[0] = masked  # ADE "other" is background, or ignored where the classes left out are
    return lut


def shuffled_80_20_part(indices: np.ndarray, first: bool) -> np.ndarray:
    """PLOP's ``--test_on_val``: ``indices`` (in their given order) shuffled with
    ``numpy.random.RandomState(1)``; the first 80 % (``first``) or the last 20 %, sorted.

    The original keeps the first part in the sets drawn from the train list (the train split, and
    the test split under ``--val_on_trainset``) and the last part in the test split drawn from
    the val list. The validation split is not cut.
    """
    order = list(indices)
    np.random.RandomState(1).shuffle(order)
    kept = int(0.8 * len(order))
    part = order[:kept] if first else order[kept:]
    return np.sort(np.asarray(part, dtype=np.int64))


def label_fates(dataset: str, task: str, step: int, lut: np.ndarray) -> Dict[str, str]:
    """What ``lut`` makes of the labels that are not the step's classes, for the log: "old" (the
    classes of earlier steps), "future" (of later steps) and, on ADE, "other" (label 0), each
    "kept" (at its channel), "background" (0) or "ignored" (255). Groups without labels are left out."""
    groups = {
        "old": sorted(set(old_labels(dataset, task, step)) - {0}),
        "future": sorted(set(future_labels(dataset, task, step)) - {0}),
    }
    if label_family(dataset) == "ade":
        groups["other"] = [0]
    fates = {}
    for group, labels in groups.items():
        if labels:
            target = int(lut[labels[0]])
            fates[group] = "ignored" if target == IGNORE_INDEX else "background" if target == 0 else "kept"
    return fates


def apply_lut(lut: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Map a uint8 label array; returns (mapped int64 array, sorted invalid original values)."""
    mapped = lut[label]
    if (mapped == INVALID).any():
        return mapped, np.unique(label[mapped == INVALID])
    return mapped, np.empty(0, dtype=np.uint8)
