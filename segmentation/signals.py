"""The stop signals a cluster sends before pre-empting or killing a job.

The trainer catches them to write a checkpoint; processes forked from it (data-loader and split
workers) inherit that handler and must get the default back, so that they still die on SIGTERM.
"""
from __future__ import annotations

import signal
from typing import Optional

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def restore_default_stop_handlers(worker_id: Optional[int] = None) -> None:
    """Default handlers for the stop signals; takes a worker id so it can be a ``worker_init_fn``."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
