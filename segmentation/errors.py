"""The errors a run reports to its user, each with the exit code ``train.py`` ends with.

A ``RunError``'s message says what happened and what to do, so ``train.py`` prints it as one
paragraph without a traceback. Errors that every process of a launch raises alike (a failed check,
a corrupt checkpoint every rank read, a diverged loss the ranks agreed on) set
``raised_on_every_rank``: rank 0 alone reports them.

Exit codes: 2 for a wrong option value (change the command line), 1 for anything else (a missing,
unreadable or unwritable file, bad data, a failed run), 3 when a signal stopped training after an
in-step checkpoint was written (rerun the same command to resume).
"""
from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


class RunError(Exception):
    """An error whose message tells the user what to do; ``train.py`` exits with ``exit_code``."""

    exit_code = EXIT_FAILURE
    raised_on_every_rank = False


class UsageError(RunError, ValueError):
    """An option value that cannot work: the command line must change."""

    exit_code = EXIT_USAGE
    raised_on_every_rank = True  # every rank parses and checks the same options


class SetupError(RunError, RuntimeError):
    """A file or folder the options name (or imply) is missing, unreadable or unwritable."""

    raised_on_every_rank = True
