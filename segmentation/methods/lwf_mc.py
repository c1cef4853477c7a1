"""LwF-MC (iCaRL's loss without exemplars): multi-label BCE at every step, + 10 x BCE distillation
towards the old model's sigmoids (``--icarl``, ``--icarl_importance``).

Variants of the original command line: ``--bce`` (the BCE classification alone),
``--icarl_disjoint`` (one BCE whose old-channel targets are the old model's sigmoid outputs,
instead of BCE + distillation) and ``--icarl_bkg`` (that variant keeps the background's
ground-truth target).
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, Optional

from segmentation.config import Config
from segmentation.methods.method import Method, StepOutputs

IGNORE_INDEX = 255


class LwFMC(Method):
    name = "LWF-MC"
    paper_row = "LwF-MC"
    summary = "BCE (also at step 0) + 10 x C_old x BCE distillation towards the old sigmoids"
    preset = {"icarl": True, "icarl_importance": 10.0}
    incremental_options = frozenset({"icarl_importance", "icarl_disjoint", "icarl_bkg"})
    non_negative_options = frozenset({"icarl_importance"})

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--icarl", action="store_true", help="BCE loss plus BCE distillation (LwF-MC)")
        group.add_argument("--icarl_importance", type=float, default=1.0,
                           help="weight of the LwF-MC distillation")
        group.add_argument("--bce", action="store_true",
                           help="multi-label BCE classification loss (as LwF-MC) without its distillation")
        group.add_argument("--icarl_disjoint", action="store_true",
                           help="with --icarl: instead of BCE + BCE distillation, one BCE whose targets "
                           "of the old channels are the old model's sigmoid outputs")
        group.add_argument("--icarl_bkg", action="store_true",
                           help="with --icarl_disjoint: keep the ground-truth target of the background "
                           "channel")

    @classmethod
    def check_options(cls, config: Config) -> Optional[str]:
        if config.methods.icarl_disjoint and not config.methods.icarl:
            return "--icarl_disjoint is a variant of the LwF-MC loss: add --icarl (or --method LWF-MC)"
        if config.methods.icarl_bkg and not config.methods.icarl_disjoint:
            return "--icarl_bkg only applies to --icarl_disjoint"
        return None

    @classmethod
    def active(cls, config: Config) -> bool:
        return config.methods.icarl or config.methods.bce

    def __init__(self, config: Config, step) -> None:
        super().__init__(config, step)
        from segmentation import losses

        options = config.methods
        incremental = step.num_old_channels > 0
        self.use_old_targets = options.icarl and options.icarl_disjoint and incremental
        self.use_distillation = incremental and options.icarl and not options.icarl_disjoint and options.icarl_importance > 0
        if self.use_old_targets:
            self._loss = losses.BCEWithOldTargetsLoss(keep_background=options.icarl_bkg, ignore_index=IGNORE_INDEX,
                                                      reduction="none")
        else:
            self._loss = losses.BCEWithIgnoreLoss(ignore_index=IGNORE_INDEX, reduction="none")
        if self.use_distillation:
            self.distillation = losses.BCEDistillationLoss()

    @property
    def needs_old_model(self) -> bool:
        return self.use_old_targets or self.use_distillation

    def classification(self) -> Optional[Callable[[StepOutputs], object]]:
        if self.use_old_targets:
            return lambda outputs: self._loss(outputs.logits, outputs.labels, outputs.old_logits)
        return lambda outputs: self._loss(outputs.logits, outputs.labels)

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, object]:
        if not self.use_distillation:
            return {}
        return {"loss_icarl": self.config.methods.icarl_importance * self.distillation(outputs.logits, outputs.old_logits)}
