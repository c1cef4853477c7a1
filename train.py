"""Train and/or test incremental segmentation steps.

    python train.py --dataset synthetic --task 15-5 --step all --method MiB ...
    torchrun --nproc_per_node 2 train.py ...        (or srun under SLURM)

Exit codes: 0 on success; 1 on a run failure (corrupt checkpoint, run already running, write
error, NaN/Inf loss, hung or dead process: the message says what to do); 3 when a
SIGTERM/SIGUSR1 stopped training after an in-step checkpoint was written (rerun the same command
to resume).
"""
from __future__ import annotations

import sys

from segmentation import distributed
from segmentation.engine.logger import setup_logging
from segmentation.engine.options import parse_options
from segmentation.engine.run import RUN_FAILURES, main
from segmentation.engine.trainer import TrainingInterrupted

EXIT_FAILED = 1
EXIT_INTERRUPTED = 3


def cli(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    setup_logging(distributed.read_env().rank)
    try:
        main(opts)
    except TrainingInterrupted as stopped:
        print(f"{stopped}; an in-step checkpoint was written, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except RUN_FAILURES as failure:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(cli())
