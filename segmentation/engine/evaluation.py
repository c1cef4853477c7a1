"""Evaluation: confusion matrix over an exactly sharded data set, reduced across processes.

Unlike the original (whose ``DistributedSampler`` pads the set with repeated samples), every sample is
evaluated exactly once: each rank takes a contiguous shard and the confusion matrices are summed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from segmentation import distributed
from segmentation.engine.sampler import EvalShardSampler
from segmentation.metrics import ConfusionMatrix, group_scores, segmentation_scores
from segmentation.signals import detach_worker_from_stop_signals


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ("fp16", "bf16"); a no-op context for "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in ("fp16", "bf16"):
        raise ValueError(f"unknown amp mode {amp!r}; valid: off, fp16, bf16")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    """A loader over this rank's contiguous shard of ``dataset`` (no padding, no shuffling)."""
    sampler = EvalShardSampler(len(dataset), distributed.rank(), distributed.world_size())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=detach_worker_from_stop_signals,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: str = "off",
    *,
    num_old_channels: Optional[int] = None,
    channels_last: bool = False,
    on_batch: Optional[Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
) -> Dict[str, Any]:
    """Scores of ``model`` on ``loader`` over all processes.

    Returns ``segmentation_scores`` of the summed confusion matrix (rows ground truth) plus
    ``"confusion_matrix"`` and, when ``num_old_channels`` is given, the ``group_scores``
    (old = the first ``num_old_channels`` channels). ``on_batch(index, images, labels,
    predictions)`` is called for every local batch (used to log sample predictions).
    Images are cast to the model's floating-point type. The model is left in eval mode.
    """
    model.eval()
    matrix = ConfusionMatrix(num_classes, device)
    parameter = next(model.parameters(), None)
    dtype = None if parameter is None else parameter.dtype  # float64 under --dtype float64
    for index, (images, labels) in enumerate(loader):
        images = images.to(device, dtype=dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(images)
        predictions = logits.argmax(dim=1)
        matrix.update(predictions, labels)
        if on_batch is not None:
            on_batch(index, images, labels, predictions)
    matrix.all_reduce()
    scores = dict(segmentation_scores(matrix.matrix))
    scores["confusion_matrix"] = matrix.matrix.cpu()
    if num_old_channels is not None:
        scores.update(group_scores(scores["class_iou"], num_old_channels))
    return scores

