"""Normalisation + activation layers: ABN, In-Place ABN and synchronised In-Place ABN.

Every layer here computes ``act(BN(x))`` with ``act`` a leaky ReLU (default slope 0.01) or
the identity, and exposes ``activation`` and ``activation_param`` so that blocks that add
a residual before activating can apply the same non-linearity themselves.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("leaky_relu", "identity")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def apply_activation(x: torch.Tensor, activation: str, activation_param: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=activation_param)
    return x


class ABN(nn.BatchNorm2d):
    """Batch norm followed by an activation, with autograd's usual memory use (no in-place trick)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        _check_activation(activation)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(super().forward(x), self.activation, self.activation_param)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, slope={self.activation_param}"


NORM_LAYERS = {"abn": ABN}


def norm_act_layer(name: str) -> Callable[..., nn.Module]:
    """The norm+activation class for a ``--norm_act`` name."""
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm_act {name!r}; valid: {', '.join(NORM_LAYERS)}")
    return NORM_LAYERS[name]
