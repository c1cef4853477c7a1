"""Incremental tasks: which original dataset labels are learned at each step.

``TASKS[dataset][task][step]`` is the list of original label ids learned at ``step``.
Label 0 (VOC background, ADE "other") always belongs to step 0. The class lists are
those of the reference MiB code, plus aliases introduced by later papers
(VOC ``15-1``, ``10-1``, ``5-3``, ``2-2``; ADE ``50-50``, ``100-5``).

The *channel order* at step t is ``labels of step 0, then step 1, ... step t``: channel k
of the model's output is original label ``channel_order(...)[k]``. For sequential tasks this
is the identity; for the ``b``/``c`` ADE orders it renumbers classes.

Domain-incremental datasets (``DOMAIN_DATASETS``, see ``domain_tasks.py``) keep one classifier of
the 19 Cityscapes classes at every step: there ``TASKS[dataset][task][step]`` lists the step's
*domains* (cities), every step's model has the same 19 channels, and its old model too.
"""
from __future__ import annotations

from typing import Dict, List

from .domain_tasks import DOMAIN_DATASETS, DOMAIN_TASKS, NUM_DOMAIN_CLASSES

Task = Dict[int, List[int]]


def _sequential(first: int, increment: int, last: int) -> Task:
    """Step 0 learns 0..first, then each step learns the next ``increment`` labels up to ``last``."""
    steps: Task = {0: list(range(first + 1))}
    start = first + 1
    while start <= last:
        steps[len(steps)] = list(range(start, min(start + increment, last + 1)))
        start += increment
    return steps


def _steps(*lists: List[int]) -> Task:
    return {step: sorted(labels) for step, labels in enumerate(lists)}


# ADE20K order "b" (reference lists). 100-50b step 0 holds these 101 labels; the other 50 labels
# form 100-50b step 1, split into five groups of ten for 100-10b.
_ADE_B_BASE = [
    0, 1, 3, 5, 6, 8, 9, 10, 12, 13, 14, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31, 32, 33, 34,
    36, 38, 39, 40, 42, 43, 44, 45, 46, 47, 48, 49, 53, 54, 55, 56, 57, 58, 60, 61, 62, 63, 69, 70,
    71, 74, 75, 76, 77, 80, 81, 82, 84, 86, 87, 90, 91, 93, 95, 96, 99, 100, 101, 103, 104, 105, 106,
    107, 109, 113, 116, 117, 119, 120, 121, 123, 125, 126, 128, 129, 130, 131, 132, 133, 134, 135,
    136, 140, 142, 143, 144, 147, 148, 149, 150,
]
_ADE_B_INCREMENTS = [
    [11, 16, 50, 64, 66, 73, 89, 92, 145, 146],
    [30, 37, 51, 52, 72, 85, 98, 114, 115, 138],
    [2, 35, 65, 97, 110, 111, 112, 118, 124, 141],
    [4, 7, 15, 41, 67, 78, 79, 88, 108, 139],
    [17, 20, 59, 68, 83, 94, 102, 122, 127, 137],
]
_ADE_50B = [
    [0, 1, 9, 14, 18, 22, 24, 25, 27, 28, 29, 32, 38, 42, 45, 46, 47, 48, 49, 54, 56, 58, 61, 62,
     63, 69, 74, 75, 76, 77, 81, 82, 84, 90, 93, 96, 100, 103, 104, 109, 117, 119, 121, 123, 128,
     129, 130, 134, 135, 136, 144],
    [3, 5, 6, 8, 10, 12, 13, 19, 21, 23, 26, 31, 33, 34, 36, 39, 40, 43, 44, 53, 55, 57, 60, 70, 71,
     80, 86, 87, 91, 95, 99, 101, 105, 106, 107, 113, 116, 120, 125, 126, 131, 132, 133, 140, 142,
     143, 147, 148, 149, 150],
]

# ADE20K order "c" (defined by the permutation the reference ships as order-b.txt).
_ADE_C_BASE = [
    0, 1, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
    33, 34, 35, 36, 37, 40, 41, 43, 44, 45, 46, 48, 50, 52, 54, 56, 57, 61, 63, 65, 66, 67, 68, 69,
    70, 71, 74, 76, 77, 78, 79, 81, 82, 83, 84, 85, 86, 87, 90, 94, 95, 96, 97, 98, 99, 102, 105,
    106, 109, 110, 111, 112, 114, 115, 118, 119, 120, 121, 123, 124, 126, 128, 129, 132, 133, 134,
    135, 136, 138, 139, 142, 143, 144, 146, 147, 149,
]
_ADE_C_INCREMENTS = [
    [3, 4, 7, 18, 39, 64, 73, 101, 113, 137],
    [47, 51, 55, 60, 62, 80, 116, 127, 140, 148],
    [22, 42, 49, 58, 59, 89, 91, 92, 108, 125],
    [2, 38, 53, 100, 104, 117, 130, 131, 141, 145],
    [15, 21, 72, 75, 88, 93, 103, 107, 122, 150],
]
_ADE_50C = [
    [0, 5, 10, 11, 12, 13, 16, 17, 19, 20, 23, 27, 28, 30, 31, 32, 33, 37, 43, 46, 52, 56, 57, 65,
     66, 69, 70, 74, 76, 77, 79, 82, 83, 86, 87, 105, 109, 110, 111, 119, 128, 129, 132, 133, 134,
     138, 142, 143, 144, 146, 147],
    [1, 6, 8, 9, 14, 24, 25, 26, 29, 34, 35, 36, 40, 41, 44, 45, 48, 50, 54, 61, 63, 67, 68, 71, 78,
     81, 84, 85, 90, 94, 95, 96, 97, 98, 99, 102, 106, 112, 114, 115, 118, 120, 121, 123, 124, 126,
     135, 136, 139, 149],
]


def _flatten(groups: List[List[int]]) -> List[int]:
    return sorted(label for group in groups for label in group)


TASKS: Dict[str, Dict[str, Task]] = {
    "voc": {
        "offline": _steps(list(range(21))),
        "19-1": _sequential(19, 1, 20),
        "19-1b": _steps([label for label in range(21) if label != 5], [5]),
        "15-5": _sequential(15, 5, 20),
        "15-5s": _sequential(15, 1, 20),
        "10-5-5": _sequential(10, 5, 20),
        # Aliases and tasks of later papers (PLOP, SDR, RCIL).
        "15-1": _sequential(15, 1, 20),
        "10-1": _sequential(10, 1, 20),
        "5-3": _sequential(5, 3, 20),
        "2-2": _sequential(2, 2, 20),
    },
    "ade": {
        "offline": _steps(list(range(151))),
        "100-50": _sequential(100, 50, 150),
        "100-10": _sequential(100, 10, 150),
        "50": _sequential(50, 50, 150),
        "100-50b": _steps(_ADE_B_BASE, _flatten(_ADE_B_INCREMENTS)),
        "100-10b": _steps(_ADE_B_BASE, *_ADE_B_INCREMENTS),
        "50b": _steps(*_ADE_50B, _flatten(_ADE_B_INCREMENTS)),
        "100-50c": _steps(_ADE_C_BASE, _flatten(_ADE_C_INCREMENTS)),
        "100-10c": _steps(_ADE_C_BASE, *_ADE_C_INCREMENTS),
        "50c": _steps(*_ADE_50C, _flatten(_ADE_C_INCREMENTS)),
        # Aliases and tasks of later papers.
        "50-50": _sequential(50, 50, 150),
        "100-5": _sequential(100, 5, 150),
    },
}
# The synthetic dataset mirrors VOC's 20 foreground classes, so every VOC task runs on it.
TASKS["synthetic"] = TASKS["voc"]

# Cityscapes with PLOP's domain tasks, and its synthetic stand-in.
for _name in DOMAIN_DATASETS:
    TASKS[_name] = DOMAIN_TASKS

# Dataset label spaces: number of original labels (0..n-1), void label excluded.
NUM_LABELS = {"voc": 21, "synthetic": 21, "ade": 151, "cityscapes_domain": NUM_DOMAIN_CLASSES,
              "synthetic_domain": NUM_DOMAIN_CLASSES}


def is_domain_incremental(dataset: str) -> bool:
    """Whether ``dataset``'s steps add domains (cities) instead of classes."""
    return dataset in DOMAIN_DATASETS


def _task(dataset: str, task: str) -> Task:
    if dataset not in TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(sorted(TASKS))}")
    tasks = TASKS[dataset]
    if task not in tasks:
        raise ValueError(
            f"unknown task {task!r} for dataset {dataset!r}; valid tasks: {', '.join(tasks)}"
        )
    return tasks[task]


def _check_step(dataset: str, task: str, step: int) -> Task:
    steps = _task(dataset, task)
    if step not in steps:
        raise ValueError(
            f"step {step} does not exist in task {task!r} of {dataset!r}; "
            f"valid steps: 0..{len(steps) - 1}"
        )
    return steps


def num_steps(dataset: str, task: str) -> int:
    """Number of incremental steps of a task (1 for ``offline``)."""
    return len(_task(dataset, task))


def labels_of_step(dataset: str, task: str, step: int) -> List[int]:
    """Original labels learned at ``step`` (step 0 includes label 0)."""
    return list(_check_step(dataset, task, step)[step])


def old_labels(dataset: str, task: str, step: int) -> List[int]:
    """Original labels of all steps before ``step``, in step order."""
    steps = _check_step(dataset, task, step)
    return [label for s in range(step) for label in steps[s]]


def seen_labels(dataset: str, task: str, step: int) -> List[int]:
    """Labels of steps 0..step (old + current), in step order."""
    return old_labels(dataset, task, step) + labels_of_step(dataset, task, step)


def future_labels(dataset: str, task: str, step: int) -> List[int]:
    """Labels of the steps after ``step``, in step order."""
    steps = _check_step(dataset, task, step)
    return [label for s in range(step + 1, len(steps)) for label in steps[s]]


def classes_per_step(dataset: str, task: str, step: int) -> List[int]:
    """Number of classifier channels added at each step 0..step: the classifier layout (one
    classifier of every class at every step of a domain-incremental task)."""
    steps = _check_step(dataset, task, step)
    if is_domain_incremental(dataset):
        return [NUM_DOMAIN_CLASSES]
    return [len(steps[s]) for s in range(step + 1)]


def old_classes_per_step(dataset: str, task: str, step: int) -> List[int]:
    """The classifier layout of the model that ``step`` starts from (step ``step - 1``'s; empty at
    step 0)."""
    if step == 0:
        _check_step(dataset, task, step)
        return []
    return classes_per_step(dataset, task, step - 1)


def channel_order(dataset: str, task: str, step: int) -> List[int]:
    """Original label of each output channel at ``step``: channel k predicts ``order[k]`` (for a
    domain-incremental dataset, the train id: channel k predicts class k)."""
    if is_domain_incremental(dataset):
        _check_step(dataset, task, step)
        return list(range(NUM_DOMAIN_CLASSES))
    return seen_labels(dataset, task, step)
