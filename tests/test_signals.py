"""Worker processes survive the stop signals (Slurm sends them to every process of a job step)
and die with the process that started them."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from segmentation.engine.evaluation import build_eval_loader
from segmentation.engine.trainer import seed_worker
from segmentation.signals import STOP_SIGNALS
from train_cli_worker import REPO_ROOT


class SignalledItems(Dataset):
    """Each item sends the stop signals to the process that loads it, then returns its pid."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        for name in STOP_SIGNALS:
            os.kill(os.getpid(), getattr(signal, name))
        return torch.tensor(os.getpid())


def test_training_loader_workers_survive_the_stop_signals(trainer_handlers):
    loader = DataLoader(SignalledItems(), batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    pids = torch.cat(list(loader))
    assert len(pids) == 4 and os.getpid() not in pids.tolist()


def test_evaluation_loader_workers_survive_the_stop_signals(trainer_handlers):
    loader = build_eval_loader(SignalledItems(), batch_size=1, num_workers=2, device=torch.device("cpu"))
    assert len(torch.cat(list(loader))) == 4


# A process that starts workers which block in their first item, prints their pids, then waits.
WORKERS_BLOCKED = """
import os, sys, time
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from segmentation.data import splits
from segmentation.engine.trainer import seed_worker

class Blocked(Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, index):
        os.write(1, b"%d\\n" % os.getpid())
        time.sleep(600)

def blocked_scan(image, label, dataset):
    os.write(1, b"%d\\n" % os.getpid())
    time.sleep(600)

if sys.argv[1] == "loader":
    next(iter(DataLoader(Blocked(), batch_size=1, num_workers=2, worker_init_fn=seed_worker)))
else:
    splits.labels_present = blocked_scan
    splits.scan_presence(splits.BaseList("voc", "", "train_aug", "", ("a", "b"), ("a", "b")), num_workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
@pytest.mark.parametrize("workers", ["loader", "scan"])
def test_workers_die_with_their_parent(workers):
    process = subprocess.Popen([sys.executable, "-c", WORKERS_BLOCKED, workers], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(process.stdout.readline()) for _ in range(2)]
        assert all(_alive(pid) for pid in pids)
        process.kill()  # as the out-of-memory killer or a SIGKILL from the launcher would
        process.wait()
        deadline = time.monotonic() + 3  # torch's own check would take 5 s, a blocked worker never
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids)
    finally:
        process.kill()
