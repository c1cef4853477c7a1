"""Segmentation metrics: a confusion matrix accumulated over batches (and ranks), then scores.

Classes without any ground-truth pixel have no accuracy or IoU (``None``) and are left out of
every mean, even when they are predicted, as in the original evaluation.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """An int64 (num_classes x num_classes) confusion matrix: rows ground truth, columns prediction.

    Pixels whose target is ``ignore_index`` or outside [0, num_classes) are not counted.
    ``device`` is where the matrix lives; with the NCCL backend it must be the rank's GPU.
    """

    def __init__(
        self, num_classes: int, device: Optional[Union[torch.device, str]] = None, ignore_index: int = 255
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` are integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        n = self.num_classes
        pred, target = pred.long(), target.long()
        counted = (target != self.ignore_index) & (target >= 0) & (target < n)
        pred, target = pred[counted], target[counted]
        if ((pred < 0) | (pred >= n)).any():
            raise ValueError(f"predictions must lie in [0, {n}) (num_classes={n})")
        counts = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        self.matrix += counts.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (in place); a no-op without an initialised process group."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        self.matrix.zero_()


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def segmentation_scores(matrix: torch.Tensor) -> Dict[str, object]:
    """Scores of a confusion matrix (rows ground truth, columns prediction).

    Returns "overall_acc", "mean_acc", "class_acc", "class_iou", "miou", "freq_weighted_iou":
    per-class lists hold ``None`` for classes without ground truth; means run over the classes
    with ground truth; everything is a fraction in [0, 1] (``None`` when nothing was counted).
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square; got shape {tuple(matrix.shape)}")
    m = matrix.detach().to("cpu", torch.float64)
    diag = m.diagonal()
    gt_pixels = m.sum(dim=1)
    pred_pixels = m.sum(dim=0)
    total = float(m.sum())
    has_gt = [bool(g > 0) for g in gt_pixels]

    class_acc = [float(diag[c] / gt_pixels[c]) if has_gt[c] else None for c in range(len(has_gt))]
    # The union includes the class's own GT pixels, so it is > 0 whenever the class has GT.
    union = gt_pixels + pred_pixels - diag
    class_iou = [float(diag[c] / union[c]) if has_gt[c] else None for c in range(len(has_gt))]
    freq_weighted = (
        sum(float(gt_pixels[c]) / total * iou for c, iou in enumerate(class_iou) if iou is not None)
        if total > 0 else None
    )
    return {
        "overall_acc": float(diag.sum()) / total if total > 0 else None,
        "mean_acc": _mean(class_acc),
        "class_acc": class_acc,
        "class_iou": class_iou,
        "miou": _mean(class_iou),
        "freq_weighted_iou": freq_weighted,
    }


def _harmonic_mean(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def group_scores(class_iou: Sequence[Optional[float]], num_old_channels: int) -> Dict[str, Optional[float]]:
    """Mean IoU of the old and new class groups, with and without background (channel 0).

    Channels [0, num_old_channels) are the step-0 classes ("old", background included),
    the rest were added later ("new"). "miou_all/old/new" count background with the old
    classes (PLOP/SSUL convention); the "_fg" variants leave channel 0 out (MiB paper tables).
    "hmean"/"hmean_fg" are the harmonic means of old and new. Classes whose IoU is ``None`` are
    skipped; a group without any valid class gives ``None``.
    """
    if not 1 <= num_old_channels <= len(class_iou):
        raise ValueError(
            f"num_old_channels must be in [1, {len(class_iou)}] (the number of step-0 channels, "
            f"background included); got {num_old_channels}"
        )
    old, new = list(class_iou[:num_old_channels]), list(class_iou[num_old_channels:])
    scores = {
        "miou_all": _mean(old + new),
        "miou_old": _mean(old),
        "miou_new": _mean(new),
        "miou_all_fg": _mean(old[1:] + new),
        "miou_old_fg": _mean(old[1:]),
        "miou_new_fg": _mean(new),
    }
    scores["hmean"] = _harmonic_mean(scores["miou_old"], scores["miou_new"])
    scores["hmean_fg"] = _harmonic_mean(scores["miou_old_fg"], scores["miou_new_fg"])
    return scores
