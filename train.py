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

import sys

# Only the option parser is imported before parsing: --help and usage errors need no torch.
from segmentation.engine.options import debug_requested, parse_options

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


def cli(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    from segmentation import distributed
    from segmentation.engine.logger import setup_logging
    from segmentation.engine.preflight import SetupError, UsageError
    from segmentation.engine.run import RUN_FAILURES, main
    from segmentation.engine.trainer import TrainingInterrupted

    env = distributed.read_env()
    setup_logging(env.rank)
    try:
        main(opts)
    except TrainingInterrupted as stopped:
        print(f"{stopped}; an in-step checkpoint was written, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if opts.debug or debug_requested(argv):
            raise
        checked = isinstance(error, (UsageError, SetupError))
        # A failed check is the same on every rank (they were gathered): rank 0 reports it.
        if not checked or env.rank == 0:
            where = f"rank {env.rank}: " if env.world_size > 1 and not checked else ""
            # Run failures (corrupt file, lock, write error, NaN, timeout) say what to do themselves.
            known = checked or isinstance(error, RUN_FAILURES)
            hint = "" if known else f" ({type(error).__name__}; rerun with --debug for the traceback)"
            sys.stdout.flush()
            print(f"train.py: error: {where}{error}{hint}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(cli())
