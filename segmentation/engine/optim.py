"""The optimizer and learning-rate schedule of a step: SGD with Nesterov momentum, one base
learning rate per step (``--lr`` at step 0, ``--incremental_lr`` after), poly or step decay per
iteration, as the original."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn

from segmentation.config import Config


def step_learning_rate(options: Mapping[str, Any], step: int) -> float:
    """Base learning rate of ``step`` from the options (``config.as_dict()``, or options stored by an
    earlier run): ``lr`` at step 0, ``incremental_lr`` (if given) after it."""
    if step > 0 and options.get("incremental_lr") is not None:
        return options["incremental_lr"]
    return options.get("lr")


def build_optimizer(model: nn.Module, config: Config, step: int = 0) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay on every trained parameter.

    Parameter groups: body (left out with ``--freeze``), head, classifiers; one LR for all.
    """
    groups: Dict[str, List[nn.Parameter]] = {"body": [], "head": [], "classifiers": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        top = name.split(".", 1)[0]
        if top == "body":
            if not config.freeze:
                groups["body"].append(parameter)
        elif top == "cls":
            groups["classifiers"].append(parameter)
        else:
            groups["head"].append(parameter)
    param_groups = [
        {"params": params, "name": name} for name, params in groups.items() if params
    ]
    return torch.optim.SGD(
        param_groups,
        lr=step_learning_rate(config.as_dict(), step),
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, total_iterations: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration LR schedule: poly ``(1 - k/K)^power`` or StepLR."""
    if config.lr_policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_step, gamma=config.lr_decay_factor)
    power = config.lr_power

    def poly(iteration: int) -> float:
        return max(0.0, 1.0 - iteration / total_iterations) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
