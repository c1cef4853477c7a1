"""PI, path integral (Zenke et al.) as in the paper's tables: CE + 500 * score-weighted L2 to step t-1.

Every iteration ``delta += g * (theta_prev - theta_now)``; at the end of the step the score is
``max(0, delta / ((theta_end - theta_start)^2 + 1e-20)) + score_{t-1}`` (spec §5.5).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from segmentation.methods.method import Method
from segmentation.methods.regularizer import Regularizer, Tensors

EPSILON = 1e-20


class PI(Regularizer):
    name = "pi"
    state_tensors = ("delta", "previous_params", "start_params")

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, alpha: float = 0.9, iterations: int = 10) -> None:
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize)
        self.previous_score = self._previous(previous, "score")
        self.delta: Tensors = {name: torch.zeros_like(p).detach() for name, p in self.parameters.items()}
        self.previous_params: Tensors = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.start_params: Tensors = {name: p.detach().clone() for name, p in self.parameters.items()}

    def importance_to_penalize(self, previous: Mapping[str, Any]) -> Tensors:
        return self._normalized(previous["score"])

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.parameters.items():
            if parameter.grad is not None:
                previous = self.previous_params[name]
                self.delta[name].add_(parameter.grad * (previous - parameter))
                previous.copy_(parameter)

    @torch.no_grad()
    def step_state(self) -> Dict[str, Any]:
        score: Tensors = {}
        for name, parameter in self.parameters.items():
            moved = (parameter - self.start_params[name]) ** 2
            value = (self.delta[name] / (moved + EPSILON)).clamp(min=0)
            if name in self.previous_score:
                value = value + self.previous_score[name].to(value)
            score[name] = value
        return {"name": self.name, "score": score}


METHOD = Method(
    name="PI",
    paper_row="PI",
    summary="CE + 500 x path-integral-score-weighted L2 distance to the step t-1 weights",
    preset={"regularizer": "pi", "reg_importance": 500.0},
    regularizer=PI,
)
