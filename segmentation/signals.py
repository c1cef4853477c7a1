"""The stop signals a cluster sends before pre-empting or killing a job, and the worker processes.

The trainer catches them to write a checkpoint. Slurm sends them to every process of a job step,
the data-loader and split workers included; a worker that died of one would fail the run before
the trainer could write its checkpoint. So workers ignore the stop signals (their parent stops
them) and are killed when their parent dies, whatever killed it.
"""
from __future__ import annotations

import ctypes
import signal
import sys
from typing import Optional

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def detach_worker_from_stop_signals(worker_id: Optional[int] = None) -> None:
    """In a worker process: ignore the stop signals and die with the parent (on Linux).

    Takes a worker id so it can be a DataLoader ``worker_init_fn``.
    """
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # SIGKILL when the thread that started this process exits: the main thread of the
        # trainer, which starts its loaders' workers.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
