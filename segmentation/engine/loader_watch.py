"""Which sample a DataLoader worker was reading when it died or hung.

``SampleTracker`` wraps a dataset; each worker writes the index it is reading into a slot of a
shared-memory array before loading it and clears it after. When the loader fails (a worker
killed by the out-of-memory killer, a timeout), ``describe_failure`` names those samples and
``kill_workers`` ends the workers still running (they ignore SIGTERM, see ``segmentation.signals``).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, List

from torch.utils.data import Dataset, get_worker_info

from segmentation.errors import RunError

_IDLE = -1


class SampleTracker(Dataset):
    """``dataset`` with a record of the sample each of ``num_workers`` workers is reading."""

    def __init__(self, dataset: Dataset, num_workers: int) -> None:
        self.dataset = dataset
        self.reading = multiprocessing.Array("q", [_IDLE] * max(1, num_workers), lock=False)
        self.pids = multiprocessing.Array("q", [0] * max(1, num_workers), lock=False)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        self.pids[slot] = os.getpid()
        self.reading[slot] = index
        item = self.dataset[index]
        self.reading[slot] = _IDLE
        return item

    def samples_being_read(self) -> List[str]:
        """"worker w: sample i (file)" for every worker that was in the middle of a sample."""
        paths = getattr(self.dataset, "image_paths", None)
        found = []
        for worker, index in enumerate(self.reading):
            if index == _IDLE:
                continue
            name = f" ({paths[index]})" if paths is not None and 0 <= index < len(paths) else ""
            found.append(f"worker {worker}: sample {index}{name}")
        return found

    def kill_workers(self) -> None:
        """SIGKILL the workers of the failed loader that are still alive (a stalled one would
        otherwise live on: the loader ends its workers with SIGTERM, which they ignore)."""
        pids = set(self.pids)
        for child in multiprocessing.active_children():
            if child.pid in pids:
                child.kill()
                child.join()

    def describe_failure(self, error: BaseException) -> str:
        reading = self.samples_being_read()
        where = "; ".join(reading) if reading else "no sample was being read"
        return f"the training data loader failed ({error}); being read at that moment: {where}"


class DataLoaderFailure(RunError, RuntimeError):
    """A DataLoader worker died or did not deliver a batch in time."""
