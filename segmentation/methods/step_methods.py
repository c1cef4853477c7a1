"""The active methods of one step, behind the one object the engine talks to.

``StepMethods`` builds an instance of every method that is active for the options (registry
order) and combines their hooks (``segmentation.methods.method``): the classification loss is the
first active method's replacement, or cross-entropy; the loss is that classification averaged
over every pixel (ignored pixels counting as zeros, as the original) plus every method's terms;
every method observes the loss gradients before any adds its own; states are kept per method
under its ``state_name``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from segmentation import tasks
from segmentation.config import Config
from segmentation.methods import active_methods
from segmentation.methods.method import DataPass, Method, StepInfo, StepOutputs, StepStart

IGNORE_INDEX = 255


class StepMethods:
    """The active methods of step ``step.step`` for ``config`` (every option already resolved)."""

    def __init__(self, config: Config, step: StepInfo) -> None:
        self.step = step
        self.methods: List[Method] = [method(config, step) for method in active_methods(config)]
        replacements = [method.classification() for method in self.methods]
        replacement = next((loss for loss in replacements if loss is not None), None)
        if replacement is None:
            cross_entropy = nn.CrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)
            replacement = lambda outputs: cross_entropy(outputs.logits, outputs.labels)  # noqa: E731
        self._classification = replacement

    @property
    def needs_old_model(self) -> bool:
        """Whether the old model's outputs are used (so its forward must run)."""
        return any(method.needs_old_model for method in self.methods)

    @property
    def feature_names(self) -> FrozenSet[str]:
        return frozenset().union(*(method.feature_names for method in self.methods))

    @property
    def needs_features(self) -> bool:
        return bool(self.feature_names)

    @property
    def uses_gradients(self) -> bool:
        return any(method.uses_gradients for method in self.methods)

    def initialize_weights(self, model: nn.Module) -> None:
        for method in self.methods:
            method.initialize_weights(model)

    def begin_step(self, start: StepStart) -> None:
        for method in self.methods:
            method.begin_step(start)

    def data_passes(self) -> List[DataPass]:
        """The passes over the training set that the methods need before training."""
        return [data_pass for data_pass in (method.data_pass() for method in self.methods) if data_pass is not None]

    def loss(self, outputs: StepOutputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its terms (detached, for the log): ``loss_cls``, each method's, ``loss``."""
        classification = self._classification(outputs).mean()
        total = classification
        components = {"loss_cls": classification.detach()}
        for method in self.methods:
            for name, term in method.loss_terms(outputs).items():
                total = total + term
                components[name] = term.detach()
        components["loss"] = total.detach()
        return total, components

    def observe_gradients(self) -> None:
        for method in self.methods:
            method.observe_gradients()

    def add_gradients(self, components: Dict[str, torch.Tensor]) -> None:
        """Every method's own gradient terms; their values are added to ``components``."""
        for method in self.methods:
            for name, value in method.add_gradients().items():
                components[name] = components.get(name, 0.0) + value
                components["loss"] = components["loss"] + value

    def state_dict(self) -> Dict[str, Any]:
        """In-step state of every method that has one, by state name."""
        return self._by_state_name(lambda method: method.state_dict())

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output; a method whose state is missing is an error."""
        for method in self.methods:
            name = method.state_name()
            if name in states:
                method.load_state_dict(states[name])
            elif method.state_dict() is not None:
                raise ValueError(
                    f"the in-step checkpoint has no {name!r} state of the method {method.name} (it was "
                    "written by a run with other method options); pass --no_resume to start the step again")

    def step_state(self) -> Dict[str, Any]:
        """What the step checkpoint carries to the next step, by state name."""
        return self._by_state_name(lambda method: method.step_state())

    def _by_state_name(self, state_of: Callable[[Method], Optional[Dict[str, Any]]]) -> Dict[str, Any]:
        states = {}
        for method in self.methods:
            state = state_of(method)
            if state is not None:
                states[method.state_name()] = state
        return states


def step_methods(config: Config, step: int, num_old_channels: int, num_channels: int) -> StepMethods:
    """The active methods of ``step`` (``num_old_channels``: C_{t-1}, 0 at step 0; ``num_channels``:
    C_t)."""
    return StepMethods(config, StepInfo(step=step, num_old_channels=num_old_channels, num_channels=num_channels,
                                        domain_incremental=tasks.is_domain_incremental(config.dataset)))


__all__ = ["DataPass", "StepMethods", "StepOutputs", "StepStart", "step_methods"]
