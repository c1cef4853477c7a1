"""Weight regularizers of EWC, PI and RW, computed as the original MiB code does: importance estimates and the quadratic penalty.

A regularizer watches the trained parameters of the current model during a step:

- after the loss backward of every iteration, :meth:`Regularizer.update` refines this step's
  importance estimate from the current gradients;
- :meth:`Regularizer.apply_penalty` then adds the gradient of
  ``reg_importance * sum_n I_n * (theta_n - theta*_n)^2`` to the parameters' gradients, where
  ``theta*`` are the step t-1 weights and ``I`` the step t-1 importance (min-max normalised per
  tensor unless ``normalize=False``). Only parameters of the old model are penalised, so the new
  classifier is free.

At the end of a step :meth:`Regularizer.step_state` gives the importance that the next step
penalises with; it is stored in the step checkpoint under ``"method_states"`` (a dictionary by
state name: the regularizer's name). The in-step checkpoints carry :meth:`Regularizer.state_dict` so that a
resumed step is bit-identical.

A regularizer built with ``penalize=False`` only estimates: it continues the previous importance
but adds no penalty. ``--estimate_importance`` uses this so that one run (e.g. an FT
step 0) stores the importances of several methods.

Distributed runs: the gradients seen by :meth:`update` are DDP's all-reduced averages and the
parameters are the same on every rank, so every rank computes the same importance and the same
penalty gradient locally, with no communication. The original code updated the importance on
rank 0 only; doing it everywhere keeps every rank's state equal to the state a 1-process run with
the same global batch computes, and lets any rank's in-step checkpoint stand for all of them.
The penalty gradient is computed in closed form, ``2 * reg_importance * I * (theta - theta*)``,
instead of a second backward through the DDP model.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

Tensors = Dict[str, torch.Tensor]


NORMALIZE_EPSILON = 1e-8


def normalize_importance(importance: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of one tensor: ``(x - min) / (max - min + 1e-8)``.

    The epsilon is the original's and it matters: Fisher values are squared gradients, and a
    tensor whose importances spread over much less than 1e-8 stays far below 1 (a constant
    tensor gives zeros).
    """
    low, high = importance.min(), importance.max()
    return (importance - low) / (high - low + NORMALIZE_EPSILON)


def penalty_importance(state: Mapping[str, Any], normalize: bool = True) -> Tensors:
    """The importance a regularizer's penalty weighs the next step with, from its step state.

    The sum of the state's importance tensors (EWC: the Fisher; PI: the score; RW: the Fisher plus
    the score), each min-max normalised per tensor unless ``normalize=False``.
    """
    parts = [state[key] for key in REGULARIZERS[state["name"]].importance_keys]
    names = [name for name in parts[0] if all(name in part for part in parts)]
    return {name: sum(normalize_importance(part[name]) if normalize else part[name] for part in parts)
            for name in names}


class Regularizer:
    """Base class: penalty towards the step t-1 weights and state handling.

    ``model`` is the (unwrapped) current model; its parameters that require gradients are
    watched. ``previous`` is this regularizer's state in the step t-1 checkpoint and
    ``previous_weights`` its ``model_state``; both are None at step 0 (no penalty then).
    ``penalize=False`` (``--estimate_importance``) continues the importance without a penalty.
    """

    name = ""
    #: Names of the tensor dictionaries of the in-step state.
    state_tensors: tuple = ()
    #: The step state's tensor dictionaries whose sum the penalty weighs with.
    importance_keys: tuple = ()

    def __init__(
        self,
        model: nn.Module,
        previous: Optional[Mapping[str, Any]],
        previous_weights: Optional[Mapping[str, torch.Tensor]],
        *,
        weight: float,
        normalize: bool = True,
        penalize: bool = True,
    ) -> None:
        self.weight = weight
        self.normalize = normalize
        self.parameters: Dict[str, nn.Parameter] = {
            name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        # The importance of the frozen parameters (--freeze, --fix_bn): they are neither watched nor
        # penalised, and their importance goes to the next step as it came.
        self.frozen_importance: Dict[str, Tensors] = {
            key: {name: value for name, value in previous[key].items() if name not in self.parameters}
            for key in self.importance_keys if previous is not None and key in previous
        }
        self.reference: Tensors = {}
        self.penalty_importance: Tensors = {}
        if penalize and previous is not None and previous_weights is not None:
            importance = penalty_importance(previous, normalize)
            for name, parameter in self.parameters.items():
                if name not in previous_weights or name not in importance:
                    continue  # a new classifier: not penalised
                reference = previous_weights[name]
                if reference.shape != parameter.shape:
                    raise ValueError(f"regularizer: {name} has shape {tuple(reference.shape)} in the "
                                     f"previous step, {tuple(parameter.shape)} now")
                self.reference[name] = reference.detach().to(parameter)
                self.penalty_importance[name] = importance[name].to(parameter)

    # ------------------------------------------------------------- per method
    def update(self) -> None:
        """Refine this step's importance from the parameters' current gradients."""
        raise NotImplementedError

    def trained_importance(self) -> Dict[str, Tensors]:
        """This step's importance of the watched parameters, by importance key (call once, after training)."""
        raise NotImplementedError

    def step_state(self) -> Dict[str, Any]:
        """What the next step needs, for the step checkpoint (call once, after training)."""
        state: Dict[str, Any] = {"name": self.name}
        for key, values in self.trained_importance().items():
            state[key] = {**self.frozen_importance.get(key, {}), **values}
        return state

    # ------------------------------------------------------------- shared
    def _previous(self, previous: Optional[Mapping[str, Any]], key: str) -> Tensors:
        return {} if previous is None else dict(previous[key])

    @property
    def penalizes(self) -> bool:
        return bool(self.reference)

    @torch.no_grad()
    def apply_penalty(self) -> Optional[torch.Tensor]:
        """Add the penalty's gradient to ``.grad``; returns the penalty value (None at step 0)."""
        if not self.penalizes:
            return None
        names = list(self.reference)
        parameters = [self.parameters[name] for name in names]
        # Multi-tensor ops: this runs every iteration over every weight of the model.
        differences = torch._foreach_sub(parameters, [self.reference[name] for name in names])
        weighted = torch._foreach_mul(differences, [self.penalty_importance[name] for name in names])
        total = sum(torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, differences))
        for parameter in parameters:
            if parameter.grad is None:  # a weight the loss did not reach
                parameter.grad = torch.zeros_like(parameter)
        torch._foreach_add_([parameter.grad for parameter in parameters], weighted, alpha=2.0 * self.weight)
        return self.weight * total

    def state_dict(self) -> Dict[str, Any]:
        """In-step state (tensors cloned; counters as ints)."""
        state: Dict[str, Any] = {"name": self.name}
        for key in self.state_tensors:
            state[key] = {name: value.clone() for name, value in getattr(self, key).items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"in-step checkpoint holds {state.get('name')!r} regularizer state, "
                             f"this run uses {self.name!r}")
        for key in self.state_tensors:
            if key not in state:
                raise ValueError(f"in-step {self.name} regularizer state has no {key!r} (written by "
                                 "another version of this code)")
            current = getattr(self, key)
            saved = state[key]
            if saved.keys() != current.keys():
                raise ValueError(f"in-step regularizer state {key!r} does not fit the model's parameters")
            for name, value in saved.items():
                current[name].copy_(value)


class FisherEMA:
    """Running Fisher estimate ``F <- alpha * g^2 + (1 - alpha) * F`` (EWC and RW).

    Starts from the previous step's (unnormalised) Fisher where it exists, from ones elsewhere.
    """

    def __init__(self, parameters: Mapping[str, nn.Parameter], previous: Mapping[str, torch.Tensor],
                 alpha: float) -> None:
        self.alpha = alpha
        self.values: Tensors = {}
        for name, parameter in parameters.items():
            if name in previous:
                self.values[name] = previous[name].detach().to(parameter).clone()
            else:
                self.values[name] = torch.ones_like(parameter, requires_grad=False).detach()

    @torch.no_grad()
    def update(self, parameters: Mapping[str, nn.Parameter]) -> None:
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                fisher = self.values[name]
                fisher.mul_(1.0 - self.alpha).addcmul_(parameter.grad, parameter.grad, value=self.alpha)


class EWC(Regularizer):
    """EWC (Kirkpatrick et al.) as in the paper's tables: CE + 500 * Fisher-weighted L2 to step t-1.

    The Fisher is an exponential moving average of squared gradients (alpha = ``--reg_alpha``, 0.9),
    updated every iteration and continued from step to step.
    """
    name = "ewc"
    state_tensors = ("fisher",)
    importance_keys = ("fisher",)

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, penalize: bool = True, alpha: float = 0.9,
                 iterations: int = 10) -> None:
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize,
                         penalize=penalize)
        self._fisher = FisherEMA(self.parameters, self._previous(previous, "fisher"), alpha)
        self.fisher = self._fisher.values

    def update(self) -> None:
        self._fisher.update(self.parameters)

    def trained_importance(self) -> Dict[str, Tensors]:
        return {"fisher": {name: value.clone() for name, value in self.fisher.items()}}


PI_EPSILON = 1e-20


class PI(Regularizer):
    """PI, path integral (Zenke et al.) as in the paper's tables: CE + 500 * score-weighted L2 to step t-1.

    Every iteration ``delta += g * (theta_prev - theta_now)``; at the end of the step the score is
    ``max(0, delta / ((theta_end - theta_origin)^2 + 1e-20)) + score_{t-1}``, where
    ``theta_origin`` is the step t-1 model's weight and, for a new classifier (or at step 0), the
    weight at the start of the step. The two differ where the step starts from other weights than
    the old model's: the background bias that ``--init_balanced`` moves.
    """
    name = "pi"
    state_tensors = ("delta", "previous_params", "origin")
    importance_keys = ("score",)

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, penalize: bool = True, alpha: float = 0.9,
                 iterations: int = 10) -> None:
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize,
                         penalize=penalize)
        self.previous_score = self._previous(previous, "score")
        self.delta: Tensors = {name: torch.zeros_like(p).detach() for name, p in self.parameters.items()}
        self.previous_params: Tensors = {name: p.detach().clone() for name, p in self.parameters.items()}
        weights = previous_weights or {}
        self.origin: Tensors = {
            name: (weights[name].detach().to(p).clone() if name in weights else p.detach().clone())
            for name, p in self.parameters.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.parameters.items():
            if parameter.grad is not None:
                previous = self.previous_params[name]
                self.delta[name].add_(parameter.grad * (previous - parameter))
                previous.copy_(parameter)

    @torch.no_grad()
    def trained_importance(self) -> Dict[str, Tensors]:
        score: Tensors = {}
        for name, parameter in self.parameters.items():
            moved = (parameter - self.origin[name]) ** 2
            value = (self.delta[name] / (moved + PI_EPSILON)).clamp(min=0)
            if name in self.previous_score:
                value = value + self.previous_score[name].to(value)
            score[name] = value
        return {"score": score}


RW_EPSILON = 1e-8


class RW(Regularizer):
    """RW, Riemannian Walk (Chaudhry et al.) as in the paper's tables: CE + 100 * (Fisher + score)-weighted L2.

    Fisher EMA as in EWC every iteration. At iterations 0, k, 2k, ... (k = ``--reg_iterations``,
    10) ``s += g * (theta_k - theta) / (0.5 * F * (theta - theta_k)^2 + 1e-8)``, with ``theta_k``
    the weights at the previous such iteration and ``F`` the Fisher before this iteration's update
    (nothing is added at iteration 0). The saved score is ``max(s, 0)``, averaged with the previous
    score, ``0.5 * (max(s, 0) + score_{t-1})``, where one exists.
    """
    name = "rw"
    state_tensors = ("fisher", "score", "previous_params")
    importance_keys = ("fisher", "score")

    def __init__(self, model: nn.Module, previous: Optional[Mapping[str, Any]],
                 previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                 normalize: bool = True, penalize: bool = True, alpha: float = 0.9,
                 iterations: int = 10) -> None:
        if iterations <= 0:
            raise ValueError(f"RW: the score update period must be positive, got {iterations}")
        super().__init__(model, previous, previous_weights, weight=weight, normalize=normalize,
                         penalize=penalize)
        self.iterations = iterations
        self.count = 0
        self._fisher = FisherEMA(self.parameters, self._previous(previous, "fisher"), alpha)
        self.fisher = self._fisher.values
        self.previous_score = self._previous(previous, "score")
        self.score: Tensors = {name: torch.zeros_like(p).detach() for name, p in self.parameters.items()}
        self.previous_params: Tensors = {name: p.detach().clone() for name, p in self.parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        if self.count % self.iterations == 0:
            for name, parameter in self.parameters.items():
                if parameter.grad is not None:
                    previous = self.previous_params[name]
                    if self.count > 0:
                        moved = parameter - previous
                        self.score[name].add_(
                            parameter.grad * (-moved) / (0.5 * self.fisher[name] * moved * moved + RW_EPSILON))
                    previous.copy_(parameter)
        self.count += 1
        self._fisher.update(self.parameters)

    @torch.no_grad()
    def trained_importance(self) -> Dict[str, Tensors]:
        score: Tensors = {}
        for name, value in self.score.items():
            value = value.clamp(min=0)
            if name in self.previous_score:
                value = 0.5 * (value + self.previous_score[name].to(value))
            score[name] = value
        return {"fisher": {name: value.clone() for name, value in self.fisher.items()}, "score": score}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["count"] = self.count
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.count = int(state["count"])


#: ``--regularizer`` choices.
REGULARIZERS: Dict[str, type] = {cls.name: cls for cls in (EWC, PI, RW)}


def build_regularizer(name: str, model: nn.Module, previous: Optional[Mapping[str, Any]],
                      previous_weights: Optional[Mapping[str, torch.Tensor]], *, weight: float,
                      normalize: bool, alpha: float, iterations: int, penalize: bool = True) -> Regularizer:
    """The ``--regularizer name`` regularizer of ``model`` (see :class:`Regularizer`)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; available: {', '.join(REGULARIZERS)}")
    return REGULARIZERS[name](model, previous, previous_weights, weight=weight, normalize=normalize,
                              penalize=penalize, alpha=alpha, iterations=iterations)
