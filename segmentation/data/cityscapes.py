"""Cityscapes domain-incremental data (PLOP's ``cityscapes_domain``): 19 fixed classes, new cities per step.

Reading (spec §13.1). The file list is every ``leftImg8bit/train/<city>/*_leftImg8bit.png`` sorted by
path, then every ``leftImg8bit/val/<city>/*_leftImg8bit.png`` sorted by path (``leftImg8bit/test``,
whose labels are dummies, is never read). The label of ``<split>/<city>/<stem>_leftImg8bit.png`` is
``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``. A position in this list is an image's *base
index*; its domain is its city's position in ``domain_tasks.CITIES``. Labels are raw Cityscapes label
ids, mapped to the 19 train ids by :func:`train_id_lut` (every other id is ignored: 255).

Steps and splits (§13.4, §13.5). Step t of a task trains on the cities ``DOMAIN_TASKS[task][t]``;
its test set covers every city seen at steps 0..t. Two split modes, both fixed (``RandomState(1)``,
whatever the run's seed):

- ``plop``, faithful to the original code, defect C1 included: the images of a domain set are
  shuffled together and cut 80/20, and the test set is cut from a separate shuffle of all seen
  domains, so from step 1 on most test images were training images at some step.
- ``per_city`` (the default): every city is cut 80/20 once; a step trains on the 80 % parts of its
  cities, validates on their 20 % parts and tests on the 20 % parts of all seen cities, so no test
  image is ever trained on.

``synthetic_domain`` is a small generated tree in the same layout (``synthetic_domain.py``).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..domain_tasks import (
    CITIES, CITY_NAMES, CITYSCAPES_DIR, DOMAIN_SPLIT_MODES, DOMAIN_TASKS, LABEL_ID_OF_TRAIN_ID, NUM_DOMAIN_CLASSES,
    NUM_DOMAINS, check_domain_dataset, cityscapes_folder,
)
from .dataset import IncrementalSegmentationDataset, Transform
from .protocol import IGNORE_INDEX
from .readers import SPLIT_NAMES, DatasetError
from .splits import on_main_process


IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
OFFICIAL_SPLITS = ("train", "val")  # the official splits read, in this order
TRAIN_FRACTION = 0.8
SPLIT_SEED = 1  # the original's hard-coded numpy.random.RandomState(1)


def train_id_lut() -> np.ndarray:
    """int64 array of 256: label id -> train id 0..18 (``LABEL_ID_OF_TRAIN_ID``), every other value -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lut[list(LABEL_ID_OF_TRAIN_ID)] = np.arange(NUM_DOMAIN_CLASSES)
    return lut


@dataclass(frozen=True)
class CityscapesList:
    """The ordered image/label files of a Cityscapes tree (official train, then val) and their domains."""

    folder: str
    images: Tuple[str, ...]
    labels: Tuple[str, ...]
    domains: np.ndarray  # int64 domain id of each image (position in domain_tasks.CITIES)


def read_cityscapes_list(folder: str) -> CityscapesList:
    """Every ``leftImg8bit/train/<city>/*_leftImg8bit.png`` sorted by path, then every
    ``leftImg8bit/val/<city>/*_leftImg8bit.png`` sorted by path, with their labels
    ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (stem: the image name without
    ``_leftImg8bit.png``) and domain ids. ``leftImg8bit/test`` is never read.

    Cities without images are not an error here: a task needs only the cities of its steps
    (``build_domain_dataset`` checks them).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cityscapes folder {folder!r} does not exist: it must hold leftImg8bit/ and gtFine/ "
            "(--data_root may point at the Cityscapes folder itself or at its parent, which then holds "
            f"{CITYSCAPES_DIR}/)"
        )
    domain_of_city = {city: domain for domain, city in enumerate(CITY_NAMES)}
    images: List[str] = []
    labels: List[str] = []
    domains: List[int] = []
    for split in OFFICIAL_SPLITS:
        image_root = os.path.join(folder, "leftImg8bit", split)
        label_root = os.path.join(folder, "gtFine", split)
        archives = ((image_root, "leftImg8bit_trainvaltest.zip"), (label_root, "gtFine_trainvaltest.zip"))
        for required, archive in archives:
            if not os.path.isdir(required):
                raise FileNotFoundError(
                    f"{required!r} does not exist: a Cityscapes folder must hold leftImg8bit/train, "
                    f"leftImg8bit/val, gtFine/train and gtFine/val (from the official {archive}, unzipped)"
                )
        for entry in os.scandir(image_root):
            # Hidden folders are skipped, as the original's glob skips them.
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in domain_of_city:
                raise DatasetError(
                    f"city folder {entry.path!r} is not one of the {NUM_DOMAINS} cities of the domain "
                    f"protocol ({', '.join(sorted(CITY_NAMES))}); the official test cities (berlin, "
                    "bielefeld, ...) belong in leftImg8bit/test, which is not read"
                )
        for image in sorted(glob.glob(os.path.join(glob.escape(image_root), "*", "*" + IMAGE_SUFFIX))):
            city = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
            label = os.path.join(label_root, city, stem + LABEL_SUFFIX)
            if not os.path.isfile(label):
                raise FileNotFoundError(
                    f"label {label!r} of image {image!r} does not exist: every image "
                    f"leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX} needs its label "
                    f"gtFine/{split}/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}"
                )
            images.append(image)
            labels.append(label)
            domains.append(domain_of_city[city])
    return CityscapesList(folder, tuple(images), tuple(labels), np.asarray(domains, dtype=np.int64))


def domain_split_indices(domains: np.ndarray, task: str, step: int, split: str, mode: str) -> np.ndarray:
    """Sorted int64 positions (into the list whose domain ids are ``domains``) of ``split``
    ("train", "val" or "test") at ``step`` of domain task ``task``, in split mode ``mode``."""
    _check_selection(task, step, split, mode)
    domains = np.asarray(domains, dtype=np.int64)
    if mode == "plop":
        current_train, current_rest = _train_and_rest(domains, DOMAIN_TASKS[task][step])
        if split == "train":
            chosen = current_train
        elif split == "val":
            chosen = current_rest
        else:  # a separate shuffle of all seen domains (defect C1)
            chosen = _train_and_rest(domains, _seen_domains(task, step))[1]
    else:
        chosen = []
        for domain in _source_domains(task, step, split):
            train, rest = _train_and_rest(domains, [domain])
            chosen += train if split == "train" else rest
    return np.asarray(sorted(chosen), dtype=np.int64)


def build_domain_dataset(
    name: str,
    root: str,
    task: str,
    step: int,
    split: str,
    transform: Optional[Transform] = None,
    *,
    seed: int = 0,
    split_mode: str = "per_city",
    domains: Optional[Sequence[int]] = None,
) -> IncrementalSegmentationDataset:
    """The images of ``split`` ("train", "val", "test") at ``step`` of domain task ``task``.

    ``domains`` restricts them to those domain ids (used to score old and new domains separately).
    Labels are mapped with :func:`train_id_lut`; the channel order is ``list(range(19))``. For
    ``synthetic_domain`` the tree is generated under ``root`` on first use, on the main process
    only (``splits.on_main_process``). ``seed`` seeds the transform's augmentation, not the split.
    """
    check_domain_dataset(name)
    _check_selection(task, step, split, split_mode)
    if domains is not None:
        unknown = [domain for domain in domains if not 0 <= domain < NUM_DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain ids {unknown}; valid domain ids: 0..{NUM_DOMAINS - 1}")
    if name == "synthetic_domain":  # written under root (created if needed) on first use
        # Imported here: the generator imports this module's layout constants.
        from .synthetic_domain import ensure_synthetic_domain

        on_main_process(lambda: ensure_synthetic_domain(root))
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist (--data_root)")
    listing = read_cityscapes_list(cityscapes_folder(name, root))
    _check_cities_present(listing, task, step, split)
    indices = domain_split_indices(listing.domains, task, step, split, split_mode)
    if domains is not None:
        indices = indices[np.isin(listing.domains[indices], list(domains))]
    if indices.size == 0:
        restriction = f", domains {sorted(domains)}" if domains is not None else ""
        raise DatasetError(
            f"no image of {listing.folder!r} belongs to {split} step {step} of {name} task {task!r} "
            f"(split mode {split_mode}{restriction})"
        )
    return IncrementalSegmentationDataset(
        name,
        [listing.images[i] for i in indices],
        [listing.labels[i] for i in indices],
        indices,
        train_id_lut(),
        list(range(NUM_DOMAIN_CLASSES)),
        transform,
        seed,
    )


def _check_selection(task: str, step: int, split: str, mode: str) -> None:
    if task not in DOMAIN_TASKS:
        raise ValueError(f"unknown domain task {task!r}; valid tasks: {', '.join(DOMAIN_TASKS)}")
    if step not in DOMAIN_TASKS[task]:
        raise ValueError(
            f"step {step} does not exist in domain task {task!r}; "
            f"valid steps: 0..{len(DOMAIN_TASKS[task]) - 1}"
        )
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_NAMES)}")
    if mode not in DOMAIN_SPLIT_MODES:
        raise ValueError(f"unknown domain split mode {mode!r}; valid modes: {', '.join(DOMAIN_SPLIT_MODES)}")


def _seen_domains(task: str, step: int) -> List[int]:
    return [domain for earlier in range(step + 1) for domain in DOMAIN_TASKS[task][earlier]]


def _source_domains(task: str, step: int, split: str) -> List[int]:
    """The domains a split is drawn from: the step's own for train and val, all seen ones for test."""
    return _seen_domains(task, step) if split == "test" else list(DOMAIN_TASKS[task][step])


def _train_and_rest(domains: np.ndarray, domain_set: Sequence[int]) -> Tuple[List[int], List[int]]:
    """The positions whose domain is in ``domain_set``, in list order, shuffled as a Python list by a
    fresh RandomState(1) and cut at floor(0.8 n): (first part, rest)."""
    positions = np.flatnonzero(np.isin(domains, list(domain_set))).tolist()
    np.random.RandomState(SPLIT_SEED).shuffle(positions)
    cut = int(TRAIN_FRACTION * len(positions))
    return positions[:cut], positions[cut:]


def _check_cities_present(listing: CityscapesList, task: str, step: int, split: str) -> None:
    """Fail if a city the selection is drawn from has no image (a missing city would also change
    which images of the other cities the ``plop`` shuffle picks)."""
    present = set(listing.domains.tolist())
    missing = [domain for domain in _source_domains(task, step, split) if domain not in present]
    if missing:
        expected = ", ".join(f"leftImg8bit/{CITIES[d][1]}/{CITIES[d][0]}/" for d in missing)
        raise FileNotFoundError(
            f"the Cityscapes tree {listing.folder!r} has no images of the cities "
            f"{', '.join(CITY_NAMES[d] for d in missing)} (domains {missing}), which {split} step {step} "
            f"of domain task {task!r} needs: expected {expected}; the tree is incomplete "
            "(half-downloaded or partly unzipped?)"
        )
