"""Checkpoint files: atomic writes, run folders, step-final and in-step checkpoints.

Layout: ``<checkpoint_dir>/<dataset>-<task>[-ov]/<name>/`` holds ``step<t>.pth`` (the model at
the end of step t, input of step t+1) and ``step<t>-iter<k>.pth`` (in-step checkpoints for
resuming an interrupted step; the last two are kept and removed when the step completes) and,
for a method that needs one, ``step<t>-pass.pth`` (its pass over the training set before training,
complete or stopped part way).

These functions write unconditionally: in a run, ``segmentation.engine.run_files.RunFiles`` calls
them on rank 0 only, as it enables the ``Logger`` on rank 0 only.

Every checkpoint is read through ``load_checkpoint``: a file that does not load, is not a dict
or whose tensors do not match the checksum stored at save time raises ``CheckpointError``
naming the file and what to do, never an unpickling traceback.

Checkpoints are read with ``torch.load(weights_only=False)`` because they hold options and RNG
states; load only files you trust.
"""
from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from segmentation.errors import RunError
from segmentation.files import atomic_write
from segmentation.tasks import channel_order

PathLike = Union[str, "os.PathLike[str]"]

_log = logging.getLogger(__name__)


CHECKSUM_KEY = "checksum"


class CheckpointError(RunError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a checkpoint of this code."""

    raised_on_every_rank = True  # every rank reads the checkpoints it loads; rank 0 alone reads back what it wrote


def tensor_checksum(obj: Any) -> int:
    """CRC-32 of the bytes of every tensor in ``obj`` (nested dicts, lists, tuples), in order."""
    crc = 0
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            data = item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(str(item.dtype).encode(), crc)
            crc = zlib.crc32(memoryview(data), crc)
        elif isinstance(item, dict):
            pending.extend(reversed([item[key] for key in item if key != CHECKSUM_KEY]))
        elif isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
    return crc


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` so that ``path`` is either the old file or the complete new one.

    A dict gets the checksum of its tensors, which ``load_checkpoint`` verifies.
    """
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: tensor_checksum(obj)}
    atomic_write(path, lambda handle: torch.save(obj, handle))


def run_dir(checkpoint_dir: PathLike, dataset: str, task: str, overlap: bool, name: str) -> Path:
    """``<checkpoint_dir>/<dataset>-<task>[-ov]/<name>``: one folder per run and setting."""
    setting = f"{dataset}-{task}" + ("-ov" if overlap else "")
    return Path(checkpoint_dir) / setting / name


def step_checkpoint_path(run_dir: PathLike, step: int) -> Path:
    """The model at the end of ``step``: ``run_dir/step<t>.pth``."""
    return Path(run_dir) / f"step{step}.pth"


def load_checkpoint(path: PathLike, remedy: str = "") -> Dict[str, Any]:
    """Load and verify a checkpoint dict on the CPU.

    Raises ``FileNotFoundError`` when the file is missing and ``CheckpointError`` naming ``path``
    when it does not load, is not a dict or fails its checksum; ``remedy`` (what the user should do) is appended to the message.
    """
    path = Path(path)
    suffix = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}{suffix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt or not a checkpoint: "
            f"{type(error).__name__}: {error}){suffix}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict{suffix}"
        )
    if CHECKSUM_KEY in checkpoint and tensor_checksum(checkpoint) != checkpoint.pop(CHECKSUM_KEY):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match its checksum{suffix}")
    return checkpoint


def check_step_checkpoint(ckpt: Dict[str, Any], dataset: str, task: str, step: int,
                          classes: Sequence[int], path: PathLike) -> None:
    """Raise CheckpointError naming ``path`` unless ``ckpt`` is a step-``step`` model of this task's classes.

    What must match is what the weights mean: dataset, step, channels per step and the label of
    every channel. The task name may differ, so the 15-5 step-0 model can start a 15-1 run, as
    the original authors did.
    """
    expected = {
        "dataset": dataset,
        "step": step,
        "classes": list(classes),
        "channel_order": channel_order(dataset, task, step),
    }
    for key, value in expected.items():
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry: not a step checkpoint of this code")
        found = list(ckpt[key]) if isinstance(value, list) else ckpt[key]
        if found != value:
            raise CheckpointError(
                f"checkpoint {path} (task {ckpt.get('task')!r}) is for {key} {found!r}, "
                f"expected {key} {value!r} of task {task!r} step {step}"
            )


class InStepCheckpoints:
    """The in-step checkpoints ``step<t>-iter<k>.pth`` of one step in ``run_dir``."""

    def __init__(self, run_dir: PathLike, step: int, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.step = step
        self.keep = keep
        self._pattern = re.compile(rf"step{step}-iter(\d+)\.pth")

    def path(self, iteration: int) -> Path:
        return self.run_dir / f"step{self.step}-iter{iteration}.pth"

    def paths(self) -> List[Path]:
        """Existing in-step checkpoint files, oldest iteration first."""
        if not self.run_dir.is_dir():
            return []
        found = []
        for entry in self.run_dir.iterdir():
            match = self._pattern.fullmatch(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        return [entry for _, entry in sorted(found)]

    def save(self, state: Dict[str, Any], iteration: int) -> Path:
        """Write the checkpoint of ``iteration`` and delete all but the newest ``keep``."""
        target = self.path(iteration)
        atomic_save(state, target)
        for old in self.paths()[:-self.keep]:
            old.unlink()
        return target

    def latest(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads, or None; unreadable ones are skipped with a warning."""
        for candidate in reversed(self.paths()):
            try:
                return load_checkpoint(candidate)
            except (OSError, CheckpointError) as error:
                _log.warning("skipping in-step checkpoint %s: %s", candidate, error)
        return None

    @property
    def data_pass_path(self) -> Path:
        """The accumulators of the pass over the training set before training (``step<t>-pass.pth``)."""
        return self.run_dir / f"step{self.step}-pass.pth"

    def save_data_pass(self, state: Dict[str, Any]) -> None:
        atomic_save(state, self.data_pass_path)

    def load_data_pass(self) -> Optional[Dict[str, Any]]:
        """The saved pass, or None (none, or unreadable: the pass is then run again, with a warning)."""
        if not self.data_pass_path.is_file():
            return None
        try:
            return load_checkpoint(self.data_pass_path)
        except (OSError, CheckpointError) as error:
            _log.warning("ignoring %s (the pass over the training set runs again): %s", self.data_pass_path, error)
            return None

    def clear(self) -> None:
        """Delete this step's in-step checkpoints and saved pass (once the step-final checkpoint is written)."""
        for entry in self.paths():
            entry.unlink()
        self.data_pass_path.unlink(missing_ok=True)
