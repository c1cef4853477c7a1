"""Checks run on every rank before the first training iteration.

Each failed check raises ``UsageError`` (a wrong option value: the user changes the command line)
or ``SetupError`` (a file or folder is missing, unreadable or unwritable), with one message that
names the option or file and says what to do. ``run_checks`` gathers the outcome of every rank so
that all ranks stop together with the same error.

Also here: the comparison of a new run's options with those stored by an earlier run under the
same ``--name`` (``differing_options``), so a learning-rate sweep cannot silently reuse results.
"""
from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from segmentation import distributed, tasks
from segmentation.engine import checkpoint
from segmentation.engine.optim import step_learning_rate
from segmentation.engine.original_checkpoint import adapt_checkpoint
from segmentation.methods import active_methods, neutral_options, step0_independent_options

# Options that do not change what a run computes: they may differ between runs of one --name
# (with the methods' own such options, read from the registry when compared).
NOT_RESULT_CHANGING = frozenset({
    "num_workers", "print_interval", "val_interval", "ckpt_interval", "sample_num", "visualize",
    "logdir", "checkpoint_dir", "data_root", "name", "resume", "local_rank", "steps", "step_ckpt",
    "ckpt", "test", "notes", "debug", "overwrite", "device", "channels_last",
    "allow_synthetic_in_data_root", "allow_regenerated_splits", "lr", "incremental_lr",
    "collective_timeout", "max_bad_iterations",
})


class UsageError(ValueError):
    """An option value that cannot work (exit code 2)."""

    raised_on_every_rank = True  # the ranks gather their checks' failures


class SetupError(RuntimeError):
    """A file or folder the run needs is missing, unreadable or unwritable (exit code 1)."""

    raised_on_every_rank = True


# Options a step-0 model does not depend on: the methods' options that act from step 1 on
# (distillation, unbiased losses, classifier init, penalty weight), the masking of old labels, or
# names. So one step-0 model can start every method and task with its classes (checked when it is
# loaded), as the method benchmark and the original authors' 15-1 runs do. A step 1 that needs
# state of its method's step 0 refuses a step-0 checkpoint without it.
STEP0_INDEPENDENT = frozenset({"method", "task", "no_mask"})


def differing_options(stored: Dict[str, Any], current: Dict[str, Any], step: int) -> List[str]:
    """``--option stored -> current`` for each result-changing option that differs at ``step``."""
    differences = []
    # ImageNet weights only initialise step 0.
    ignored = NOT_RESULT_CHANGING | neutral_options() | (
        STEP0_INDEPENDENT | step0_independent_options() if step == 0 else {"pretrained", "no_pretrained"})
    for name in sorted(set(stored) & set(current) - ignored):
        if stored[name] != current[name]:
            differences.append(f"--{name} {stored[name]} -> {current[name]}")
    stored_lr, current_lr = step_learning_rate(stored, step), step_learning_rate(current, step)
    if stored_lr != current_lr:
        differences.append(f"learning rate of step {step} {stored_lr} -> {current_lr}")
    return differences


def stored_options(checkpoint_dir: Path, log_dir: Path, step: int) -> Optional[Dict[str, Any]]:
    """The options an earlier run stored for ``step`` (results file, step or in-step checkpoint)."""
    results = log_dir / f"step{step}.json"
    if results.is_file():
        try:
            with open(results) as handle:
                return json.load(handle).get("options")
        except (OSError, ValueError):
            pass
    candidates = [checkpoint.step_checkpoint_path(checkpoint_dir, step)]
    candidates += reversed(checkpoint.InStepCheckpoints(checkpoint_dir, step).paths())
    for path in candidates:
        if Path(path).is_file():
            try:
                return checkpoint.load_checkpoint(path).get("options")
            except (OSError, ValueError):
                continue
    return None


def _files_of_steps(checkpoint_dir: Path, log_dir: Path, first_step: int) -> List[Path]:
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


def _make_writable_folder(folder: Path, option: str, created: List[Path]) -> None:
    """Create ``folder`` (recording the folders created) and write a file in it to prove it works."""
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing))
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SetupError(f"{option}: cannot write into {folder} ({error.strerror or error}); "
                         f"give a writable folder as {option}") from error


def remove_created(created: List[Path]) -> None:
    """Remove the folders ``run_checks`` created, deepest first, with whatever an unfinished run put
    in them; a folder holding a step-final checkpoint is kept."""
    for folder in reversed(created):
        if folder.is_dir() and not any(_is_finished_step_file(path) for path in folder.rglob("step*")):
            shutil.rmtree(folder, ignore_errors=True)


def _is_finished_step_file(path: Path) -> bool:
    """``step<t>.pth`` (and in-step checkpoints, kept for resuming) or a ``step<t>.json`` result."""
    stem, _, suffix = path.name.partition(".")
    return suffix in ("pth", "json") and stem[4:].split("-iter")[0].isdigit()


class Preflight:
    """The checks of one launch; ``created`` lists the folders they created (rank 0)."""

    def __init__(self, opts: argparse.Namespace, checkpoint_dir: Path, log_dir: Path) -> None:
        self.opts = opts
        self.checkpoint_dir = checkpoint_dir
        self.log_dir = log_dir
        self.created: List[Path] = []
        self.notes: List[str] = []
        self.warnings: List[str] = []
        # (first step whose files --overwrite replaces, the differing options)
        self.overwrite: Optional[Tuple[int, List[str]]] = None

    def check_options(self, world_size: int) -> None:
        from segmentation.models.resnet import RESNET_LAYOUTS

        opts = self.opts
        if opts.backbone not in RESNET_LAYOUTS:
            raise UsageError(f"--backbone {opts.backbone}: unknown backbone; valid: {', '.join(RESNET_LAYOUTS)}")
        if opts.test:
            return
        for method in active_methods(opts):
            self.warnings.extend(method.launch_warnings(opts))
        if opts.norm_act == "iabn_sync" and opts.batch_size * world_size < 2:
            raise UsageError(
                f"--batch_size {opts.batch_size} with {world_size} process: batch normalisation needs "
                "at least 2 images per batch in all (it is synchronised over the processes); raise "
                "--batch_size (the protocol uses 24 in all)")
        if opts.norm_act != "iabn_sync" and opts.batch_size < 2:
            raise UsageError(
                f"--batch_size {opts.batch_size} with --norm_act {opts.norm_act}: normalisation is not "
                "synchronised, so each process needs at least 2 images; raise --batch_size or use "
                "--norm_act iabn_sync")

    def check_folders(self) -> None:
        _make_writable_folder(self.checkpoint_dir, "--checkpoint_dir", self.created)
        _make_writable_folder(self.log_dir, "--logdir", self.created)

    def check_same_name(self) -> None:
        """Refuse a run whose stored options for a selected step differ (unless --overwrite)."""
        opts = self.opts
        if opts.test:
            return
        current = vars(opts)
        for step in opts.steps:
            stored = stored_options(self.checkpoint_dir, self.log_dir, step)
            differences = differing_options(stored, current, step) if stored else []
            if not differences:
                continue
            if not opts.overwrite:
                raise UsageError(
                    f"--name {opts.name}: an earlier run under this name ({self.checkpoint_dir}) has "
                    f"step {step} with other options: {'; '.join(differences)}. Its results would be "
                    "reported for the new options. Give another --name, or pass --overwrite to "
                    f"replace the files of step {step} and later")
            self.overwrite = (step, differences)
            return

    def remove_overwritten(self) -> None:
        """With ``--overwrite``: remove the earlier run's files of the first differing step and
        later. Called once this launch holds the run's lock, so a running launch never loses them."""
        if self.overwrite is not None and distributed.is_main_process():
            step, differences = self.overwrite
            for path in _files_of_steps(self.checkpoint_dir, self.log_dir, step):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.notes.append(f"--overwrite: removed the files of step {step} and later of "
                              f"the earlier run ({'; '.join(differences)})")
        distributed.barrier("rank 0 removing the files replaced by --overwrite")

    def _check_checkpoint(self, option: str, path: str, step: int) -> None:
        opts = self.opts
        try:
            ckpt = checkpoint.load_checkpoint(path, f"pass another {option}")
            ckpt, converted = adapt_checkpoint(ckpt, opts.dataset, opts.task, step, opts.norm_act, Path(path))
            checkpoint.check_step_checkpoint(
                ckpt, opts.dataset, opts.task, step, tasks.classes_per_step(opts.dataset, opts.task, step), path)
        except (OSError, ValueError) as error:
            raise SetupError(f"{option} {path}: {error}") from error
        if option == "--ckpt" and not opts.test and "optimizer_state" not in ckpt:
            raise UsageError(f"--ckpt {path}: not an in-step checkpoint (no optimizer state), so "
                             "training cannot resume from it; to test it add --test")
        if converted:
            self.notes.append(f"{option} {path}: a checkpoint of the original MiB/PLOP code, converted "
                              f"(classes per step {ckpt['classes']} match {opts.task} step {step})")

    def check_checkpoints(self) -> None:
        opts = self.opts
        first = opts.steps[0]
        if opts.ckpt is not None:
            self._check_checkpoint("--ckpt", opts.ckpt, first)
        if opts.test:
            for step in ([] if opts.ckpt else opts.steps):
                final = checkpoint.step_checkpoint_path(self.checkpoint_dir, step)
                if not final.is_file():
                    raise SetupError(f"--test: the checkpoint of step {step}, {final}, does not exist; "
                                     "train the step first (same --name) or pass --ckpt <file>")
            return
        if first == 0 or checkpoint.step_checkpoint_path(self.checkpoint_dir, first).is_file():
            return
        if opts.step_ckpt is not None:
            self._check_checkpoint("--step_ckpt", opts.step_ckpt, first - 1)
            return
        previous = checkpoint.step_checkpoint_path(self.checkpoint_dir, first - 1)
        if not previous.is_file():
            raise SetupError(
                f"--step {first}: it starts from the step {first - 1} model, {previous}, which does not "
                f"exist; train step {first - 1} first (--step {first - 1}, same --name), use --step all, "
                f"or pass --step_ckpt <checkpoint of step {first - 1}>")

    def check_pretrained(self) -> None:
        opts = self.opts
        if opts.pretrained in (None, "torchvision") or opts.test or 0 not in opts.steps:
            return
        from segmentation.models import load_imagenet_weights
        from segmentation.models.norm import norm_act_layer
        from segmentation.models.resnet import ResNet

        body = ResNet(opts.backbone, norm_act_layer(opts.norm_act), opts.output_stride)
        try:
            load_imagenet_weights(body, opts.pretrained)
        except (OSError, ValueError) as error:
            raise SetupError(f"--pretrained {opts.pretrained}: {_first_line(error)}; give the In-Place ABN "
                             "or torchvision ImageNet weights of this backbone, or --no_pretrained") from error
        except Exception as error:  # torch.load raises many types for foreign files
            raise SetupError(
                f"--pretrained {opts.pretrained}: cannot be read as a weights file (truncated or not a "
                f"checkpoint: {type(error).__name__}); give the In-Place ABN or torchvision ImageNet "
                "weights of this backbone, or --no_pretrained") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def run_checks(opts: argparse.Namespace, checkpoint_dir: Path, log_dir: Path) -> Preflight:
    """Run every check on this rank, then stop every rank with the first rank's error, if any.

    On failure the folders the checks created are removed again (rank 0).
    """
    preflight = Preflight(opts, checkpoint_dir, log_dir)
    error: Optional[Exception] = None
    try:
        preflight.check_options(distributed.world_size())
        if distributed.is_main_process():
            preflight.check_folders()
        preflight.check_same_name()
        preflight.check_checkpoints()
        preflight.check_pretrained()
    except (UsageError, SetupError) as failed:
        error = failed
    outcomes = distributed.all_gather_object(None if error is None else (type(error).__name__, str(error)))
    failures = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failures:
        if distributed.is_main_process():
            remove_created(preflight.created)
        rank, (kind, message) = failures[0]
        where = f" (on rank {rank})" if distributed.world_size() > 1 and rank > 0 else ""
        raise (UsageError if kind == "UsageError" else SetupError)(message + where)
    return preflight
