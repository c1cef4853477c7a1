"""EWC (Kirkpatrick et al.) as in the paper's tables: CE + 500 * Fisher-weighted L2 to step t-1.

The Fisher is an exponential moving average of squared gradients (alpha = ``--reg_alpha``, 0.9),
updated every iteration and continued from step to step (spec §5.5).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from segmentation.methods.method import Method
from segmentation.methods.regularizer import FisherEMA, Regularizer, Tensors


class EWC(Regularizer):
    name = "ewc"
    state_tensors = ("fisher",)

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, alpha: float = 0.9, iterations: int = 10) -> None:
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize)
        self._fisher = FisherEMA(self.parameters, self._previous(previous, "fisher"), alpha)
        self.fisher = self._fisher.values

    def importance_to_penalize(self, previous: Mapping[str, Any]) -> Tensors:
        return self._normalized(previous["fisher"])

    def update(self) -> None:
        self._fisher.update(self.parameters)

    def step_state(self) -> Dict[str, Any]:
        return {"name": self.name, "fisher": {name: value.clone() for name, value in self.fisher.items()}}


METHOD = Method(
    name="EWC",
    paper_row="EWC",
    summary="CE + 500 x Fisher-weighted L2 distance to the step t-1 weights (Fisher: EMA of squared "
            "gradients, alpha 0.9)",
    preset={"regularizer": "ewc", "reg_importance": 500.0},
    regularizer=EWC,
)
