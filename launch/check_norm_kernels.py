"""Check the fused In-Place ABN kernels against the reference operations on a device, and time both.

For each dtype (float32, bfloat16, float16), memory format and with/without a residual, one
training forward+backward of ``InPlaceABN`` runs with the fused kernels and with the reference
operations (``norm_kernels.set_kernel_mode``). Both are compared with the same computation in
float64 (reference operations on the float64 copies of the same inputs): the fused kernels pass
when their largest relative error is at most twice the reference's plus sqrt(n) units in the last
place of the dtype, n the number of values summed per channel (inductor sums in another order
than ATen, and the rounding of a sum grows with its length). A float64 gradcheck of the fused
kernels runs on the device too. Then both implementations are timed (median forward+backward) on
a ResNet-sized map.

Exits with status 1 when a check fails.

Usage: ``python launch/check_norm_kernels.py [--device cuda] [--shape 12,256,128,128]``; ``--device cpu
--eager`` runs the fused formulation as written instead of compiled: a check of this script in seconds
(``launch/gpu_session.sh``'s dry run), not of the compiler's kernels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segmentation.models import norm_kernels  # noqa: E402
from segmentation.models.norm import InPlaceABN, InPlaceABNFunction  # noqa: E402

EPS = 1e-5


def run(
    layer: InPlaceABN, x: torch.Tensor, residual: Optional[torch.Tensor], grad_out: torch.Tensor
) -> List[torch.Tensor]:
    """Output, running statistics and the gradients of x, residual, weight and bias."""
    layer.weight.grad = layer.bias.grad = None
    inp = x.detach().clone().requires_grad_(True)
    res = residual.detach().clone().requires_grad_(True) if residual is not None else None
    out = layer(inp * 1, residual=res)
    out.backward(grad_out)
    values = [out.detach(), layer.running_mean.clone(), layer.running_var.clone(), inp.grad]
    if res is not None:
        values.append(res.grad)
    return values + [layer.weight.grad, layer.bias.grad]


def make_layer(channels: int, dtype: torch.dtype, device: torch.device) -> InPlaceABN:
    layer = InPlaceABN(channels).to(device=device, dtype=dtype if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1.5, 2.0, channels))
        layer.bias.copy_(torch.linspace(0.3, -0.4, channels))
    return layer


def check(device: torch.device, dtype: torch.dtype, channels_last: bool, with_residual: bool) -> bool:
    torch.manual_seed(0)
    shape = (6, 32, 17, 19)
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype) if with_residual else None
    grad_out = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x, grad_out = x.to(memory_format=torch.channels_last), grad_out.to(memory_format=torch.channels_last)

    norm_kernels.set_kernel_mode("reference")
    truth = run(make_layer(32, torch.float64, device), x.double(), residual.double() if with_residual else None,
                grad_out.double())
    reference = run(make_layer(32, dtype, device), x, residual, grad_out)
    norm_kernels.set_kernel_mode("fused")
    fused = run(make_layer(32, dtype, device), x, residual, grad_out)
    norm_kernels.set_kernel_mode("auto")

    allowed = torch.finfo(dtype).eps * (x.numel() // x.shape[1]) ** 0.5
    ok = True
    errors = []
    for exact, ref, fus in zip(truth, reference, fused):
        scale = exact.abs().max().item() or 1.0
        ref_error = (ref.double() - exact).abs().max().item() / scale
        fused_error = (fus.double() - exact).abs().max().item() / scale
        ok &= fused_error <= 2 * ref_error + allowed and fus.dtype == ref.dtype
        errors.append(f"{fused_error:.1e}/{ref_error:.1e}")
    if channels_last:
        ok &= fused[0].is_contiguous(memory_format=torch.channels_last)
    label = f"{str(dtype).replace('torch.', ''):8s} {'channels_last' if channels_last else 'nchw':13s} "
    label += "residual   " if with_residual else "no residual"
    print(f"{'PASS' if ok else 'FAIL'} {label}  relative max error fused/reference: {' '.join(errors)}")
    return ok


def gradcheck(device: torch.device) -> bool:
    norm_kernels.set_kernel_mode("fused")
    x = (torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device) * 2 + 0.5).requires_grad_(True)
    residual = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.tensor([0.8, -1.3], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.tensor([0.2, -0.1], dtype=torch.float64, device=device, requires_grad=True)

    def function(x, residual, weight, bias):
        return InPlaceABNFunction.apply(x.clone(), weight, bias, EPS, "leaky_relu", 0.01, None, residual)[0]

    ok = torch.autograd.gradcheck(function, (x, residual, weight, bias), raise_exception=False)
    norm_kernels.set_kernel_mode("auto")
    print(f"{'PASS' if ok else 'FAIL'} float64 gradcheck of the fused kernels (with residual)")
    return ok


def time_layer(device: torch.device, shape: List[int], dtype: torch.dtype, mode: str, repeats: int) -> float:
    norm_kernels.set_kernel_mode(mode)
    layer = make_layer(shape[1], dtype, device)
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    residual = torch.randn_like(x)
    grad_out = torch.randn_like(x)
    times = []
    for _ in range(repeats + 3):
        inp = x.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        layer(inp * 1, residual=residual).backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    norm_kernels.set_kernel_mode("auto")
    return statistics.median(times[3:])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="12,256,128,128", help="map timed: N,C,H,W (channels_last)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--eager", action="store_true",
                        help="run the fused formulation eagerly instead of compiling it (no compiler involved)")
    parser.add_argument("--quick", action="store_true",
                        help="four cases instead of every combination (fewer kernels to compile): float32 "
                        "contiguous, bfloat16 channels_last with and without residual, float16 with residual")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cases = [(dtype, channels_last, residual) for dtype in dtypes for channels_last in (False, True)
             for residual in (False, True)]
    if args.quick:
        cases = [(torch.float32, False, False), (torch.bfloat16, True, True), (torch.bfloat16, True, False),
                 (torch.float16, False, True)]
    if args.eager:
        # What the tests do (tests/conftest.py): "fused" then calls the functions as written.
        norm_kernels._compiled.update({function.__name__: function for function in norm_kernels.FUSED_FUNCTIONS})
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}{', fused formulation run eagerly' if args.eager else ''}")

    ok = gradcheck(device)
    for dtype, channels_last, with_residual in cases:
        ok &= check(device, dtype, channels_last, with_residual)

    shape = [int(n) for n in args.shape.split(",")]
    print(f"\nforward+backward of one InPlaceABN with residual on {shape} (channels_last), median of {args.repeats}:")
    for dtype in (torch.float32, torch.bfloat16):
        reference = time_layer(device, shape, dtype, "reference", args.repeats)
        fused = time_layer(device, shape, dtype, "fused", args.repeats)
        print(f"  {str(dtype).replace('torch.', '')}: reference {reference * 1e3:.2f} ms, fused {fused * 1e3:.2f} ms "
              f"({reference / fused:.1f}x)")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
