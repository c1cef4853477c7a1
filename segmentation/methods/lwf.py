"""LwF (Li and Hoiem): CE + 100 x knowledge distillation of the old model's outputs on the old
channels (``--loss_kd``, with the old logits scaled by ``--alpha``)."""
from __future__ import annotations

import argparse
from typing import Dict

from segmentation.config import Config
from segmentation.methods.method import Method, StepOutputs


class LwF(Method):
    name = "LWF"
    paper_row = "LwF"
    summary = "CE + 100 x KD on the old channels"
    preset = {"loss_kd": 100.0}
    incremental_options = frozenset({"loss_kd", "alpha"})
    non_negative_options = frozenset({"loss_kd"})

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--loss_kd", type=float, default=0.0, help="weight of output distillation")
        group.add_argument("--alpha", type=float, default=1.0,
                           help="scale of the old logits before the distillation softmax")

    @classmethod
    def active(cls, config: Config) -> bool:
        # MiB's --unkd turns this distillation into its unbiased form (segmentation.methods.mib).
        return config.methods.loss_kd > 0 and not config.methods.unkd

    def __init__(self, config: Config, step) -> None:
        super().__init__(config, step)
        from segmentation import losses

        self.distillation = losses.KnowledgeDistillationLoss(reduction="mean", alpha=config.methods.alpha)

    @property
    def needs_old_model(self) -> bool:
        return self.step.num_old_channels > 0

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, object]:
        if self.step.num_old_channels == 0:
            return {}
        return {"loss_kd": self.config.methods.loss_kd * self.distillation(outputs.logits, outputs.old_logits)}
