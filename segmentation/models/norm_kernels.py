"""The arithmetic of In-Place ABN, written once as plain PyTorch functions and run in two ways.

Run as written (``kernel(name, fused=False)``), they are the reference implementation and the CPU
path: every operation is its own kernel, and an input whose dtype is the statistics' dtype (float32,
float64) is normalised in place, without a full-size temporary. Compiled by ``torch.compile``
(``kernel(name, fused=True)``), each function is one graph: inductor fuses every elementwise
operation into the reduction or the map that consumes it, and the float32 upcast of half-precision
maps happens in registers. They are compiled on first use, with dynamic shapes (one graph per dtype,
memory format and activation, not per layer shape). Both ways compute half-precision maps in float32
and round the result once; the compiled graphs may order and fuse the float32 arithmetic differently
(the fused path equals the reference within rounding, not bitwise).

``kernel_mode()`` (``--norm_kernels``) decides per call: "auto" (default) runs the compiled functions
for CUDA tensors outside an already compiled region (there the functions as written are traced and
fused into the surrounding graph anyway); "fused" runs them on every device (on the CPU, inductor's
C++ kernels); "reference" runs the functions as written everywhere (the escape hatch for a GPU
whose compiled kernels are wrong).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

KERNEL_MODES = ("auto", "fused", "reference")
_mode = "auto"

# Fused graphs per function: dtypes (4) x memory formats (2) x activations (2), plus the
# specialisations dynamic shapes make for 1x1 maps. Dynamo's default limit of 8 would fall back
# to eager code after the eighth.
_RECOMPILE_LIMIT = 64


def set_kernel_mode(mode: str) -> None:
    """Select the In-Place ABN implementation: "auto", "fused" or "reference" (see module doc)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown In-Place ABN kernel mode {mode!r}; valid: {', '.join(KERNEL_MODES)}")
    _mode = mode


def kernel_mode() -> str:
    return _mode


def use_fused(x: torch.Tensor) -> bool:
    """Whether the In-Place ABN call on ``x`` runs the fused kernels."""
    if _mode == "reference" or torch.compiler.is_compiling():
        return False
    return _mode == "fused" or x.is_cuda


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))


# ---------------------------------------------------------------------------- the mathematics
# ``slope`` is the leaky ReLU's negative slope; the identity activation passes 1.0 (exact: z * 1.0
# and z / 1.0 are z). ``residual`` (or None) is added after the affine map, before the activation.
# ``scale`` is the effective scale ``|weight| + eps``.


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics and of the arithmetic: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_scale_shift(
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective scale ``|weight| + eps`` (as InPlace-ABN 1.0.x uses it) and shift of In-Place ABN,
    in ``dtype`` (1 and 0 without affine parameters)."""
    channels = x.shape[1]
    scale = (weight.abs() + eps).to(dtype) if weight is not None else x.new_ones(channels, dtype=dtype)
    shift = bias.to(dtype) if bias is not None else x.new_zeros(channels, dtype=dtype)
    return scale, shift


def batch_moments(x: torch.Tensor, stat_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of ``x`` over every dim but 1, in ``stat_dtype``."""
    var, mean = torch.var_mean(x.to(stat_dtype), dim=_reduce_dims(x.dim()), correction=0)
    return mean, var


def normalize_activate_(
    x: torch.Tensor,
    mean: torch.Tensor,
    scale_invstd: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
    residual: Optional[torch.Tensor],
) -> None:
    """``x <- leaky_relu((x - mean) * scale_invstd + shift [+ residual], slope)`` in the statistics' dtype:
    in place when ``x`` has that dtype, otherwise in one converted copy that is rounded back into ``x``."""
    ndim = x.dim()
    in_place = x.dtype == mean.dtype
    z = x if in_place else x.to(mean.dtype)
    z.sub_(_channel_view(mean, ndim)).mul_(_channel_view(scale_invstd, ndim)).add_(_channel_view(shift, ndim))
    if residual is not None:
        z.add_(residual)
    F.leaky_relu_(z, slope)
    if not in_place:
        x.copy_(z)


def invert(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
    residual: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, dL/dz) from the output and its gradient: undo the activation, the residual and the affine map.

    dL/dz is also the residual's gradient.
    """
    ndim = y.dim()
    z = y.to(scale.dtype)
    grad_z = grad_y.to(scale.dtype)
    if slope != 1.0:  # the identity has nothing to undo
        negative = z < 0
        z = torch.where(negative, z / slope, z)
        grad_z = torch.where(negative, grad_z * slope, grad_z)
    if residual is not None:
        z = z - residual.to(scale.dtype)
    x_hat = (z - _channel_view(shift, ndim)) / _channel_view(scale, ndim)
    return x_hat, grad_z


def channel_sums(x_hat: torch.Tensor, grad_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of dL/dz and of dL/dz * x_hat."""
    dims = _reduce_dims(x_hat.dim())
    return grad_z.sum(dims), (grad_z * x_hat).sum(dims)


def input_grad_from(
    x_hat: torch.Tensor,
    grad_z: torch.Tensor,
    mean_grad_z: torch.Tensor,
    mean_grad_z_x_hat: torch.Tensor,
    scale_invstd: torch.Tensor,
    dtype: torch.dtype,
    residual: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dL/dx = (dL/dz - mean(dL/dz) - x_hat * mean(dL/dz * x_hat)) * scale * invstd in ``dtype``,
    and dL/dresidual = dL/dz in the residual's dtype (None without a residual)."""
    ndim = x_hat.dim()
    # addcmul rounds differently from a separate product and difference (CPU); the float64 loss
    # traces of tests/test_loss_traces.py were recorded with it.
    grad_z_centred = grad_z - _channel_view(mean_grad_z, ndim)
    grad_x = torch.addcmul(grad_z_centred, x_hat, _channel_view(mean_grad_z_x_hat, ndim), value=-1)
    grad_x = grad_x.mul_(_channel_view(scale_invstd, ndim))
    grad_residual = None if residual is None else grad_z.to(residual.dtype)
    return grad_x.to(dtype), grad_residual


# The backward as compiled graphs: each one reads the output and its gradient and undoes the
# activation itself, inside its kernel (cheaper than writing x_hat and dL/dz to memory between two
# kernels). Run as written, the backward undoes it once and keeps x_hat and dL/dz instead.


def backward_sums(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
    residual: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``channel_sums`` of ``invert``."""
    return channel_sums(*invert(y, grad_y, scale, shift, slope, residual))


def input_grad(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    slope: float,
    residual: Optional[torch.Tensor],
    mean_grad_z: torch.Tensor,
    mean_grad_z_x_hat: torch.Tensor,
    scale_invstd: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``input_grad_from`` of ``invert``, in ``y``'s dtype."""
    x_hat, grad_z = invert(y, grad_y, scale, shift, slope, residual)
    return input_grad_from(x_hat, grad_z, mean_grad_z, mean_grad_z_x_hat, scale_invstd, y.dtype, residual)


# Without a process group the whole forward and the whole backward are one function each: compiled,
# one graph each (two kernels: the reduction, then the map), so a layer costs two compiled calls, not four.


def forward_local(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    slope: float,
    residual: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of ``x``, then ``normalize_activate_``; returns (mean, biased variance, invstd)."""
    stat_dtype = statistics_dtype(x.dtype)
    mean, var = batch_moments(x, stat_dtype)
    invstd = torch.rsqrt(var + eps)
    scale, shift = effective_scale_shift(weight, bias, eps, x, stat_dtype)
    normalize_activate_(x, mean, scale * invstd, shift, slope, residual)
    return mean, var, invstd


def backward_local(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    invstd: torch.Tensor,
    slope: float,
    residual: Optional[torch.Tensor],
    count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``backward_sums`` then ``input_grad``: (sum dL/dz, sum dL/dz * x_hat, dL/dx, dL/dresidual)."""
    scale, shift = effective_scale_shift(weight, bias, eps, y, invstd.dtype)
    sum_grad_z, sum_grad_z_x_hat = backward_sums(y, grad_y, scale, shift, slope, residual)
    grad_x, grad_residual = input_grad(
        y, grad_y, scale, shift, slope, residual, sum_grad_z / count, sum_grad_z_x_hat / count, scale * invstd
    )
    return sum_grad_z, sum_grad_z_x_hat, grad_x, grad_residual


# ---------------------------------------------------------------------------- the two ways to run them
FUSED_FUNCTIONS = (batch_moments, normalize_activate_, backward_sums, input_grad, forward_local, backward_local)
_functions: Dict[str, Callable] = {function.__name__: function for function in FUSED_FUNCTIONS}
_compiled: Dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """The compiled version of one of ``FUSED_FUNCTIONS``."""
    if name not in _compiled:
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, limit, max(getattr(config, limit), _RECOMPILE_LIMIT))
        _compiled[name] = torch.compile(_functions[name], dynamic=True, fullgraph=True)
    return _compiled[name]


def kernel(name: str, fused: bool) -> Callable:
    """One of ``FUSED_FUNCTIONS``: compiled when ``fused`` (the fused path), as written otherwise (the reference)."""
    return compiled(name) if fused else _functions[name]
