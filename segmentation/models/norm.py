"""Normalisation + activation layers: ABN, In-Place ABN and synchronised In-Place ABN.

Every layer here computes ``act(BN(x))`` with ``act`` a leaky ReLU (default slope 0.01) or
the identity, or ``act(BN(x) + residual)`` when called as ``layer(x, residual=r)``: a residual
block hands its shortcut to its last norm, so that In-Place ABN keeps only the block's output
(the norm's output and the sum are never stored separately). ``layer(x, residual=r, activate=False)``
skips the activation and returns ``BN(x) + r`` (In-Place ABN runs with the identity activation), for a
caller that needs the pre-activation sum and applies the activation itself, out of place.

In-Place ABN (Rota Bulo et al., CVPR 2018) overwrites its input with the output in training
mode and keeps only the output for the backward pass: the normalised input is recovered by
inverting the activation and the affine map. Like InPlace-ABN 1.0.x, whose pretrained
weights this project loads, the effective BN scale is ``|weight| + eps``; the
plain ``ABN`` uses ``weight`` as is.

In-Place ABN's arithmetic is written once, as the functions of ``norm_kernels``: run as written
they are the reference and the CPU path (in place for float32 and float64 inputs), compiled by
``torch.compile`` they are the fused path used on CUDA. Both compute half-precision inputs (e.g.
under CPU autocast) in float32 and round the output once.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import norm_kernels

ACTIVATIONS = ("leaky_relu", "identity")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def apply_activation(x: torch.Tensor, activation: str, activation_param: float, inplace: bool = False) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=activation_param, inplace=inplace)
    return x


class _BatchNormAct(nn.BatchNorm2d):
    """Shared constructor of the norm+activation layers: BatchNorm2d parameters and buffers
    (same state_dict keys for every variant) plus the activation's name and parameter."""

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, slope={self.activation_param}"


class ABN(_BatchNormAct):
    """Batch norm followed by an activation, with autograd's usual memory use (no in-place trick).

    Like InPlace-ABN's ``ABN``, the activation runs in place on the fresh batch-norm output (or sum),
    so autograd keeps the norm's input and the activation's output. ``activate=False`` returns
    ``BN(x) [+ residual]`` without the activation.
    """

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, activate: bool = True
    ) -> torch.Tensor:
        out = super().forward(x)
        if residual is not None:
            out = out + residual
        if not activate:
            return out
        return apply_activation(out, self.activation, self.activation_param, inplace=True)


# --------------------------------------------------------------------------------------------
# In-Place ABN
# --------------------------------------------------------------------------------------------

Count = Union[int, torch.Tensor]


def _batch_stats(
    x: torch.Tensor, dtype: torch.dtype, group: Optional[dist.ProcessGroup], fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor, Count]:
    """Per-channel mean, biased variance and element count of ``x`` over every dim but 1,
    pooled over the processes of ``group`` (local only when ``group`` is None).

    Each process contributes (count, mean, variance); they are pooled with two all-reduces
    (first the counts and sums, then the squared deviations from the pooled mean), which stays
    accurate when the mean is large compared with the spread. Counts may differ per process.
    """
    num_channels = x.shape[1]
    count = x.numel() // num_channels
    if count > 0:
        mean, var = norm_kernels.kernel("batch_moments", fused)(x, dtype)
    else:
        mean = var = torch.zeros(num_channels, dtype=dtype, device=x.device)
    if group is None:
        return mean, var, count

    sums_and_count = torch.cat([mean.double() * count, mean.new_full((1,), count, dtype=torch.float64)])
    dist.all_reduce(sums_and_count, group=group)
    total = sums_and_count[-1]
    pooled_mean = sums_and_count[:-1] / total
    squared_deviations = count * (var.double() + (mean.double() - pooled_mean) ** 2)
    dist.all_reduce(squared_deviations, group=group)
    return pooled_mean.to(dtype), (squared_deviations / total).to(dtype), total


def _slope(activation: str, activation_param: float) -> float:
    """The leaky ReLU slope that computes ``activation`` (1 for the identity)."""
    return activation_param if activation == "leaky_relu" else 1.0


def _affine_grads(
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    sum_grad_z: torch.Tensor,
    sum_grad_z_x_hat: torch.Tensor,
    ctx,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of weight and bias (None where not needed) from the per-channel backward sums."""
    grad_weight = grad_bias = None
    if weight is not None and ctx.needs_input_grad[1]:
        # d|w|/dw = sign(w), with +1 at w = 0.
        grad_weight = torch.where(weight < 0, -sum_grad_z_x_hat, sum_grad_z_x_hat).to(weight.dtype)
    if bias is not None and ctx.needs_input_grad[2]:
        grad_bias = sum_grad_z.to(bias.dtype)
    return grad_weight, grad_bias


def _mean_sums(
    sum_grad_z: torch.Tensor, sum_grad_z_x_hat: torch.Tensor, ctx
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward sums over every process of the layer's group, divided by the element count."""
    if ctx.group is None:
        return sum_grad_z / ctx.count, sum_grad_z_x_hat / ctx.count
    sums = torch.cat([sum_grad_z, sum_grad_z_x_hat])
    dist.all_reduce(sums, group=ctx.group)
    return (sums / ctx.count).split(sum_grad_z.shape[0])


class InPlaceABNFunction(torch.autograd.Function):
    """``act(BN(x) [+ residual])`` in training mode, written into ``x``; saves only the output, the
    residual (which its producer keeps anyway: the block input, or the projection norm's output)
    and per-channel tensors.

    ``apply(x, weight, bias, eps, activation, activation_param, group[, residual])`` returns
    ``(y, batch_mean, batch_var_unbiased)`` where ``y`` is ``x`` itself, overwritten. ``weight``
    and ``bias`` may be None (no affine). With a process ``group`` the batch statistics and the
    backward reductions are all-reduced over it; the weight and bias gradients stay local (the
    data-parallel wrapper sums or averages them like any other parameter gradient).
    Statistics and arithmetic are in float32 (float64 for float64 inputs). The arithmetic is the
    functions of ``norm_kernels``: compiled into fused kernels on CUDA, run as written (the
    reference) on the CPU.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        eps: float,
        activation: str,
        activation_param: float,
        group: Optional[dist.ProcessGroup],
        residual: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused = norm_kernels.use_fused(x)
        slope = _slope(activation, activation_param)
        # Plain tensors, not parameters: the compiler specialises on a parameter's shape (one graph
        # per channel count instead of one for all), and this function computes their gradients itself.
        weight = weight.detach() if weight is not None else None
        bias = bias.detach() if bias is not None else None
        if group is None:
            count = x.numel() // x.shape[1]
            mean, var, invstd = norm_kernels.kernel("forward_local", fused)(x, weight, bias, eps, slope, residual)
        else:
            stat_dtype = norm_kernels.statistics_dtype(x.dtype)
            mean, var, count = _batch_stats(x, stat_dtype, group, fused)
            invstd = torch.rsqrt(var + eps)
            scale, shift = norm_kernels.effective_scale_shift(weight, bias, eps, x, stat_dtype)
            norm_kernels.kernel("normalize_activate_", fused)(x, mean, scale * invstd, shift, slope, residual)

        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, invstd, residual)
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        ctx.group = group
        ctx.count = count
        ctx.fused = fused

        var_unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, var_unbiased)
        return x, mean, var_unbiased

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor):
        y, weight, bias, invstd, residual = ctx.saved_tensors
        slope = _slope(ctx.activation, ctx.activation_param)
        needs_input_grads = ctx.needs_input_grad[0] or (residual is not None and ctx.needs_input_grad[7])
        grad_x = grad_residual = None
        scale, shift = norm_kernels.effective_scale_shift(weight, bias, ctx.eps, y, invstd.dtype)
        if ctx.fused and ctx.group is None and needs_input_grads:
            sum_grad_z, sum_grad_z_x_hat, grad_x, grad_residual = norm_kernels.compiled("backward_local")(
                y, grad_y, weight, bias, ctx.eps, invstd, slope, residual, ctx.count
            )
        elif ctx.fused:
            sum_grad_z, sum_grad_z_x_hat = norm_kernels.compiled("backward_sums")(y, grad_y, scale, shift, slope, residual)
            if needs_input_grads:
                mean_grad_z, mean_grad_z_x_hat = _mean_sums(sum_grad_z, sum_grad_z_x_hat, ctx)
                grad_x, grad_residual = norm_kernels.compiled("input_grad")(
                    y, grad_y, scale, shift, slope, residual, mean_grad_z, mean_grad_z_x_hat, scale * invstd
                )
        else:
            x_hat, grad_z = norm_kernels.invert(y, grad_y, scale, shift, slope, residual)
            sum_grad_z, sum_grad_z_x_hat = norm_kernels.channel_sums(x_hat, grad_z)
            if needs_input_grads:
                mean_grad_z, mean_grad_z_x_hat = _mean_sums(sum_grad_z, sum_grad_z_x_hat, ctx)
                grad_x, grad_residual = norm_kernels.input_grad_from(
                    x_hat, grad_z, mean_grad_z, mean_grad_z_x_hat, scale * invstd, y.dtype, residual
                )
        grad_weight, grad_bias = _affine_grads(weight, bias, sum_grad_z, sum_grad_z_x_hat, ctx)
        return grad_x, grad_weight, grad_bias, None, None, None, None, grad_residual


class InPlaceABN(_BatchNormAct):
    """In-Place Activated BatchNorm: ``act(BN(x))`` with effective scale ``|weight| + eps``.

    In training mode the input tensor is overwritten with the output (so it must not be needed
    elsewhere afterwards, e.g. by a residual connection) and only the output is kept for the
    backward pass. Running statistics use ``momentum`` and the unbiased batch variance, like
    ``nn.BatchNorm2d``. Eval mode uses the running statistics and does not modify the input.
    Accepts any ``(N, C, ...)`` input and any memory format. ``activate=False`` computes
    ``BN(x) [+ residual]`` (the identity activation instead of the layer's own), in place too.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, activation, activation_param)
        if activation == "leaky_relu" and activation_param <= 0:
            raise ValueError(
                f"InPlaceABN needs an invertible activation: leaky_relu slope must be > 0, got {activation_param}"
            )
        if eps <= 0:
            raise ValueError(f"InPlaceABN needs eps > 0 (the effective scale is |weight| + eps), got {eps}")

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group to pool batch statistics over, or None for local statistics."""
        return None

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, activate: bool = True
    ) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects an (N, {self.num_features}, ...) input, "
                f"got shape {tuple(x.shape)}"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}: the residual's shape {tuple(residual.shape)} differs from the input's "
                f"{tuple(x.shape)}"
            )
        activation = self.activation if activate else "identity"
        if not self.training:
            return self._forward_eval(x, residual, activation)

        group = self._sync_group()
        if group is None and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got input shape {tuple(x.shape)}")
        y, batch_mean, batch_var = InPlaceABNFunction.apply(
            x, self.weight, self.bias, self.eps, activation, self.activation_param, group, residual
        )
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            self.running_mean.mul_(1 - factor).add_(batch_mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(batch_var.to(self.running_var.dtype), alpha=factor)
        return y

    def _forward_eval(self, x: torch.Tensor, residual: Optional[torch.Tensor], activation: str) -> torch.Tensor:
        weight = self.weight.abs() + self.eps if self.weight is not None else None
        out = F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias, False, 0.0, self.eps)
        if residual is not None:
            out = out + residual
        return apply_activation(out, activation, self.activation_param)


class InPlaceABNSync(InPlaceABN):
    """InPlaceABN with batch statistics pooled over the processes of ``group``.

    ``group=None`` means the default (WORLD) group, looked up at every forward call, so the
    layer may be built before ``torch.distributed`` is initialised and still synchronises
    (the original silently stopped doing so with newer PyTorch). Without an
    initialised process group, or with a single process, it is exactly InPlaceABN.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, activation, activation_param)
        self.group = group

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.group if self.group is not None else dist.group.WORLD
        if dist.get_world_size(group) <= 1:
            return None
        return group


NORM_LAYERS = {"iabn_sync": InPlaceABNSync, "iabn": InPlaceABN, "abn": ABN}


def norm_act_layer(name: str) -> Callable[..., nn.Module]:
    """The norm+activation class for a ``--norm_act`` name."""
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm_act {name!r}; valid: {', '.join(NORM_LAYERS)}")
    return NORM_LAYERS[name]
