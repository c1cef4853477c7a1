"""The files of one run, and the only place where rank 0 writes them while the other ranks wait.

A run owns two folders, ``<checkpoint_dir>/<dataset>-<task>[-ov]/<name>/`` (checkpoints) and
``<logdir>/<dataset>-<task>[-ov]/<name>/`` (the log, results, TensorBoard events). ``RunFiles``
creates them (and removes what it created when the launch fails before training), holds the lock
of the checkpoint folder (one launch per run) and removes the temporary files of writes a killed
launch left, compares a new launch's options with those an earlier run stored under the same
``--name`` (refusing, or with ``--overwrite`` removing the earlier files of the differing steps),
and writes the step checkpoints, in-step checkpoints, results and the run log: on rank 0, with a
barrier after each write that the other ranks need to see.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from segmentation import distributed
from segmentation.config import Config
from segmentation.engine import checkpoint
from segmentation.engine.logger import Logger, RunLog
from segmentation.engine.optim import step_learning_rate
from segmentation.engine.run_lock import RunLock, RunLockedError
from segmentation.errors import SetupError, UsageError
from segmentation.faults import fault_point
from segmentation.files import atomic_write, remove_stale_temporaries
from segmentation.methods import neutral_options, step0_independent_options

LOGGER = logging.getLogger(__name__)

# In the run's log folder: what the console showed, appended by every launch of the run.
RUN_LOG_NAME = "train.log"

# Options that do not change what a run computes: they may differ between runs of one --name
# (with the methods' own such options, read from the registry when compared).
NOT_RESULT_CHANGING = frozenset({
    "num_workers", "print_interval", "val_interval", "ckpt_interval", "sample_num", "visualize",
    "logdir", "checkpoint_dir", "data_root", "name", "resume", "local_rank", "steps", "step_ckpt",
    "ckpt", "test", "notes", "debug", "overwrite", "device", "channels_last",
    "allow_synthetic_in_data_root", "allow_regenerated_splits", "lr", "incremental_lr",
    "collective_timeout", "max_bad_iterations", "norm_kernels",
    "dist_backend",
})

# Options a step-0 model does not depend on: the methods' options that act from step 1 on
# (distillation, unbiased losses, classifier init, penalty weight), the masking of old labels, or
# names. So one step-0 model can start every method and task with its classes (checked when it is
# loaded), as the method benchmark and the original authors' 15-1 runs do. A step 1 that needs
# state of its method's step 0 refuses a step-0 checkpoint without it.
STEP0_INDEPENDENT = frozenset({"method", "task", "no_mask"})


def run_folder(root: str, config: Config) -> Path:
    """``<root>/<dataset>-<task>[-ov]/<name>`` (same layout for logs and checkpoints)."""
    return Path(checkpoint.run_dir(root, config.dataset, config.task, config.overlap, config.name))


def differing_options(stored: Dict[str, Any], current: Dict[str, Any], step: int) -> List[str]:
    """``--option stored -> current`` for each result-changing option that differs at ``step``.

    A run depends on the global batch, ``batch_size`` x ``processes`` (the number of processes, a
    key of its own next to the options), not on how it is split over processes; where the stored
    options lack ``processes`` (files written before it was stored), ``batch_size`` is compared.
    """
    differences = []
    # ImageNet weights only initialise step 0.
    ignored = NOT_RESULT_CHANGING | neutral_options() | {"batch_size", "processes"} | (
        STEP0_INDEPENDENT | step0_independent_options() if step == 0 else {"pretrained", "no_pretrained"})
    for name in sorted(set(stored) & set(current) - ignored):
        if stored[name] != current[name]:
            differences.append(f"--{name} {stored[name]} -> {current[name]}")
    if "processes" in stored and "processes" in current:
        if stored["batch_size"] * stored["processes"] != current["batch_size"] * current["processes"]:
            differences.append(f"global batch {_global_batch(stored)} -> {_global_batch(current)}")
    elif stored.get("batch_size") != current.get("batch_size"):
        differences.append(f"--batch_size {stored.get('batch_size')} -> {current.get('batch_size')}")
    stored_lr, current_lr = step_learning_rate(stored, step), step_learning_rate(current, step)
    if stored_lr != current_lr:
        differences.append(f"learning rate of step {step} {stored_lr} -> {current_lr}")
    return differences


def _global_batch(options: Dict[str, Any]) -> str:
    batch_size, processes = options["batch_size"], options["processes"]
    return f"{batch_size * processes} ({batch_size} per process x {processes} process{'es' if processes > 1 else ''})"


def _global_batch_hint(stored: Dict[str, Any], processes: int) -> str:
    """What to pass to keep the global batch of ``stored`` on ``processes`` processes."""
    total = stored["batch_size"] * stored["processes"]
    keep = (f"pass --batch_size {total // processes} to keep it on {processes} process(es)" if total % processes == 0
            else f"it cannot be split evenly over {processes} processes")
    return (f" The learning-rate schedule and the order of the samples depend on the global batch "
            f"({total}): {keep}.")


def stored_options(checkpoint_dir: Path, log_dir: Path, step: int) -> Optional[Tuple[Dict[str, Any], Path]]:
    """The options an earlier run stored for ``step`` (results file, step or in-step checkpoint),
    with its number of processes as ``processes`` where the file has it, and the file they come from."""
    results = log_dir / f"step{step}.json"
    if results.is_file():
        try:
            with open(results) as handle:
                return _with_processes(json.load(handle), results)
        except (OSError, ValueError):
            pass
    candidates = [Path(checkpoint.step_checkpoint_path(checkpoint_dir, step))]
    candidates += [Path(path) for path in reversed(checkpoint.InStepCheckpoints(checkpoint_dir, step).paths())]
    for path in candidates:
        if path.is_file():
            try:
                return _with_processes(checkpoint.load_checkpoint(path), path)
            except (OSError, ValueError):
                continue
    return None


def _with_processes(saved: Dict[str, Any], path: Path) -> Optional[Tuple[Dict[str, Any], Path]]:
    options = saved.get("options")
    if options is None:
        return None
    if "processes" in saved:
        options = dict(options, processes=saved["processes"])
    return options, path


def files_of_steps(checkpoint_dir: Path, log_dir: Path, first_step: int) -> List[Path]:
    """The files and folders of step ``first_step`` and later: checkpoints, results (``--test``'s
    too), the steps' event folders, and the test's event files (``test/...step<t>``, ``eval/...``)."""
    found = []
    for folder in (checkpoint_dir, log_dir):
        if folder.is_dir():
            for entry in folder.iterdir():
                if _is_of_step(entry.name.removeprefix("eval-").split(".")[0].split("-")[0], first_step):
                    found.append(entry)
    for folder in (log_dir / "test", log_dir / "eval"):
        if folder.is_dir():
            found.extend(entry for entry in folder.iterdir() if _is_of_step(entry.name.rsplit(".", 1)[-1], first_step))
    return found


def _is_of_step(part: str, first_step: int) -> bool:
    """Whether ``part`` of a file name is ``step<t>`` with t >= ``first_step``."""
    return part.startswith("step") and part[4:].isdigit() and int(part[4:]) >= first_step


def remove_created(created: List[Path]) -> None:
    """Remove the folders ``created`` (outermost first), deepest first, with whatever an unfinished
    run put in them; a folder holding a step-final checkpoint or results is kept."""
    for folder in reversed(created):
        if folder.is_dir() and not any(_is_finished_step_file(path) for path in folder.rglob("step*")):
            shutil.rmtree(folder, ignore_errors=True)


def _is_finished_step_file(path: Path) -> bool:
    """``step<t>.pth`` (and in-step checkpoints and passes, kept for resuming) or a ``step<t>.json`` result."""
    stem, _, suffix = path.name.partition(".")
    return suffix in ("pth", "json") and stem[4:].split("-")[0].isdigit()


class InStepWriter:
    """The in-step checkpoints of one step as training saves them: every rank calls ``save`` (the
    state is gathered on every rank), rank 0 writes."""

    def __init__(self, checkpoints: checkpoint.InStepCheckpoints, main: bool) -> None:
        self.checkpoints = checkpoints
        self.main = main

    def save(self, state: Dict[str, Any], iteration: int) -> None:
        if self.main:
            self.checkpoints.save(state, iteration)

    def save_data_pass(self, state: Dict[str, Any]) -> None:
        if self.main:
            self.checkpoints.save_data_pass(state)


class RunFiles:
    """The folders and files of the run ``config`` describes, for this rank."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.checkpoint_dir = run_folder(config.checkpoint_dir, config)
        self.log_dir = run_folder(config.logdir, config)
        self.main = distributed.is_main_process()
        self.created: List[Path] = []
        self.notes: List[str] = []
        # (first step whose files --overwrite replaces, the differing options)
        self._overwrite: Optional[Tuple[int, List[str]]] = None
        self._lock: Optional[RunLock] = None
        self._run_log: Optional[RunLog] = None

    # ---------------------------------------------------------------- paths
    def step_checkpoint(self, step: int) -> Path:
        return Path(checkpoint.step_checkpoint_path(self.checkpoint_dir, step))

    def results(self, step: int) -> Path:
        """The test results of ``step``: ``step<t>.json``, or ``eval-step<t>.json`` with ``--test``
        (so that the training's results are kept)."""
        return self.log_dir / (f"eval-step{step}.json" if self.config.test else f"step{step}.json")

    def in_step(self, step: int) -> checkpoint.InStepCheckpoints:
        return checkpoint.InStepCheckpoints(self.checkpoint_dir, step)

    # ---------------------------------------------------------------- before training
    def create_folders(self) -> None:
        """Rank 0 creates the two folders (recording what it created) and proves it can write there."""
        if self.main:
            self._make_writable_folder(self.checkpoint_dir, "--checkpoint_dir")
            self._make_writable_folder(self.log_dir, "--logdir")

    def _make_writable_folder(self, folder: Path, option: str) -> None:
        missing = []
        parent = folder
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.created.extend(reversed(missing))
            probe = folder / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise SetupError(f"{option}: cannot write into {folder} ({error.strerror or error}); "
                             f"give a writable folder as {option}") from error

    def remove_created(self) -> None:
        """Rank 0 removes the folders ``create_folders`` created (a launch that failed before training)."""
        if self.main:
            remove_created(self.created)

    def check_same_name(self) -> None:
        """Refuse a run whose stored options for a selected step differ (unless --overwrite)."""
        config = self.config
        if config.test:
            return
        current = dict(config.as_dict(), processes=distributed.world_size())
        for step in config.steps:
            stored = stored_options(self.checkpoint_dir, self.log_dir, step)
            differences = differing_options(stored[0], current, step) if stored else []
            if not differences:
                continue
            if not config.overwrite:
                why = (_global_batch_hint(stored[0], current["processes"])
                       if any(d.startswith("global batch") for d in differences) else "")
                raise UsageError(
                    f"--name {config.name}: an earlier run under this name has step {step} with other "
                    f"options (stored in {stored[1]}): {'; '.join(differences)}. Its results would be "
                    f"reported for the new options.{why} Give another --name, or pass --overwrite to "
                    f"replace the files of step {step} and later")
            self._overwrite = (step, differences)
            return

    def lock(self) -> None:
        """Rank 0 takes the lock of the checkpoint folder (every rank raises ``RunLockedError`` if it
        is held), removes the temporary files of writes a killed run left in both folders, and, with
        ``--overwrite``, the earlier run's files of the first differing step and later."""
        failure: Optional[str] = None
        if self.main:
            lock = RunLock(self.checkpoint_dir)
            try:
                lock.acquire()
                self._lock = lock
                for stale in [*remove_stale_temporaries(self.checkpoint_dir), *remove_stale_temporaries(self.log_dir)]:
                    LOGGER.info("removed %s, left by a write that was interrupted", stale)
            except RunLockedError as error:
                failure = str(error)
        failure = distributed.broadcast_object(failure, what=f"rank 0 locking {self.checkpoint_dir}")
        if failure is not None:
            raise RunLockedError(failure)
        if self.main and self._overwrite is not None:
            step, differences = self._overwrite
            for path in files_of_steps(self.checkpoint_dir, self.log_dir, step):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.notes.append(f"--overwrite: removed the files of step {step} and later of "
                              f"the earlier run ({'; '.join(differences)})")
        distributed.barrier("rank 0 removing the files replaced by --overwrite")

    def open_run_log(self) -> None:
        """Rank 0 appends the console's lines to ``train.log`` from now on."""
        if self.main:
            self._run_log = RunLog(self.log_dir / RUN_LOG_NAME)

    def log_to_run_log(self, logger: logging.Logger, level: int, message: str) -> None:
        """A line of ``logger`` for ``train.log`` only (what ``train.py`` prints itself, e.g. the
        error that ends the run)."""
        if self._run_log is not None:
            self._run_log.write(logger, level, message)

    def close(self, failed: bool = False) -> None:
        """Close the run log and release the lock; after a failure before any step finished, rank 0
        also removes the folders it created."""
        if self._run_log is not None:
            self._run_log.close()
            self._run_log = None
        if failed:
            self.remove_created()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---------------------------------------------------------------- during a step
    def event_logger(self, folder: str, file_suffix: str = "") -> Logger:
        """TensorBoard events under ``<log folder>/<folder>``, written by rank 0 (with ``--visualize``)."""
        return Logger(str(self.log_dir / folder), enabled=self.main and self.config.visualize,
                      file_suffix=file_suffix)

    def in_step_writer(self, step: int) -> InStepWriter:
        return InStepWriter(self.in_step(step), self.main)

    def load_data_pass(self, step: int) -> Optional[Dict[str, Any]]:
        """The saved pass over the training set before ``step``'s training, as rank 0 reads it
        (every rank must continue it from the same batch)."""
        saved = self.in_step(step).load_data_pass() if self.main else None
        return distributed.broadcast_object(saved, what=f"the saved pass of step {step}")

    def clear_in_step(self, step: int) -> None:
        """Rank 0 deletes the in-step checkpoints of ``step``."""
        if self.main:
            self.in_step(step).clear()

    def set_aside_corrupt(self, path: Path) -> None:
        """Rank 0 renames a corrupt step checkpoint ``<name>.corrupt`` (so the step trains again)."""
        if self.main:
            path.replace(path.with_name(path.name + ".corrupt"))
        distributed.barrier("the removal of the corrupt step checkpoint")

    def save_step_checkpoint(self, state: Dict[str, Any], step: int, verify: Callable[[Path], Any]) -> None:
        """Rank 0 writes ``step<t>.pth`` atomically and reads it back with ``verify`` before the
        in-step checkpoints that could rebuild it are deleted."""
        path = self.step_checkpoint(step)
        if self.main:
            checkpoint.atomic_save(state, path)
            verify(path)
            LOGGER.info("step %d: saved %s", step, path)
            fault_point("after-step-checkpoint")
        distributed.barrier(f"rank 0 writing {path}")
        self.clear_in_step(step)

    def write_results(self, results: Dict[str, Any], path: Path) -> None:
        """Rank 0 writes ``results`` as indented JSON, atomically."""
        if self.main:
            atomic_write(path, lambda handle: json.dump(results, handle, indent=2, default=str), "w")
        distributed.barrier(f"rank 0 writing {path}")
