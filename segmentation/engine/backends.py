"""The process-wide numerics and kernel settings of a run, set once before any model is built.

PyTorch's own defaults differ between the matrix products (TF32 off) and cuDNN's convolutions
(TF32 on), and leave cuDNN's autotuner off; a run sets all of them explicitly and logs them, so
that two runs (and ``launch/bench_train.py``) compute the same way:

- ``--norm_kernels``: In-Place ABN's fused (compiled) kernels or its reference operations;
- ``--tf32 on|off``: TF32 for float32 convolutions and matrix products alike (CUDA, Ampere and newer);
- cuDNN's autotuner (``cudnn.benchmark``) on CUDA: training crops have one size, so each
  convolution is tuned once; evaluation on full images tunes once per image size.
"""
from __future__ import annotations

import torch

from segmentation.models import norm_kernels


def configure_backends(norm_kernel_mode: str, tf32: str, device: torch.device) -> str:
    """Apply the settings for computing on ``device``; returns the line that describes them."""
    if tf32 not in ("on", "off"):
        raise ValueError(f"unknown TF32 setting {tf32!r}; valid: on, off")
    norm_kernels.set_kernel_mode(norm_kernel_mode)
    allow_tf32 = tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    fused = norm_kernel_mode == "fused" or (norm_kernel_mode == "auto" and cuda)
    kernels = "fused (compiled)" if fused else "reference operations"
    line = f"In-Place ABN kernels: {kernels} (--norm_kernels {norm_kernel_mode})"
    if cuda:
        line += (f"; TF32 {tf32} for float32 convolutions and matrix products (--tf32); "
                 "cuDNN autotuner on")
    return line
