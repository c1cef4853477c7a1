"""Domain-incremental tasks (PLOP's Cityscapes protocol): the classes stay, the cities change.

Every step trains the same 19 Cityscapes classes on new cities ("domains"). A city's domain id is
its position in ``CITIES``, the original code's table (not alphabetical: the three cities of the
official val split come last). ``DOMAIN_TASKS[task][step]`` lists the domain ids a step trains on.
There is no background class: train id 0 is ``road``, and pixels of any other label id are ignored.

Also here, without torch, so that the option checks can use them: the domain datasets, where their
folder is under ``--data_root`` and the ``--domain_split`` modes (``data/cityscapes.py`` reads the data).
"""
from __future__ import annotations

import os
from typing import Dict, List

DOMAIN_DATASETS = ("cityscapes_domain", "synthetic_domain")
# How a city's images divide into training and held-out ones (``--domain_split``; data/cityscapes.py).
DOMAIN_SPLIT_MODES = ("per_city", "plop")
CITYSCAPES_DIR = "cityscapes"
SYNTHETIC_DOMAIN_DIR = "SyntheticCityscapes"

# (city, the official split its images are in), indexed by domain id.
CITIES = (
    ("aachen", "train"), ("bremen", "train"), ("darmstadt", "train"), ("erfurt", "train"), ("hanover", "train"),
    ("krefeld", "train"), ("strasbourg", "train"), ("tubingen", "train"), ("weimar", "train"), ("bochum", "train"),
    ("cologne", "train"), ("dusseldorf", "train"), ("hamburg", "train"), ("jena", "train"),
    ("monchengladbach", "train"), ("stuttgart", "train"), ("ulm", "train"), ("zurich", "train"),
    ("frankfurt", "val"), ("lindau", "val"), ("munster", "val"),
)
CITY_NAMES: List[str] = [city for city, _ in CITIES]
NUM_DOMAINS = len(CITIES)

# Cityscapes label id of each of the 19 train ids (the standard evaluation classes).
LABEL_ID_OF_TRAIN_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_CLASS_NAMES: List[str] = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
NUM_DOMAIN_CLASSES = len(LABEL_ID_OF_TRAIN_ID)


def _domain_steps(first: int, increment: int) -> Dict[int, List[int]]:
    """Step 0 trains on domains 0..first-1, then each step on the next ``increment`` domains."""
    steps = {0: list(range(first))}
    for start in range(first, NUM_DOMAINS, increment):
        steps[len(steps)] = list(range(start, min(start + increment, NUM_DOMAINS)))
    return steps


def check_domain_dataset(name: str) -> None:
    if name not in DOMAIN_DATASETS:
        raise ValueError(f"unknown domain dataset {name!r}; valid datasets: {', '.join(DOMAIN_DATASETS)}")


def cityscapes_folder(name: str, root: str) -> str:
    """The folder read for dataset ``name`` under ``root`` (``--data_root``).

    cityscapes_domain: ``root`` itself when it holds ``leftImg8bit/`` (PLOP's ``--data_root``), else
    ``<root>/cityscapes``. synthetic_domain: ``<root>/SyntheticCityscapes``.
    """
    check_domain_dataset(name)
    if name == "synthetic_domain":
        return os.path.join(root, SYNTHETIC_DOMAIN_DIR)
    if os.path.isdir(os.path.join(root, "leftImg8bit")):
        return root
    return os.path.join(root, CITYSCAPES_DIR)


DOMAIN_TASKS: Dict[str, Dict[int, List[int]]] = {
    "11-5": _domain_steps(11, 5),
    "11-1": _domain_steps(11, 1),
    "1-1": _domain_steps(1, 1),
    "offline": {0: list(range(NUM_DOMAINS))},
}
