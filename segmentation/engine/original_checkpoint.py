"""Checkpoints written by the original MiB or PLOP code, made usable as ``--step_ckpt``/``--ckpt``.

The original saves ``{"model_state": ..., "optimizer_state": ..., ...}`` from its DDP wrapper, so
every key starts with ``module.``; it stores neither the task nor the classes. What it does
store is the classifier layout: one ``cls.<s>`` head per step whose width is the number of
classes of step ``s``. The layout must equal the task's, then the model weights are taken over
(key names match ours; In-Place ABN 1.0 has no ``num_batches_tracked`` buffers).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from segmentation import tasks
from segmentation.engine.checkpoint import CheckpointError

_HEAD_WEIGHT = re.compile(r"cls\.(\d+)\.weight")
# In-Place ABN's effective scale is |gamma| + eps; plain BN ("abn") needs gamma itself.
_ABN_EPS = 1e-5


def is_original_checkpoint(ckpt: Dict[str, Any]) -> bool:
    """Whether ``ckpt`` is a model checkpoint of the original code (not of this code)."""
    return isinstance(ckpt.get("model_state"), dict) and "classes" not in ckpt


def head_widths(state: Dict[str, torch.Tensor]) -> List[int]:
    """Channels of each classifier head ``cls.<s>``, in step order."""
    heads = {}
    for key, value in state.items():
        match = _HEAD_WEIGHT.fullmatch(key)
        if match:
            heads[int(match.group(1))] = int(value.shape[0])
    return [heads[s] for s in sorted(heads)]


def convert_original_checkpoint(ckpt: Dict[str, Any], dataset: str, task: str, step: int,
                                norm_act: str, path: Path) -> Dict[str, Any]:
    """A step checkpoint of this code from an original MiB/PLOP one; ``CheckpointError`` naming ``path``
    when its classifier heads are not the classes of ``task`` up to ``step``."""
    state = {key[len("module."):] if key.startswith("module.") else key: value
             for key, value in ckpt["model_state"].items()}
    widths = head_widths(state)
    expected = tasks.classes_per_step(dataset, task, step)
    if widths != expected:
        raise CheckpointError(
            f"{path} is a checkpoint of the original MiB/PLOP code whose classifier heads have "
            f"{widths} classes per step, but {dataset} {task} step {step} has {expected}; "
            "give the checkpoint of that step of that task")
    for key in [key for key in state if key.endswith(".running_mean")]:
        prefix = key[: -len("running_mean")]
        state.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if norm_act == "abn" and prefix + "weight" in state:
            state[prefix + "weight"] = state[prefix + "weight"].abs() + _ABN_EPS
    return {
        "dataset": dataset,
        "task": task,
        "step": step,
        "classes": expected,
        "channel_order": tasks.channel_order(dataset, task, step),
        "model_state": state,
        "converted_from_original": True,
    }


def adapt_checkpoint(ckpt: Dict[str, Any], dataset: str, task: str, step: int, norm_act: str,
                     path: Path) -> Tuple[Dict[str, Any], bool]:
    """``ckpt`` as a checkpoint of this code, and whether it was converted from the original's."""
    if "classes" not in ckpt and "model_state" not in ckpt:
        raise CheckpointError(
            f"{path} is neither a step checkpoint of this code nor a model checkpoint of the original "
            f"MiB/PLOP code (no 'model_state'; keys: {', '.join(map(str, list(ckpt)[:5]))})")
    if not is_original_checkpoint(ckpt):
        return ckpt, False
    return convert_original_checkpoint(ckpt, dataset, task, step, norm_act, path), True
