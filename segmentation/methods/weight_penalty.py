"""What EWC, PI and RW share: the options of a weight regularizer and the hooks that run it.

A regularizer (``segmentation.methods.regularizer``) estimates the importance of every weight while
a step trains, from the loss gradients; the step checkpoint carries it (under the regularizer's
name, "ewc", "pi" or "rw"), and the next step penalises changes of the important weights
(``--regularizer``). ``--estimate_importance`` runs the estimate without the penalty, so that one
run (e.g. an FT step 0) can start several of them.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping, Optional

from segmentation.config import Config
from segmentation.methods.method import Method, StepStart


def saved_states(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The method states a step checkpoint carries, by state name (``"regularizers"`` in
    checkpoints written before ``"method_states"``, which held only these)."""
    return checkpoint.get("method_states") or checkpoint.get("regularizers") or {}


def nesterov_stability_limit(momentum: float) -> float:
    """The largest ``lr * curvature`` for which SGD with Nesterov momentum ``momentum`` converges on
    a quadratic (PyTorch's update rule; 1.357 at momentum 0.9, 2 without momentum)."""
    return 1 + 1 / (1 + 2 * momentum)


class WeightPenalty(Method):
    """Base of EWC, PI and RW: ``regularizer`` names the class in ``segmentation.methods.regularizer``;
    ``importance_bound`` is the largest normalised importance (1, or 2 for a sum of two)."""

    regularizer: str = ""
    importance_bound: float = 1.0
    incremental_options = frozenset({"regularizer", "reg_importance"})
    neutral_options = frozenset({"estimate_importance"})
    non_negative_options = frozenset({"reg_importance"})

    @classmethod
    def names(cls) -> List[str]:
        return [method.regularizer for method in WeightPenalty.__subclasses__()]

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        names = cls.names()
        group.add_argument("--regularizer", default=None, choices=names,
                           help="weight regularizer (EWC, PI, RW); its state is carried from step to step "
                           "in the step checkpoints, so step 0 must be trained with it too")
        group.add_argument("--estimate_importance", nargs="+", default=[], choices=names, metavar="REGULARIZER",
                           help=f"also estimate these regularizers' importances ({', '.join(names)}) "
                           "during every step, without their penalty, and store them in the step checkpoint: "
                           "EWC, PI or RW can then continue from this run's checkpoints (e.g. one FT step 0 "
                           "serves FT, EWC, PI and RW; the penalty is zero at step 0 anyway)")
        group.add_argument("--reg_importance", type=float, default=1.0,
                           help="weight of the regularizer's penalty (presets: EWC 500, PI 500, RW 100)")
        group.add_argument("--reg_alpha", type=float, default=0.9,
                           help="EMA factor of the Fisher estimate (EWC, RW)")
        group.add_argument("--reg_no_normalize", action="store_true",
                           help="do not min-max normalise each importance tensor to [0, 1]")
        group.add_argument("--reg_iterations", type=int, default=10,
                           help="RW: iterations between score updates")

    @classmethod
    def check_options(cls, config: Config) -> Optional[str]:
        if not 0.0 <= config.methods.reg_alpha <= 1.0:
            return f"--reg_alpha must be in [0, 1], got {config.methods.reg_alpha}"
        if config.methods.reg_iterations <= 0:
            return f"--reg_iterations must be positive, got {config.methods.reg_iterations}"
        return None

    @classmethod
    def active(cls, config: Config) -> bool:
        return config.methods.regularizer == cls.regularizer or cls.regularizer in config.methods.estimate_importance

    @classmethod
    def state_name(cls) -> str:
        return cls.regularizer

    @classmethod
    def launch_warnings(cls, config: Config) -> List[str]:
        """The penalty is unstable at a step's learning rate.

        Normalised importances stay below ``importance_bound``, and in practice the largest
        reaches it (``launch/penalty_curvature.py``), so the penalty
        ``reg_importance * sum(importance * (w - w_old)^2)`` has curvature up to
        ``2 * reg_importance * bound`` along a weight. SGD overshoots once the learning rate times
        that curvature passes the Nesterov limit: the penalised weights oscillate with a growing
        amplitude while the learning rate stays above it.
        """
        from segmentation.engine.optim import step_learning_rate

        options = config.methods
        if options.regularizer != cls.regularizer or options.reg_no_normalize or config.test:
            return []
        curvature = 2 * options.reg_importance * cls.importance_bound
        limit = nesterov_stability_limit(config.momentum)
        for step in config.steps:
            lr = step_learning_rate(config.as_dict(), step)
            if step > 0 and lr * curvature > limit:
                return [f"the {cls.regularizer} penalty is unstable at step {step}: learning rate {lr} times its "
                        f"largest curvature {curvature:g} (2 x --reg_importance {options.reg_importance:g} x the "
                        f"largest importance) is {lr * curvature:.3g}, above {limit:.3g}, the limit of SGD with "
                        f"Nesterov momentum {config.momentum}, so the penalised weights can grow without bound; "
                        f"use a learning rate below {limit / curvature:.3g} for the steps after step 0 (the "
                        "protocol's 0.001 is) or a smaller --reg_importance"]
        return []

    # ------------------------------------------------------------ one step
    @property
    def uses_gradients(self) -> bool:
        return True

    @property
    def penalizes(self) -> bool:
        return self.config.methods.regularizer == self.regularizer

    def begin_step(self, start: StepStart) -> None:
        from segmentation.methods.regularizer import build_regularizer

        state = weights = None
        if start.previous is not None:
            saved = saved_states(start.previous)
            if self.regularizer not in saved:
                raise ValueError(self._missing_state_message(start, saved))
            state, weights = saved[self.regularizer], start.previous["model_state"]
        options = self.config.methods
        self.estimate = build_regularizer(
            self.regularizer, start.model, state, weights, weight=options.reg_importance,
            normalize=not options.reg_no_normalize, alpha=options.reg_alpha, iterations=options.reg_iterations,
            penalize=self.penalizes,
        )

    def _missing_state_message(self, start: StepStart, saved: Mapping[str, Any]) -> str:
        found = f"only {', '.join(repr(key) for key in sorted(saved))} state" if saved else "no regularizer state"
        option = "--regularizer" if self.penalizes else "--estimate_importance"
        previous_step = self.step.step - 1
        return (
            f"{start.previous_path}: {option} {self.regularizer} needs the importance estimated while training "
            f"step {previous_step}, but this checkpoint (method {start.previous.get('method')}) has {found}. "
            f"Train step {previous_step} with --method {self.name} (or --estimate_importance {self.regularizer}) "
            f"too (for example --step 0,{self.step.step} with the same --name), or pass --step_ckpt pointing "
            "at such a checkpoint"
        )

    def observe_gradients(self) -> None:
        self.estimate.update()

    def add_gradients(self) -> Dict[str, Any]:
        penalty = self.estimate.apply_penalty()
        return {} if penalty is None else {"loss_reg": penalty.detach()}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.estimate.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimate.load_state_dict(state)

    def step_state(self) -> Optional[Dict[str, Any]]:
        return self.estimate.step_state()
