"""Activation memory and time of In-Place ABN against ABN on CPU: what autograd keeps for backward.

For each norm layer the model (DeepLabV3 on a dilated ResNet, training mode) runs forward on a
random batch; every tensor autograd saves for the backward pass is recorded through
``torch.autograd.graph.saved_tensors_hooks``. Saved bytes = the sizes of the distinct storages
among them that are not parameters (a tensor saved by two operations, or overwritten in place
and saved again, counts once). Time = median of ``--repeats`` forward+backward passes.

Usage: ``python launch/bench_norm_memory.py [--backbone resnet50 --output_stride 16 --batch 2 --size 128]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_data import cpu_model  # noqa: E402  (launch/ is the script's folder)
from segmentation.models import build_model  # noqa: E402
from segmentation.models.norm import NORM_LAYERS  # noqa: E402


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(bytes, count) of the distinct non-parameter storages autograd saves in one forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(images)
    del out
    return sum(storages.values()), len(storages)


def forward_backward_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        model(images).sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--output_stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--norms", default="abn,iabn", help=f"comma-separated, from {', '.join(NORM_LAYERS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {}
    for norm in args.norms.split(","):
        torch.manual_seed(0)
        model = build_model([16], args.backbone, args.output_stride, norm).train()
        images = torch.randn(args.batch, 3, args.size, args.size)
        saved, count = saved_activation_bytes(model, images)
        seconds = forward_backward_seconds(model, images, args.repeats)
        results[norm] = (saved, count, seconds)

    base = results[args.norms.split(",")[0]]
    print(f"machine: {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}")
    print(
        f"model: DeepLabV3-{args.backbone} OS{args.output_stride}, training mode, input "
        f"{args.batch}x3x{args.size}x{args.size}; time: median of {args.repeats} forward+backward passes"
    )
    print()
    print("| norm | saved tensors | saved MiB | vs first | forward+backward ms | vs first |")
    print("|---|---:|---:|---:|---:|---:|")
    for norm, (saved, count, seconds) in results.items():
        print(
            f"| {norm} | {count} | {saved / 2**20:.1f} | {saved / base[0]:.2f}x | {seconds * 1000:.0f} "
            f"| {seconds / base[2]:.2f}x |"
        )


if __name__ == "__main__":
    main()
