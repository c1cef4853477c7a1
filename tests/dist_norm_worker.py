"""Run under torchrun: each rank feeds its part of a batch through a conv -> InPlaceABNSync -> conv net.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/dist_norm_worker.py OUT_DIR [DEVICE [KERNELS]]``:
DEVICE cpu (default) or cuda (the GPUs, shared through gloo when there are fewer than the processes),
KERNELS the In-Place ABN kernel mode (auto, fused or reference; default auto)
Reads ``OUT_DIR/setup.pt`` (a dict with "state" (the net's initial state_dict), "batches" and
"grad_outputs" (full batches per iteration), "splits" (batch size per rank, may be uneven),
and "features", "feature_grad_output", "feature_weight" for the explicit-group layer)
and writes ``OUT_DIR/rank<r>.pt`` (CPU tensors) on every rank.

The net is built before the process group exists: the layer must find the default group at
run time. A second, standalone layer is given an explicit group.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from segmentation.models import norm_kernels
from segmentation.models.norm import InPlaceABNSync


def build_net(norm_layer: type) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        norm_layer(4),
        nn.Conv2d(4, 2, 1),
    )


def main(out_dir: str, device_type: str = "cpu", kernels: str = "auto") -> None:
    norm_kernels.set_kernel_mode(kernels)
    setup = torch.load(os.path.join(out_dir, "setup.pt"))
    net = build_net(InPlaceABNSync)
    net.load_state_dict(setup["state"])

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if device_type == "cuda" else torch.device("cpu")
    net.to(device)
    setup = {key: value.to(device) if isinstance(value, torch.Tensor) else
             [item.to(device) for item in value] if key in ("batches", "grad_outputs") else value
             for key, value in setup.items() if key != "state"}
    start = sum(setup["splits"][:rank])
    part = slice(start, start + setup["splits"][rank])

    results = {"outputs": [], "input_grads": [], "param_grads": []}
    for batch, grad_output in zip(setup["batches"], setup["grad_outputs"]):
        net.zero_grad()
        x = batch[part].clone().requires_grad_(True)
        out = net(x)
        out.backward(grad_output[part])
        results["outputs"].append(out.detach())
        results["input_grads"].append(x.grad)
        results["param_grads"].append({name: p.grad.clone() for name, p in net.named_parameters()})
    results["buffers"] = {name: b.clone() for name, b in net.named_buffers()}

    explicit = InPlaceABNSync(3, activation="identity", group=dist.new_group([0, 1])).to(device)
    with torch.no_grad():
        explicit.weight.copy_(setup["feature_weight"])
    features = setup["features"][part].clone().requires_grad_(True)
    (explicit(features * 1.0) * setup["feature_grad_output"][part]).sum().backward()
    results["explicit_group"] = {
        "input_grad": features.grad,
        "weight_grad": explicit.weight.grad,
        "running_var": explicit.running_var.clone(),
    }

    results["compiled"] = sorted(norm_kernels._compiled)  # the kernels that ran compiled
    torch.save(to_cpu(results), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_cpu(item) for item in value]
    return value


if __name__ == "__main__":
    main(*sys.argv[1:])
