"""A method written as a user would add one: this module and one registry line (``register``).

``python tests/toy_method.py <train.py options>`` registers it and runs ``train.py``'s entry, so
that a test can kill a real process that trains with it.

TOY pulls the logits towards zero with ``--toy_weight`` (its own option, preset 0.5) times
``1 + running``, where ``running`` is a moving average of its own term: state that the in-step
checkpoints must keep for an exact resume, and that the step checkpoint carries to the next step
(with the count of iterations trained so far).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Mapping

from segmentation.config import Config
from segmentation.methods.method import Method, StepOutputs, StepStart


class Toy(Method):
    name = "TOY"
    paper_row = "Toy"
    summary = "CE + toy_weight x (1 + running mean) x mean squared logit"
    preset = {"toy_weight": 0.5}
    non_negative_options = frozenset({"toy_weight"})

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--toy_weight", type=float, default=0.0, help="weight of the toy term")

    @classmethod
    def active(cls, config: Config) -> bool:
        return config.methods.toy_weight > 0

    def begin_step(self, start: StepStart) -> None:
        import torch

        self.iterations = 0
        self.running = torch.zeros((), dtype=torch.float64)
        if start.previous is not None:
            carried = start.previous["method_states"]["toy"]
            self.iterations = carried["iterations"]
            self.running = carried["running"].clone()

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, Any]:
        term = self.config.methods.toy_weight * (1 + self.running.to(outputs.logits)) * (outputs.logits ** 2).mean()
        self.running = 0.9 * self.running + 0.1 * term.detach().double().cpu()
        self.iterations += 1
        return {"loss_toy": term}

    def state_dict(self) -> Dict[str, Any]:
        return {"iterations": self.iterations, "running": self.running.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iterations = state["iterations"]
        self.running = state["running"].clone()

    def step_state(self) -> Dict[str, Any]:
        return self.state_dict()


def register() -> None:
    """The registry line."""
    from segmentation.methods import REGISTRY

    REGISTRY[Toy.name] = Toy


if __name__ == "__main__":
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    register()
    import train

    sys.exit(train.cli(sys.argv[1:]))
