"""ILT (Michieli and Zanuttigh): CE + 100 x KD + 100 x L2 distillation of the backbone features
(``--loss_de``, the mean squared error between the new and the old model's body output)."""
from __future__ import annotations

import argparse
from typing import Dict, FrozenSet

from segmentation.config import Config
from segmentation.methods.method import Method, StepOutputs


class ILT(Method):
    name = "ILT"
    paper_row = "ILT"
    summary = "CE + 100 x KD + 100 x MSE of the backbone output"
    preset = {"loss_kd": 100.0, "loss_de": 100.0}
    incremental_options = frozenset({"loss_de"})
    non_negative_options = frozenset({"loss_de"})

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--loss_de", type=float, default=0.0,
                           help="weight of feature (L2) distillation on the backbone output")

    @classmethod
    def active(cls, config: Config) -> bool:
        return config.methods.loss_de > 0

    @property
    def needs_old_model(self) -> bool:
        return self.step.num_old_channels > 0

    @property
    def feature_names(self) -> FrozenSet[str]:
        return frozenset({"body"}) if self.step.num_old_channels > 0 else frozenset()

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, object]:
        if self.step.num_old_channels == 0:
            return {}
        import torch.nn.functional as F

        return {"loss_de": self.config.methods.loss_de * F.mse_loss(outputs.features["body"], outputs.old_features["body"])}
