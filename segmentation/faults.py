"""Fault injection for the fault-tolerance tests: kill or hang this process at a named point.

``SEGMENTATION_FAULT=<action>:<point>[@<rank>]`` makes the process of that rank (any rank when
omitted) ``kill`` itself with SIGKILL, ``term``inate itself with SIGTERM (a scheduler's stop
signal, at an exact point) or ``hang`` (sleep for ever, as a rank stuck in a collective does) the
first time it reaches ``fault_point(<point>)``. Unset (the normal case),
``fault_point`` does nothing but read the variable.

Points: ``train-iteration:<k>`` (after the k-th optimisation step of a step), ``data-pass-batch:<k>``
(after the k-th batch of a method's pass over the training set before training), ``validation`` and ``test`` (during an
evaluation), ``write:<file name>`` (a file written, not yet renamed into place) and
``after-step-checkpoint`` (``step<t>.pth`` written, results not yet).
"""
from __future__ import annotations

import os
import signal
import time

from .launch_env import read_env

ENV_VAR = "SEGMENTATION_FAULT"


def fault_point(point: str) -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    action, _, target = spec.partition(":")
    target_point, _, target_rank = target.partition("@")
    if target_point != point:
        return
    if target_rank and target_rank != str(read_env().rank):  # torchrun's RANK or srun's SLURM_PROCID
        return
    # Only once per process tree generation: a restarted worker (torchrun) runs normally.
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "hang":
        for name in ("SIGTERM", "SIGUSR1"):  # a hung process still dies when the launcher stops it
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        while True:
            time.sleep(1)
    else:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown action {action!r}; valid: kill, term, hang")
