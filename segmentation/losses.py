"""Classification and distillation losses of MiB and its baselines.

Shapes: ``logits`` (B, C, H, W) are the current model's outputs over all C seen channels,
``old_logits`` (B, C_old, H, W) the previous step's model outputs over its C_old channels
(channel 0 is background in both), ``labels`` (B, H, W) int64 channel indices or ``ignore_index``.

Reductions: ``"none"`` returns the per-pixel loss (B, H, W); ``"sum"`` sums it; ``"mean"``
averages it over **all** B*H*W pixels, so ignored (and masked-out) pixels count as zeros in the
denominator. This is the original training code's convention (per-pixel losses, then ``.mean()``)
and differs from ``F.cross_entropy(reduction="mean")``, which divides by the non-ignored count.

Every loss computes in float32 (or wider) whatever the input dtype, so it stays finite on
extreme logits and under bf16/fp16 autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _reduce(per_pixel: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pixel.mean()
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_distillation_shapes(logits: torch.Tensor, old_logits: torch.Tensor) -> None:
    if logits.dim() != 4 or old_logits.dim() != 4:
        raise ValueError(
            f"logits and old_logits must be (B, C, H, W); got {tuple(logits.shape)} and {tuple(old_logits.shape)}"
        )
    if logits.shape[1] < old_logits.shape[1] or logits.shape[0] != old_logits.shape[0] \
            or logits.shape[2:] != old_logits.shape[2:]:
        raise ValueError(
            f"old_logits {tuple(old_logits.shape)} must have the batch and spatial size of logits "
            f"{tuple(logits.shape)} and at most as many channels"
        )


def _apply_mask(per_pixel: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return per_pixel
    if mask.shape != per_pixel.shape:
        raise ValueError(f"mask must be (B, H, W) = {tuple(per_pixel.shape)}; got {tuple(mask.shape)}")
    return per_pixel * mask.to(per_pixel.dtype)


class UnbiasedCrossEntropy(nn.Module):
    """MiB's unbiased cross-entropy (old classes and background merged into the background target).

    With ``L = logsumexp_k z_k`` over all C channels, the background target has log-probability
    ``logsumexp_{k < old_cl} z_k - L`` (background or any old class) and a new class c >= old_cl has
    ``z_c - L``. Labels below ``old_cl`` count as background; ``labels`` is not modified.
    With ``old_cl == 1`` this is the plain cross-entropy.
    """

    def __init__(self, old_cl: int, reduction: str = "mean", ignore_index: int = 255) -> None:
        super().__init__()
        if old_cl < 1:
            raise ValueError(f"old_cl (number of old channels, background included) must be >= 1; got {old_cl}")
        _check_reduction(reduction)
        self.old_cl = old_cl
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < self.old_cl:
            raise ValueError(f"logits have {logits.shape[1]} channels, fewer than old_cl={self.old_cl}")
        logits = _at_least_float32(logits)
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
        old_or_background = torch.logsumexp(logits[:, : self.old_cl], dim=1, keepdim=True)
        # Channel 0 of log_probs is "background or old", channel 1 + j is new class old_cl + j.
        log_probs = torch.cat([old_or_background, logits[:, self.old_cl:]], dim=1) - log_norm

        labels = labels.long()
        ignored = labels == self.ignore_index
        compact_labels = torch.where(labels < self.old_cl, torch.zeros_like(labels), labels - self.old_cl + 1)
        compact_labels = torch.where(ignored, torch.full_like(labels, self.ignore_index), compact_labels)
        per_pixel = F.nll_loss(log_probs, compact_labels, ignore_index=self.ignore_index, reduction="none")
        return _reduce(per_pixel, self.reduction)


class KnowledgeDistillationLoss(nn.Module):
    """Standard output distillation (LwF, ILT) restricted to the old channels.

    Per pixel: ``-(1/C_old) * sum_c q_c log p_c`` with ``q = softmax(alpha * z_old)`` and
    ``p = softmax(z[:, :C_old])``. Pixels where ``mask`` is False contribute 0 (they still count in
    the ``"mean"`` denominator).
    """

    def __init__(self, reduction: str = "mean", alpha: float = 1.0) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.alpha = alpha

    def forward(
        self, logits: torch.Tensor, old_logits: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        _check_distillation_shapes(logits, old_logits)
        num_old = old_logits.shape[1]
        log_probs = self.old_channel_log_probs(_at_least_float32(logits), num_old)
        targets = torch.softmax(self.alpha * _at_least_float32(old_logits), dim=1)
        per_pixel = -(targets * log_probs).sum(dim=1) / num_old
        return _reduce(_apply_mask(per_pixel, mask), self.reduction)

    def old_channel_log_probs(self, logits: torch.Tensor, num_old: int) -> torch.Tensor:
        """The student's log-probabilities of the ``num_old`` old channels, (B, C_old, H, W)."""
        return torch.log_softmax(logits[:, :num_old], dim=1)


class UnbiasedKnowledgeDistillationLoss(KnowledgeDistillationLoss):
    """MiB's unbiased distillation: the old background target is matched by background + new classes.

    With ``L = logsumexp`` over all C channels: ``log p_0 = logsumexp_{k in {0} u new} z_k - L`` and
    ``log p_c = z_c - L`` for old foreground channels 1..C_old-1. Per pixel:
    ``-(1/C_old) * sum_{c < C_old} q_c log p_c`` with ``q = softmax(alpha * z_old)``. Masked-out
    pixels contribute 0 as in :class:`KnowledgeDistillationLoss`. Without new channels it equals
    :class:`KnowledgeDistillationLoss`.
    """

    def old_channel_log_probs(self, logits: torch.Tensor, num_old: int) -> torch.Tensor:
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
        background_or_new = torch.logsumexp(
            torch.cat([logits[:, :1], logits[:, num_old:]], dim=1), dim=1, keepdim=True
        )
        # Aligned with the old channels: 0 is background (or any new class), 1.. are old foreground.
        return torch.cat([background_or_new, logits[:, 1:num_old]], dim=1) - log_norm


class BCEWithIgnoreLoss(nn.Module):
    """Multi-label binary cross-entropy towards one-hot labels (LwF-MC / iCaRL classification loss).

    Per pixel: the sum over all C channels of ``BCEWithLogits(z_c, [label == c])``; pixels labelled
    ``ignore_index`` contribute 0.
    """

    def __init__(self, ignore_index: int = 255, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        labels = labels.long()
        ignored = labels == self.ignore_index
        safe_labels = labels.masked_fill(ignored, 0)
        one_hot = torch.zeros_like(logits).scatter_(1, safe_labels.unsqueeze(1), 1.0)
        per_pixel = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(dim=1)
        per_pixel = per_pixel.masked_fill(ignored, 0.0)
        return _reduce(per_pixel, self.reduction)


class BCEDistillationLoss(nn.Module):
    """LwF-MC / iCaRL distillation: ``C_old * mean BCEWithLogits(z[:, :C_old], sigmoid(z_old))``.

    The mean runs over all B*C_old*H*W elements, so this equals the sum over old channels of each
    channel's pixel-mean BCE towards the old model's sigmoid outputs. The caller multiplies it by
    the iCaRL importance.
    """

    def forward(self, logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        _check_distillation_shapes(logits, old_logits)
        num_old = old_logits.shape[1]
        logits = _at_least_float32(logits[:, :num_old])
        targets = torch.sigmoid(_at_least_float32(old_logits))
        return num_old * F.binary_cross_entropy_with_logits(logits, targets, reduction="mean")


class BCEWithOldTargetsLoss(nn.Module):
    """LwF-MC's ``--icarl_disjoint`` variant (the reference ``IcarlLoss``): one multi-label BCE.

    Targets are one-hot labels, except on the old channels, whose targets are the old model's
    sigmoid outputs; with ``keep_background`` the background channel keeps its one-hot target
    (``--icarl_bkg``). Per pixel: the sum over all C channels; pixels labelled ``ignore_index``
    contribute 0 (the reference gave them all-zero one-hot targets; training labels of the
    protocol contain no ignored pixel, so this only matters for custom data).
    """

    def __init__(self, keep_background: bool = False, ignore_index: int = 255, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.keep_background = keep_background
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        _check_distillation_shapes(logits, old_logits)
        logits = _at_least_float32(logits)
        labels = labels.long()
        ignored = labels == self.ignore_index
        targets = torch.zeros_like(logits).scatter_(1, labels.masked_fill(ignored, 0).unsqueeze(1), 1.0)
        first = 1 if self.keep_background else 0
        num_old = old_logits.shape[1]
        targets[:, first:num_old] = torch.sigmoid(_at_least_float32(old_logits[:, first:])).to(targets.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
        per_pixel = per_pixel.masked_fill(ignored, 0.0)
        return _reduce(per_pixel, self.reduction)
