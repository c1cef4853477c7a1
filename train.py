"""Train and/or test incremental segmentation steps.

    python train.py --dataset synthetic --task 15-5 --step all --method MiB ...
    torchrun --nproc_per_node 2 train.py ...        (or srun under SLURM)

Exit codes: 0 on success; 2 for a usage error (a wrong option, found while parsing or by the
checks before training); 1 for any other error (a missing, corrupt or unwritable file, a run of
the same name already running, a NaN/Inf loss, a hung or dead process: the message says what to
do); 3 when a SIGTERM/SIGUSR1 stopped training after an in-step checkpoint was written (rerun the
same command to resume). Errors are reported as one paragraph; ``--debug`` (or
SEGMENTATION_DEBUG=1) shows the Python traceback instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

# Only the option parser is imported before parsing: --help and usage errors need no torch.
from segmentation.engine.options import HELP_POINTER, debug_requested, parse_options
from segmentation.errors import EXIT_FAILURE, RunError, UsageError
from segmentation.launch_env import launched_by_torchrun, read_env

# How long a process other than rank 0 waits under torchrun before it exits with an error that
# rank 0 reports: torchrun stops the other processes as soon as one exits.
REPORT_GRACE_SECONDS = 5.0


def cli(argv: list[str] | None = None) -> int:
    env = read_env()
    try:
        # Every process of a launch parses the same options: rank 0 reports what is wrong (and
        # prints --help).
        with _quiet(env.rank != 0):
            config = parse_options(argv)
    except RunError as error:
        return _report(error, env, debug_requested(argv))
    from segmentation.engine.logger import setup_logging
    from segmentation.engine.run import main
    from segmentation.engine.trainer import TrainingInterrupted
    from segmentation.signals import stop_when_launcher_dies

    setup_logging(env.rank)
    if launched_by_torchrun():
        stop_when_launcher_dies()
    try:
        main(config)
    except TrainingInterrupted as stopped:
        if env.rank == 0:  # every process stopped after the same iteration
            print(stopped, file=sys.stderr)
        else:
            _let_rank_0_report(env.rank)
        return stopped.exit_code
    except Exception as error:
        if config.debug or debug_requested(argv):
            raise
        return _report(error, env, False)
    return 0


def _report(error: Exception, env, debug: bool) -> int:
    """Print ``error`` as one paragraph (on rank 0 alone when every rank raised it) and return the
    exit code; with ``debug`` a ``RunError`` is raised again, to show its traceback."""
    if debug:
        raise error
    every_rank = getattr(error, "raised_on_every_rank", False)
    if env.rank == 0 or not every_rank:
        where = f"rank {env.rank}: " if env.world_size > 1 and not every_rank else ""
        # A RunError says what to do itself; anything else is a defect to report with its traceback.
        hint = "" if isinstance(error, RunError) else f" ({type(error).__name__}; rerun with --debug for the traceback)"
        pointer = HELP_POINTER if isinstance(error, UsageError) else ""
        sys.stdout.flush()
        print(f"train.py: error: {where}{error}{hint}{pointer}", file=sys.stderr)
    else:
        _let_rank_0_report(env.rank)
    return error.exit_code if isinstance(error, RunError) else EXIT_FAILURE


def _let_rank_0_report(rank: int) -> None:
    """Under torchrun, on a rank other than 0: wait, so that rank 0 can print the error (or stop)
    that every process met before torchrun ends it. srun waits for every process itself."""
    if rank != 0 and launched_by_torchrun():
        time.sleep(REPORT_GRACE_SECONDS)


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Discard what is printed to stdout and stderr inside the block when ``quiet``."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


if __name__ == "__main__":
    sys.exit(cli())
