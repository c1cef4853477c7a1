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
from segmentation.engine.options import EXIT_FAILURE, EXIT_USAGE, HELP_POINTER, debug_requested, parse_options
from segmentation.launch_env import launched_by_torchrun, read_env

EXIT_INTERRUPTED = 3
# How long a process other than rank 0 waits under torchrun before it exits with an error that
# rank 0 reports: torchrun stops the other processes as soon as one exits.
REPORT_GRACE_SECONDS = 5.0


def cli(argv: list[str] | None = None) -> int:
    env = read_env()
    # Every process of a launch parses the same options: the first one reports what is wrong.
    try:
        with _quiet(env.rank != 0):
            opts = parse_options(argv)
    except SystemExit as stop:
        if stop.code:
            _let_rank_0_report(env.rank)
        raise
    from segmentation.engine.logger import setup_logging
    from segmentation.engine.preflight import SetupError, UsageError
    from segmentation.engine.run import RUN_FAILURES, main
    from segmentation.engine.trainer import TrainingInterrupted
    from segmentation.signals import stop_when_launcher_dies

    setup_logging(env.rank)
    if launched_by_torchrun():
        stop_when_launcher_dies()
    try:
        main(opts)
    except TrainingInterrupted as stopped:
        if env.rank == 0:  # every process stopped after the same iteration
            print(stopped, file=sys.stderr)
        else:
            _let_rank_0_report(env.rank)
        return EXIT_INTERRUPTED
    except Exception as error:
        if opts.debug or debug_requested(argv):
            raise
        # An error that every process raises alike (a failed check, a diverged loss, a locked run
        # or corrupt checkpoint) is reported by rank 0 alone; the error of one process by it.
        every_rank = getattr(error, "raised_on_every_rank", False)
        if env.rank == 0 or not every_rank:
            where = f"rank {env.rank}: " if env.world_size > 1 and not every_rank else ""
            # Run failures (corrupt file, lock, write error, NaN, timeout) say what to do themselves.
            known = isinstance(error, (UsageError, SetupError, *RUN_FAILURES))
            hint = "" if known else f" ({type(error).__name__}; rerun with --debug for the traceback)"
            pointer = HELP_POINTER if isinstance(error, UsageError) else ""
            sys.stdout.flush()
            print(f"train.py: error: {where}{error}{hint}{pointer}", file=sys.stderr)
        else:
            _let_rank_0_report(env.rank)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
    return 0


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
