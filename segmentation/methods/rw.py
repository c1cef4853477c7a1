"""RW, Riemannian Walk (Chaudhry et al.) as in the paper's tables: CE + 100 * (Fisher + score)-weighted L2.

Fisher EMA as in EWC every iteration; every ``--reg_iterations`` (10) iterations
``s += g * (theta_k - theta) / (0.5 * F * (theta - theta_k)^2 + 1e-8)`` with ``theta_k`` the
weights at the previous score update; the saved score is ``0.5 * (max(s, 0) + score_{t-1})``
(spec §5.5).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from segmentation.methods.method import Method
from segmentation.methods.regularizer import FisherEMA, Regularizer, Tensors

EPSILON = 1e-8


class RW(Regularizer):
    name = "rw"
    state_tensors = ("fisher", "score", "previous_params")

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, alpha: float = 0.9, iterations: int = 10) -> None:
        if iterations <= 0:
            raise ValueError(f"RW: the score update period must be positive, got {iterations}")
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize)
        self.iterations = iterations
        self.count = 0
        self._fisher = FisherEMA(self.parameters, self._previous(previous, "fisher"), alpha)
        self.fisher = self._fisher.values
        self.previous_score = self._previous(previous, "score")
        self.score: Tensors = {name: torch.zeros_like(p).detach() for name, p in self.parameters.items()}
        self.previous_params: Tensors = {name: p.detach().clone() for name, p in self.parameters.items()}

    def importance_to_penalize(self, previous: Mapping[str, Any]) -> Tensors:
        fisher = self._normalized(previous["fisher"])
        score = self._normalized(previous["score"])
        return {name: fisher[name] + score[name] for name in fisher if name in score}

    @torch.no_grad()
    def update(self) -> None:
        self._fisher.update(self.parameters)
        self.count += 1
        if self.count % self.iterations != 0:
            return
        for name, parameter in self.parameters.items():
            if parameter.grad is not None:
                previous = self.previous_params[name]
                moved = parameter - previous
                self.score[name].add_(
                    parameter.grad * (-moved) / (0.5 * self.fisher[name] * moved * moved + EPSILON))
                previous.copy_(parameter)

    @torch.no_grad()
    def step_state(self) -> Dict[str, Any]:
        score: Tensors = {}
        for name, value in self.score.items():
            value = value.clamp(min=0)
            if name in self.previous_score:
                value = value + self.previous_score[name].to(value)
            score[name] = 0.5 * value
        return {"name": self.name, "fisher": {name: value.clone() for name, value in self.fisher.items()},
                "score": score}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["count"] = self.count
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.count = int(state["count"])


METHOD = Method(
    name="RW",
    paper_row="RW",
    summary="CE + 100 x (Fisher + Riemannian-walk score)-weighted L2 distance to the step t-1 weights",
    preset={"regularizer": "rw", "reg_importance": 100.0},
    regularizer=RW,
)
