"""The training loss of each method at an incremental step (spec §5.4).

``MethodLoss`` combines a classification loss (CE, unbiased CE or multi-label BCE) with the
distillation terms a method enables: output KD (standard or unbiased), feature distillation
on the backbone output (ILT) and the BCE distillation of LwF-MC/iCaRL, or, with
``icarl_disjoint``, one BCE whose old-channel targets are the old model's outputs. Weights come
from the options after the method presets (``segmentation/methods/``) were applied, so
``--method`` and explicit flags behave alike. The weight regularizers of EWC, PI and RW act on
the gradients instead (``segmentation.methods.regularizer``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from segmentation import losses

IGNORE_INDEX = 255


@dataclass
class MethodLoss:
    """Loss of one step. ``num_old_channels`` is C_{t-1} (0 at step 0).

    Weights: ``loss_kd`` (output KD, unbiased if ``unkd``), ``loss_de`` (MSE on body features),
    ``icarl_importance`` (BCE distillation, only with ``icarl``). ``unce`` switches the
    classification loss to unbiased CE when old channels exist; ``bce`` (or ``icarl``) to
    multi-label BCE at every step. With ``icarl`` and ``icarl_disjoint``, steps t > 0 use
    ``BCEWithOldTargetsLoss`` (background target kept with ``icarl_bkg``) and no separate
    distillation.
    """

    num_old_channels: int
    unce: bool = False
    unkd: bool = False
    loss_kd: float = 0.0
    loss_de: float = 0.0
    icarl: bool = False
    icarl_importance: float = 1.0
    alpha: float = 1.0
    bce: bool = False
    icarl_disjoint: bool = False
    icarl_bkg: bool = False

    def __post_init__(self) -> None:
        step0 = self.num_old_channels == 0
        self.use_old_targets = self.icarl and self.icarl_disjoint and not step0
        if self.use_old_targets:
            self.classification = losses.BCEWithOldTargetsLoss(
                keep_background=self.icarl_bkg, ignore_index=IGNORE_INDEX, reduction="none"
            )
        elif self.icarl or self.bce:
            self.classification: nn.Module = losses.BCEWithIgnoreLoss(
                ignore_index=IGNORE_INDEX, reduction="none"
            )
        elif self.unce and not step0:
            self.classification = losses.UnbiasedCrossEntropy(
                old_cl=self.num_old_channels, reduction="none", ignore_index=IGNORE_INDEX
            )
        else:
            self.classification = nn.CrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)
        # Distillation needs an old model, so none of it exists at step 0.
        self.use_kd = not step0 and self.loss_kd > 0
        self.use_de = not step0 and self.loss_de > 0
        self.use_icarl_distillation = (
            not step0 and self.icarl and not self.icarl_disjoint and self.icarl_importance > 0
        )
        if self.use_kd:
            kd_class = (
                losses.UnbiasedKnowledgeDistillationLoss
                if self.unkd
                else losses.KnowledgeDistillationLoss
            )
            self.kd = kd_class(reduction="mean", alpha=self.alpha)
        if self.use_icarl_distillation:
            self.icarl_distillation = losses.BCEDistillationLoss()

    @property
    def needs_old_model(self) -> bool:
        """Whether the old model's outputs are used (so its forward must run)."""
        return self.use_kd or self.use_de or self.use_icarl_distillation or self.use_old_targets

    @property
    def needs_features(self) -> bool:
        """Whether body features of both models are needed (ILT feature distillation)."""
        return self.use_de

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        old_logits: Optional[torch.Tensor] = None,
        features: Optional[Dict[str, torch.Tensor]] = None,
        old_features: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its components (detached scalar tensors, for logging).

        ``logits`` are (B, C_t, H, W) and computed in float32 by the caller when AMP is on.
        """
        if self.use_old_targets:
            classification = self.classification(logits, labels, old_logits)
        else:
            classification = self.classification(logits, labels)
        # Reference convention: per-pixel losses averaged over all B*H*W pixels, ignored ones
        # counting as zeros.
        classification = classification.mean()
        total = classification
        components = {"loss_cls": classification.detach()}
        if self.use_kd:
            kd = self.loss_kd * self.kd(logits, old_logits)
            total = total + kd
            components["loss_kd"] = kd.detach()
        if self.use_de:
            de = self.loss_de * F.mse_loss(features["body"], old_features["body"])
            total = total + de
            components["loss_de"] = de.detach()
        if self.use_icarl_distillation:
            distill = self.icarl_importance * self.icarl_distillation(logits, old_logits)
            total = total + distill
            components["loss_icarl"] = distill.detach()
        components["loss"] = total.detach()
        return total, components


def build_method_loss(opts: argparse.Namespace, num_old_channels: int) -> MethodLoss:
    """The loss for the current step from parsed options (presets already applied)."""
    return MethodLoss(
        num_old_channels=num_old_channels,
        unce=bool(opts.unce),
        unkd=bool(opts.unkd),
        loss_kd=float(opts.loss_kd),
        loss_de=float(opts.loss_de),
        icarl=bool(opts.icarl),
        icarl_importance=float(opts.icarl_importance),
        alpha=float(opts.alpha),
        bce=bool(opts.bce),
        icarl_disjoint=bool(opts.icarl_disjoint),
        icarl_bkg=bool(opts.icarl_bkg),
    )
