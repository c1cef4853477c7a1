"""Split index files: which base images each (task, overlap, step, split) uses.

A split file is a 1-D int64 ``.npy`` array of base indices (positions in the raw list, see
``readers.py``), the format of the reference's shipped ``data/<dataset>/<task>[-ov]/train-<step>.npy``.

Computing a split reads every label file of the raw list once, in parallel worker processes,
and writes the files of *all* steps of the task for that split. They are cached in::

    <data_root>/<dataset dir>/incremental-splits/<task>[-ov]/{train,val,test}-<step>.npy

next to a ``.json`` sidecar holding a fingerprint (dataset, task definition, step, split, overlap
flag and a SHA-1 of the raw file list). A cached file is reused only if its fingerprint matches
and it passes the checks below; otherwise it is recomputed.

``split_dir`` (``--split_dir``) points at a folder of existing files, e.g. the reference's
``data/voc/15-5``: ``train-<step>.npy`` must be there; ``val-<step>.npy`` and ``test-<step>.npy``
(or the reference's ``test_on_val-<step>.npy``) are used if present, else computed into the cache.
A file from ``split_dir`` that fails the checks is an error: integer 1-D array, indices in range
and unique, and up to 20 evenly spaced listed images checked against the step's filter.
(For ADE the reference's 50-50 splits were made by a balancing procedure rather than by the
filter, so for ADE files from ``split_dir`` only "contains a current class" is checked.)

In a distributed run (``torch.distributed`` initialised) rank 0 loads or computes and writes the
files (atomically: temporary file + rename) and broadcasts the indices; the other ranks never
touch the cache. Rank 0's errors are re-raised on every rank.

Command line (writes ``train-<step>.npy`` of every step in the reference's format)::

    python -m segmentation.data.splits --dataset voc --data_root data --task 15-5 [--overlap] --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from itertools import repeat
from typing import Callable, Dict, List, Optional, TypeVar

import numpy as np
import torch.distributed as dist

from ..files import atomic_write
from ..signals import detach_worker_from_stop_signals
from ..tasks import TASKS, num_steps
from .protocol import SplitFilter, filter_presence, keep_image, split_filter
from .synthetic import ensure_synthetic_voc
from .readers import (
    BaseList, DatasetError, dataset_dir, label_family, labels_present, list_name_for_split, read_base_list,
)

LOGGER = logging.getLogger(__name__)
FORMAT_VERSION = 1
SPOT_CHECKS = 20
# Lists shorter than this are scanned in-process: starting workers would cost more.
PARALLEL_MIN_FILES = 256

T = TypeVar("T")


def cache_folder(dataset: str, root: str, task: str, overlap: bool) -> str:
    """``<root>/<dataset dir>/incremental-splits/<task>[-ov]``."""
    return os.path.join(dataset_dir(dataset, root), "incremental-splits", task + ("-ov" if overlap else ""))


def default_num_workers() -> int:
    return max(
        1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def scan_presence(base: BaseList, num_workers: Optional[int] = None) -> np.ndarray:
    """(N, 256) bool matrix: which label values each image of ``base`` contains.

    Every label file is read and checked (existence, decodability, size equal to its image's,
    valid values) in ``num_workers`` processes; errors name the file.
    """
    workers = default_num_workers() if num_workers is None else num_workers
    args = list(zip(base.images, base.labels, repeat(base.dataset)))
    if workers <= 1 or (num_workers is None and len(args) < PARALLEL_MIN_FILES):
        return np.stack([labels_present(*arg) for arg in args])
    # fork starts workers instantly; the workers only use numpy and PIL.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    abort = context.Event()
    pool = context.Pool(workers, initializer=_start_scan_worker, initargs=(abort,))
    try:
        rows = pool.starmap(_scan_one, args, chunksize=max(1, len(args) // (workers * 8)))
    except BaseException:
        abort.set()  # the queued files are skipped: the pool empties quickly
        raise
    finally:
        # The workers ignore SIGTERM (see _start_scan_worker), so the pool cannot terminate them;
        # they end once the queue is done.
        pool.close()
        pool.join()
    return np.stack(rows)


_abort_scan = None


def _start_scan_worker(abort) -> None:
    """A scan worker survives the stop signals and Ctrl-C: a worker that died with its files
    would make the pool wait for them for ever. The parent handles those and sets ``abort``."""
    global _abort_scan
    _abort_scan = abort
    detach_worker_from_stop_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _scan_one(image: str, label: str, dataset: str) -> Optional[np.ndarray]:
    if _abort_scan is not None and _abort_scan.is_set():
        return None
    return labels_present(image, label, dataset)


def compute_split_indices(
    base: BaseList, dataset: str, task: str, split: str, overlap: bool, num_workers: Optional[int] = None
) -> Dict[int, np.ndarray]:
    """Indices of every step of ``task`` for ``split``: {step: int64 array}."""
    presence = scan_presence(base, num_workers)
    return {
        step: filter_presence(presence, split_filter(dataset, task, step, split, overlap))
        for step in range(num_steps(dataset, task))
    }


def fingerprint(base: BaseList, dataset: str, task: str, step: int, split: str, overlap: bool) -> str:
    """Identifies what a cached split file was computed from."""
    content = {
        "version": FORMAT_VERSION,
        "dataset": dataset,
        "task": task,
        "task_steps": {str(s): labels for s, labels in TASKS[dataset][task].items()},
        "step": step,
        "split": split,
        "overlap": overlap,
        "list": base.name,
        "list_digest": base.digest,
        "num_images": len(base),
    }
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_indices(
    indices: np.ndarray,
    path: str,
    base: BaseList,
    step: int,
    split: str,
    spot_filter: SplitFilter,
) -> np.ndarray:
    """Validate a loaded index array; returns it as int64 or raises :class:`DatasetError`."""
    where = f"split file {path!r} ({split}, step {step})"
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise DatasetError(
            f"{where}: expected a 1-D integer array, got {indices.dtype} of shape {indices.shape}"
        )
    indices = indices.astype(np.int64)
    if indices.size == 0:  # valid format; build_dataset reports an empty selection
        return indices
    if indices.min() < 0 or indices.max() >= len(base):
        raise DatasetError(
            f"{where}: indices span {indices.min()}..{indices.max()} but {base.source} has {len(base)} "
            "images (0-based); the file belongs to another dataset or list"
        )
    if np.unique(indices).size != indices.size:
        raise DatasetError(f"{where}: contains duplicate indices")
    for position in np.unique(
        np.linspace(0, indices.size - 1, min(SPOT_CHECKS, indices.size)).astype(np.int64)
    ):
        index = int(indices[position])
        present = np.flatnonzero(labels_present(base.images[index], base.labels[index], base.dataset))
        if not keep_image(present, spot_filter.current, spot_filter.old, spot_filter.overlap):
            raise DatasetError(
                f"{where}: image {base.images[index]!r} (index {index}) does not belong to this step "
                f"(it contains labels {present.tolist()}; the step's classes are "
                f"{list(spot_filter.current)}, overlap={spot_filter.overlap}); the file is stale or "
                "belongs to another task, step or overlap setting"
            )
    return indices


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"split file {path!r} cannot be read as a .npy array: {error}") from None


def save_indices(path: str, indices: np.ndarray) -> None:
    """Write an index array atomically in the reference format (1-D int64 .npy)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda handle: np.save(handle, np.asarray(indices, dtype=np.int64)), "wb")


def _load_cached(
    path: str, expected: str, base: BaseList, step: int, split: str, spot: SplitFilter
) -> Optional[np.ndarray]:
    """Cached indices if the file exists, matches ``expected`` and passes the checks, else None."""
    sidecar = path[: -len(".npy")] + ".json"
    try:
        with open(sidecar) as handle:
            stored = json.load(handle).get("fingerprint")
    except (OSError, ValueError):
        return None
    if stored != expected or not os.path.isfile(path):
        return None
    try:
        return check_indices(_load_npy(path), path, base, step, split, spot)
    except DatasetError as error:
        LOGGER.warning("recomputing the cached split: %s", error)
        return None


def _file_stem(base: BaseList, split: str) -> str:
    """Name stem of a split's index file; the test split drawn from the training images
    (``--val_on_trainset``) is ``test_on_train``, as in the reference."""
    if split == "test" and base.name == list_name_for_split(base.dataset, "train"):
        return "test_on_train"
    return split


def _compute_into_cache(
    base: BaseList, dataset: str, root: str, task: str, split: str, overlap: bool, num_workers: Optional[int]
) -> Dict[int, np.ndarray]:
    LOGGER.info(
        "computing %s splits of %s %s%s from %s",
        split,
        dataset,
        task,
        " (overlap)" if overlap else "",
        base.source,
    )
    all_steps = compute_split_indices(base, dataset, task, split, overlap, num_workers)
    folder = cache_folder(dataset, root, task, overlap)
    for step, indices in all_steps.items():
        path = os.path.join(folder, f"{_file_stem(base, split)}-{step}.npy")
        save_indices(path, indices)
        meta = {
            "fingerprint": fingerprint(base, dataset, task, step, split, overlap),
            "dataset": dataset,
            "task": task,
            "step": step,
            "split": split,
            "overlap": overlap,
            "list": base.source,
            "num_images": int(indices.size),
        }
        atomic_write(path[: -len(".npy")] + ".json", lambda handle: json.dump(meta, handle, indent=1), "w")
    return all_steps


def _external_file(split_dir: str, split: str, stem: str, step: int) -> Optional[str]:
    names = [f"{stem}-{step}.npy"] + ([f"test_on_val-{step}.npy"] if stem == "test" else [])
    for name in names:
        if os.path.isfile(os.path.join(split_dir, name)):
            return os.path.join(split_dir, name)
    if split == "train":
        raise FileNotFoundError(
            f"split file {os.path.join(split_dir, names[0])!r} does not exist (--split_dir)"
        )
    return None


def _prepare_indices(
    base: BaseList,
    dataset: str,
    root: str,
    task: str,
    step: int,
    split: str,
    overlap: bool,
    split_dir: Optional[str],
    num_workers: Optional[int],
) -> np.ndarray:
    step_filter = split_filter(dataset, task, step, split, overlap)
    if split_dir is not None:
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"split folder {split_dir!r} does not exist (--split_dir)")
        path = _external_file(split_dir, split, _file_stem(base, split), step)
        if path is not None:
            spot = step_filter
            if label_family(dataset) == "ade":
                spot = SplitFilter(step_filter.current, step_filter.old, True)
            return check_indices(_load_npy(path), path, base, step, split, spot)
    path = os.path.join(cache_folder(dataset, root, task, overlap), f"{_file_stem(base, split)}-{step}.npy")
    expected = fingerprint(base, dataset, task, step, split, overlap)
    cached = _load_cached(path, expected, base, step, split, step_filter)
    if cached is not None:
        return cached
    return _compute_into_cache(base, dataset, root, task, split, overlap, num_workers)[step]


def on_main_process(prepare: Callable[[], T]) -> T:
    """Run ``prepare`` on rank 0 only and broadcast its result (or its error) to every rank.

    Without an initialised multi-process group it just calls ``prepare``. With NCCL, the
    current CUDA device must be set before (the broadcast runs on it).
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return prepare()
    payload: List[object] = [None, None]
    if dist.get_rank() == 0:
        try:
            payload = [prepare(), None]
        except Exception as error:  # re-raised below, after the other ranks have been told
            payload = [None, f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    if payload[1] is not None:
        error = DatasetError(f"rank 0 failed to prepare the dataset: {payload[1]}")
        error.raised_on_every_rank = True  # rank 0 reports its own
        raise error
    return payload[0]  # type: ignore[return-value]


def load_split_indices(
    base: BaseList,
    root: str,
    task: str,
    step: int,
    split: str,
    overlap: bool,
    split_dir: Optional[str] = None,
    num_workers: Optional[int] = None,
) -> np.ndarray:
    """Base indices of (task, step, split, overlap): from ``split_dir``, the cache, or computed."""
    return on_main_process(
        lambda: _prepare_indices(base, base.dataset, root, task, step, split, overlap, split_dir, num_workers)
    )


def write_reference_splits(
    dataset: str, root: str, task: str, overlap: bool, out: str, num_workers: Optional[int] = None
) -> List[str]:
    """Write ``train-<step>.npy`` of every step of ``task`` into ``out``; return the paths."""
    if dataset == "synthetic":
        ensure_synthetic_voc(root)
    base = read_base_list(dataset, root, "train")
    paths = []
    for step, indices in compute_split_indices(base, dataset, task, "train", overlap, num_workers).items():
        path = os.path.join(out, f"train-{step}.npy")
        save_indices(path, indices)
        paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write the training split files of an incremental task.")
    parser.add_argument("--dataset", required=True, choices=sorted(TASKS))
    parser.add_argument(
        "--data_root",
        required=True,
        help="folder that contains PascalVOC12/, ADEChallengeData2016/ or SyntheticVOC/",
    )
    parser.add_argument("--task", required=True)
    parser.add_argument("--overlap", action="store_true", help="overlapped setting (default: disjoint)")
    parser.add_argument("--out", required=True, help="output folder for train-<step>.npy")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="label-reading processes (default: CPUs, at most 16)"
    )
    args = parser.parse_args(argv)
    if args.task not in TASKS[args.dataset]:
        parser.error(
            f"unknown task {args.task!r} for {args.dataset}; valid: {', '.join(TASKS[args.dataset])}"
        )
    try:
        paths = write_reference_splits(
            args.dataset, args.data_root, args.task, args.overlap, args.out, args.num_workers
        )
    except (DatasetError, FileNotFoundError) as error:
        parser.exit(1, f"error: {error}\n")
    for path in paths:
        print(f"{path}: {np.load(path).size} images")


if __name__ == "__main__":
    main()
