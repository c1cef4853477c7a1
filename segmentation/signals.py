"""The stop signals a cluster sends before pre-empting or killing a job, and the worker processes.

The trainer catches them to write a checkpoint. Slurm sends them to every process of a job step,
the data-loader and split workers included; a worker that died of one would fail the run before
the trainer could write its checkpoint. So workers ignore the stop signals (their parent stops
them) and are killed when their parent dies, whatever killed it. A training process started by
torchrun stops (with a checkpoint) when torchrun dies.
"""
from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any, Dict, Optional

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopSignal:
    """Records SIGTERM/SIGUSR1 (SLURM pre-emption, time limit) so the loop can stop cleanly."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum


def detach_worker_from_stop_signals(worker_id: Optional[int] = None) -> None:
    """In a worker process: ignore the stop signals and die with the parent (on Linux).

    Takes a worker id so it can be a DataLoader ``worker_init_fn``.
    """
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    # The trainer starts its loaders' workers from its main thread.
    _on_parent_death(signal.SIGKILL)


def stop_when_launcher_dies() -> None:
    """In a training process started by torchrun: get SIGTERM (stop with a checkpoint) when
    torchrun dies. torchrun passes SIGTERM and SIGINT on to its processes, but a signal it does
    not handle, SIGUSR1 included, kills it and would leave them training without a launcher."""
    _on_parent_death(signal.SIGTERM)


def _on_parent_death(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when the thread that started it exits
    (Linux only; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
